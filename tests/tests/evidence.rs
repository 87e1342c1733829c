//! Root-cause evidence (issue 3) in `tracer live --json`: where a leaked
//! socket was opened (and closed), how many bytes it holds unread, under
//! which fd, and which processes hold it. Checked against `ss` and `/proc`.
//!
//! Like the tests in live.rs, every test has its own server on a random
//! port and only looks at sockets of that port, so they run in parallel
//! with each other and with anything else on the machine.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tracer_tests::{
    assert_same_cookies, format_ss, format_stack, holder_pid, port_of, require_privileges, run_tracer, socket_fds,
    spawn_client, spawn_server, ss_sockets, stack_has, wait_for_ss, Child, Evidence, Holder, SockLine, SsSocket,
    Tracer, TracerOutput, Value,
};

/// Loading and attaching the eBPF programs on a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Slack on top of `--duration` for the tracer to print its summary and exit.
const EXIT_SLACK: Duration = Duration::from_secs(8);
/// What every test's tracer runs with.
const TRACER_ARGS: [&str; 4] = ["--leak-after", "1s", "--duration", "5s"];
const TRACER_DURATION: Duration = Duration::from_secs(5);
/// `--leak-after 1s`.
const LEAK_AFTER_MS: u64 = 1000;
/// The server's reply: what a client that never reads leaves unread.
const REPLY: u64 = 26;
/// Connections per client.
const COUNT: usize = 3;
/// Where the fixture's own frames are (the module path's end).
const FIXTURE_MODULE: &str = "tcp-fixture";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A server replying [`REPLY`] bytes then closing, and a tracer running
/// [`TRACER_ARGS`] that has started (so every client connects while traced).
struct Setup {
    server: Child,
    server_addr: String,
    port: u16,
    tracer: Tracer,
}

fn setup() -> Setup {
    setup_with(&[])
}

fn setup_with(extra: &[&str]) -> Setup {
    let reply = REPLY.to_string();
    let (server, port) = spawn_server("127.0.0.1:0", &["--reply", &reply]);
    let args: Vec<&str> = TRACER_ARGS.iter().copied().chain(extra.iter().copied()).collect();
    let mut tracer = run_tracer(&args);
    tracer.wait_started(START_TIMEOUT);
    Setup {
        server,
        server_addr: format!("127.0.0.1:{port}"),
        port,
        tracer,
    }
}

/// `tcp-fixture client --connect ADDR --count COUNT --mode leak EXTRA...`,
/// waiting for its `DONE` and `SOCK` lines.
fn leaky_client(server_addr: &str, extra: &[&str]) -> (Child, Vec<SockLine>) {
    let count = COUNT.to_string();
    let mut args = vec!["--connect", server_addr, "--count", &count, "--mode", "leak"];
    args.extend_from_slice(extra);
    spawn_client(&args)
}

fn context(out: &TracerOutput, truth: &[SsSocket]) -> String {
    format!(
        "{}\n--- ss -tanpeH state close-wait (right after the tracer exited):\n{}",
        out.dump(),
        format_ss(truth)
    )
}

/// The tracer's output, and ss's close-wait sockets to the server sampled
/// right after it exited (the clients still run).
struct Finished {
    out: TracerOutput,
    truth: Vec<SsSocket>,
    ctx: String,
}

impl Finished {
    fn new(setup: Setup) -> Finished {
        let out = setup.tracer.finish(TRACER_DURATION + EXIT_SLACK);
        let all = ss_sockets("close-wait");
        let ctx = context(&out, &all);
        out.assert_success();
        let truth = all.into_iter().filter(|s| s.remote == setup.server_addr).collect();
        drop(setup.server);
        Finished { out, truth, ctx }
    }

    fn ss(&self, cookie: u64) -> &SsSocket {
        self.truth
            .iter()
            .find(|s| s.cookie == cookie)
            .unwrap_or_else(|| panic!("cookie {cookie} is not in CLOSE_WAIT per ss\n{}", self.ctx))
    }

    /// The leak objects on connections to `port`: the summary's leaks and
    /// the `leak` events, each set checked to be exactly ss's CLOSE_WAIT
    /// sockets to the server, and none of them closed late. Only objects
    /// of this port are parsed; other sockets on the host are not this
    /// test's business.
    fn leaks(&self, port: u16) -> Leaks {
        let here = |v: &&Value| v.get("remote").and_then(Value::as_str).and_then(port_of) == Some(port);
        let summary: Vec<Evidence> = self.out.leaks().iter().filter(here).map(Evidence::from_json).collect();
        let events: Vec<Evidence> = self
            .out
            .of_type("leak")
            .into_iter()
            .filter(here)
            .map(Evidence::from_json)
            .collect();
        let truth: Vec<u64> = self.truth.iter().map(|s| s.cookie).collect();
        let cookies = |v: &[Evidence]| v.iter().map(|e| e.leak.cookie).collect::<Vec<_>>();
        assert_same_cookies(&cookies(&summary), &truth, &format!("summary.leaks\n{}", self.ctx));
        assert_same_cookies(&cookies(&events), &truth, &format!("leak events\n{}", self.ctx));
        let late: Vec<&Value> = self.out.of_type("late_close").into_iter().filter(here).collect();
        assert!(
            late.is_empty(),
            "late_close for sockets never closed: {late:?}\n{}",
            self.ctx
        );
        Leaks { summary, events }
    }
}

/// Leak objects of one test's port.
struct Leaks {
    summary: Vec<Evidence>,
    events: Vec<Evidence>,
}

impl Leaks {
    /// Summary entries, then events: every check applies to both.
    fn all(&self) -> impl Iterator<Item = &Evidence> {
        self.summary.iter().chain(&self.events)
    }
}

/// How many of the server's CLOSE_WAIT sockets are held by exactly the
/// processes `pids` (for fixture sanity checks).
fn held_by(truth: &[SsSocket], pids: &[u32]) -> usize {
    let want: BTreeSet<u32> = pids.iter().copied().collect();
    truth
        .iter()
        .filter(|s| s.users.iter().map(|(_, p, _)| *p).collect::<BTreeSet<_>>() == want)
        .count()
}

/// The `SOCK` line of the socket with this (normalised) local address.
fn sock_line<'a>(socks: &'a [SockLine], e: &Evidence, ctx: &str) -> &'a SockLine {
    socks
        .iter()
        .find(|s| s.local == e.leak.local)
        .unwrap_or_else(|| panic!("no SOCK line for {}: {}\n{ctx}", e.leak.local, e.leak.json))
}

/// ss's `users:` of a socket as holders, sorted.
fn ss_holders(s: &SsSocket) -> Vec<Holder> {
    let mut v: Vec<Holder> = s
        .users
        .iter()
        .map(|(comm, pid, fd)| Holder {
            pid: *pid,
            comm: comm.clone(),
            fd: *fd,
        })
        .collect();
    v.sort();
    v
}

fn sorted_holders(e: &Evidence) -> Vec<Holder> {
    let mut v = e.holders.clone();
    v.sort();
    v
}

/// `holders` is exactly ss's `users:` for the socket (both ways: nobody
/// missing, nobody extra, same fds and names), and each holder's fd is a
/// link to the socket's inode in `/proc/PID/fd`.
fn check_holders_against_ss_and_proc(e: &Evidence, s: &SsSocket, ctx: &str) {
    assert_eq!(
        sorted_holders(e),
        ss_holders(s),
        "holders differ from ss users ({}): {}\n{ctx}",
        s.line,
        e.leak.json
    );
    let ino = inode(s, ctx);
    for h in &e.holders {
        let fds = socket_fds(h.pid);
        assert!(
            fds.get(&ino).is_some_and(|fds| fds.contains(&h.fd)),
            "holder {h:?}: /proc/{}/fd/{} is not socket:[{ino}] (its sockets: {fds:?}): {}\n{ctx}",
            h.pid,
            h.fd,
            e.leak.json
        );
    }
}

fn inode(s: &SsSocket, ctx: &str) -> u64 {
    match s.inode {
        Some(ino) if ino != 0 => ino,
        _ => panic!("ss shows no inode for a held socket: {}\n{ctx}", s.line),
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn open_stack_names_the_opening_function() {
    if !require_privileges() {
        return;
    }
    let setup = setup();
    let (client, socks) = leaky_client(&setup.server_addr, &["--read"]);
    let (port, server_addr) = (setup.port, setup.server_addr.clone());
    let fin = Finished::new(setup);
    let ctx = &fin.ctx;
    assert_eq!(
        held_by(&fin.truth, &[client.pid()]),
        socks.len(),
        "fixture sanity\n{ctx}"
    );

    let leaks = fin.leaks(port);
    for e in leaks.all() {
        assert_eq!(e.leak.pid, client.pid(), "owner: {}\n{ctx}", e.leak.json);
        assert!(
            stack_has(&e.open_stack, "open_connection", FIXTURE_MODULE),
            "open_stack has no user frame in open_connection of {FIXTURE_MODULE} \
             (open_stack_error: {:?}):\n{}{}\n{ctx}",
            e.open_stack_error,
            format_stack(&e.open_stack),
            e.leak.json
        );
        // connect()'s own caller, which libc's frameless wrapper hides
        // from a frame-pointer walk, is recovered: right after the wrapper.
        let user: Vec<_> = e.open_stack.iter().filter(|f| !f.kernel).collect();
        assert!(
            user.len() > 2
                && user[0].symbol.as_deref().is_some_and(|s| s.contains("connect"))
                && user[1].is_user_fn("connect_socket", FIXTURE_MODULE)
                && user[2].is_user_fn("open_connection", FIXTURE_MODULE),
            "open_stack should be connect, connect_socket, open_connection:\n{}{}\n{ctx}",
            format_stack(&e.open_stack),
            e.leak.json
        );
    }

    // One group: this process, this stack, this remote.
    let groups: Vec<_> = fin
        .out
        .summary_groups()
        .into_iter()
        .filter(|g| g.pid == client.pid())
        .collect();
    assert_eq!(
        groups.len(),
        1,
        "the client's {COUNT} leaks, opened from one place to one remote, should make one group: {:?}\n{ctx}",
        groups.iter().map(|g| &g.json).collect::<Vec<_>>()
    );
    let g = &groups[0];
    assert_eq!(g.count, COUNT as u64, "group count: {}\n{ctx}", g.json);
    assert_eq!(g.remote, server_addr, "group remote: {}\n{ctx}", g.json);
    assert_eq!(g.comm, "tcp-fixture", "group comm: {}\n{ctx}", g.json);
    let oldest = leaks.summary.iter().map(|e| e.leak.close_wait_ms).max().unwrap_or(0);
    assert!(
        g.oldest_close_wait_ms >= LEAK_AFTER_MS && g.oldest_close_wait_ms == oldest,
        "group oldest_close_wait_ms should be the largest close_wait_ms of its leaks ({oldest}): {}\n{ctx}",
        g.json
    );
    assert!(
        stack_has(&g.open_stack, "open_connection", FIXTURE_MODULE),
        "group open_stack has no open_connection frame:\n{}{}\n{ctx}",
        format_stack(&g.open_stack),
        g.json
    );
}

#[test]
fn kernel_stacks_on_request() {
    if !require_privileges() {
        return;
    }
    let setup = setup_with(&["--kernel-stacks"]);
    let (client, _socks) = leaky_client(&setup.server_addr, &["--read"]);
    let port = setup.port;
    let fin = Finished::new(setup);
    let ctx = &fin.ctx;
    let leaks = fin.leaks(port);
    assert!(!leaks.summary.is_empty(), "no leaks\n{ctx}");
    for e in leaks.all() {
        assert_eq!(e.leak.pid, client.pid(), "owner: {}\n{ctx}", e.leak.json);
        // The connect() path in the kernel, after the user frames.
        let kernel: Vec<_> = e.open_stack.iter().filter(|f| f.kernel).collect();
        assert!(
            kernel
                .iter()
                .any(|f| f.symbol.as_deref().is_some_and(|s| s.contains("connect"))),
            "no kernel connect frame with --kernel-stacks:\n{}{}\n{ctx}",
            format_stack(&e.open_stack),
            e.leak.json
        );
        assert!(
            stack_has(&e.open_stack, "open_connection", FIXTURE_MODULE),
            "user frames missing\n{ctx}"
        );
    }
}

#[test]
fn no_stacks_still_finds_every_leak() {
    if !require_privileges() {
        return;
    }
    let setup = setup_with(&["--no-stacks"]);
    let (client, socks) = leaky_client(&setup.server_addr, &["--read"]);
    let port = setup.port;
    let fin = Finished::new(setup);
    let ctx = &fin.ctx;
    let leaks = fin.leaks(port);
    assert_eq!(
        leaks.summary.len(),
        socks.len(),
        "every leak is still found without stacks\n{ctx}"
    );
    for e in leaks.all() {
        assert_eq!(e.leak.pid, client.pid(), "owner: {}\n{ctx}", e.leak.json);
        assert!(
            e.open_stack.is_empty(),
            "--no-stacks, yet an open stack:\n{}\n{ctx}",
            format_stack(&e.open_stack)
        );
        assert!(
            e.open_stack_error.as_deref().is_some_and(|m| m.contains("--no-stacks")),
            "open_stack_error should say stacks were off: {:?}\n{ctx}",
            e.open_stack_error
        );
    }
}

#[test]
fn unread_bytes_match_recv_q() {
    if !require_privileges() {
        return;
    }
    let setup = setup();
    // Never reads: the reply and the FIN stay queued (Recv-Q = REPLY + 1).
    let (unread, _) = leaky_client(&setup.server_addr, &[]);
    // Reads everything up to the FIN.
    let (read, _) = leaky_client(&setup.server_addr, &["--read"]);
    let server_addr = setup.server_addr.clone();
    // DONE may come before the FIN of a client that does not read.
    wait_for_ss(
        "close-wait",
        Duration::from_secs(5),
        "the unread client's sockets in CLOSE_WAIT with the reply and the FIN queued",
        |snap| {
            snap.iter()
                .filter(|s| s.remote == server_addr && s.has_pid(unread.pid()) && s.recv_q == REPLY + 1)
                .count()
                == COUNT
        },
    );
    let port = setup.port;
    let fin = Finished::new(setup);
    let ctx = &fin.ctx;
    assert_eq!(held_by(&fin.truth, &[unread.pid()]), COUNT, "fixture sanity\n{ctx}");
    assert_eq!(held_by(&fin.truth, &[read.pid()]), COUNT, "fixture sanity\n{ctx}");

    let mut per_pid: BTreeMap<u32, usize> = BTreeMap::new();
    for e in fin.leaks(port).all() {
        let s = fin.ss(e.leak.cookie);
        // ss's Recv-Q (rcv_nxt - copied_seq) counts the FIN until a read
        // returns EOF, which consumes it (the `--read` client: Recv-Q 0).
        // Nothing can be queued after the FIN, so a non-zero Recv-Q of a
        // CLOSE_WAIT socket is the unread bytes plus the FIN.
        let ss_unread = s.recv_q.saturating_sub(1);
        assert_eq!(
            e.unread_bytes, ss_unread,
            "unread_bytes should be ss Recv-Q minus the FIN ({}): {}\n{ctx}",
            s.line, e.leak.json
        );
        *per_pid.entry(e.leak.pid).or_default() += 1;
        if e.leak.pid == unread.pid() {
            assert_eq!(e.unread_bytes, REPLY, "unread_bytes: {}\n{ctx}", e.leak.json);
            assert_eq!(
                e.unread_bytes_at_fin,
                Some(REPLY),
                "the reply was queued, unread, when the FIN came: {}\n{ctx}",
                e.leak.json
            );
        } else if e.leak.pid == read.pid() {
            assert_eq!(e.unread_bytes, 0, "unread_bytes: {}\n{ctx}", e.leak.json);
            // Whether the reader had drained the reply before the FIN came
            // is a race (both arrive back to back), so only the bound holds.
            assert!(
                e.unread_bytes_at_fin.is_none_or(|n| n <= REPLY),
                "unread_bytes_at_fin: {}\n{ctx}",
                e.leak.json
            );
        } else {
            panic!(
                "leak attributed to neither client ({} unread, {} read): {}\n{ctx}",
                unread.pid(),
                read.pid(),
                e.leak.json
            );
        }
    }
    // Summary plus events: each socket twice.
    assert_eq!(
        per_pid,
        BTreeMap::from([(unread.pid(), 2 * COUNT), (read.pid(), 2 * COUNT)]),
        "leak objects per pid\n{ctx}"
    );
}

#[test]
fn fd_matches_proc() {
    if !require_privileges() {
        return;
    }
    let setup = setup();
    let (client, socks) = leaky_client(&setup.server_addr, &["--read"]);
    let port = setup.port;
    let fin = Finished::new(setup);
    let ctx = &fin.ctx;
    assert_eq!(held_by(&fin.truth, &[client.pid()]), COUNT, "fixture sanity\n{ctx}");

    // /proc: every socket of the client, by inode (it holds nothing else).
    let proc_fds = socket_fds(client.pid());
    let mut from_proc: BTreeSet<(u64, i32)> = BTreeSet::new();
    for (ino, fds) in &proc_fds {
        assert_eq!(fds.len(), 1, "fixture sanity: one fd per socket: {proc_fds:?}\n{ctx}");
        from_proc.insert((*ino, fds[0]));
    }

    let mut from_leaks: BTreeSet<(u64, i32)> = BTreeSet::new();
    for e in fin.leaks(port).all() {
        assert_eq!(e.leak.pid, client.pid(), "owner: {}\n{ctx}", e.leak.json);
        let s = fin.ss(e.leak.cookie);
        let ino = inode(s, ctx);
        let fd = e
            .leak
            .fd
            .unwrap_or_else(|| panic!("fd unknown for a socket opened while traced: {}\n{ctx}", e.leak.json));
        assert_eq!(
            proc_fds.get(&ino).map(Vec::as_slice),
            Some(&[fd][..]),
            "fd {fd} is not the one /proc/{}/fd links to socket:[{ino}] ({proc_fds:?}): {}\n{ctx}",
            client.pid(),
            e.leak.json
        );
        let line = sock_line(&socks, e, ctx);
        assert_eq!(
            fd, line.fd,
            "fd differs from the client's SOCK line {line:?}: {}\n{ctx}",
            e.leak.json
        );
        assert_eq!(s.fd_of(client.pid()), Some(fd), "fd differs from ss: {}\n{ctx}", s.line);
        from_leaks.insert((ino, fd));
    }
    // Both ways: every socket fd of the client is a reported leak.
    assert_eq!(
        from_leaks, from_proc,
        "(inode, fd) of the leaks vs the client's socket fds in /proc\n{ctx}"
    );
}

#[test]
fn forked_child_is_a_holder() {
    if !require_privileges() {
        return;
    }
    let setup = setup();
    let (client, socks) = leaky_client(&setup.server_addr, &["--read", "--fork-holder"]);
    let holder = holder_pid(&client).unwrap_or_else(|| panic!("no HOLDER line\n{:?}", client.lines_seen()));
    let port = setup.port;
    let fin = Finished::new(setup);
    let ctx = &fin.ctx;
    assert_eq!(
        held_by(&fin.truth, &[client.pid(), holder]),
        COUNT,
        "fixture sanity: parent {} and child {holder} hold every socket\n{ctx}",
        client.pid()
    );

    for e in fin.leaks(port).all() {
        let s = fin.ss(e.leak.cookie);
        let line = sock_line(&socks, e, ctx);
        assert_eq!(
            e.holder_fds(),
            {
                let mut want = vec![(client.pid(), line.fd), (holder, line.fd)];
                want.sort_unstable();
                want
            },
            "holders should be the client and its forked child, both under fd {}: {}\n{ctx}",
            line.fd,
            e.leak.json
        );
        check_holders_against_ss_and_proc(e, s, ctx);
        // The opener still holds it: it stays the owner.
        assert_eq!(e.leak.pid, client.pid(), "owner: {}\n{ctx}", e.leak.json);
        assert_eq!(e.leak.fd, Some(line.fd), "owner's fd: {}\n{ctx}", e.leak.json);
        assert!(
            e.fd_closed_by.is_none(),
            "nobody closed an fd to it: {}\n{ctx}",
            e.leak.json
        );
    }
}

#[test]
fn close_released_fd_but_child_holds_it() {
    if !require_privileges() {
        return;
    }
    let setup = setup();
    let (client, socks) = leaky_client(&setup.server_addr, &["--read", "--fork-holder", "--close-after-fork"]);
    let holder = holder_pid(&client).unwrap_or_else(|| panic!("no HOLDER line\n{:?}", client.lines_seen()));
    let port = setup.port;
    let fin = Finished::new(setup);
    let ctx = &fin.ctx;
    assert_eq!(
        held_by(&fin.truth, &[holder]),
        COUNT,
        "fixture sanity: only the child {holder} holds the sockets (the client {} closed them)\n{ctx}",
        client.pid()
    );
    let parent_fds = socket_fds(client.pid());

    for e in fin.leaks(port).all() {
        let s = fin.ss(e.leak.cookie);
        let ino = inode(s, ctx);
        assert!(
            !parent_fds.contains_key(&ino),
            "fixture sanity: the client still has socket:[{ino}] open: {parent_fds:?}\n{ctx}"
        );
        let line = sock_line(&socks, e, ctx);
        assert_eq!(
            e.holders,
            vec![Holder {
                pid: holder,
                comm: "tcp-fixture".to_string(),
                fd: line.fd
            }],
            "the forked child is the only holder: {}\n{ctx}",
            e.leak.json
        );
        check_holders_against_ss_and_proc(e, s, ctx);

        let closed = e.fd_closed_by.as_ref().unwrap_or_else(|| {
            panic!(
                "no fd_closed_by, though the client closed its fd: {}\n{ctx}",
                e.leak.json
            )
        });
        assert_eq!(closed.pid, client.pid(), "fd_closed_by.pid: {}\n{ctx}", e.leak.json);
        // The fixture closes from its main thread.
        assert_eq!(closed.tid, client.pid(), "fd_closed_by.tid: {}\n{ctx}", e.leak.json);
        assert_eq!(closed.fd, line.fd, "fd_closed_by.fd: {}\n{ctx}", e.leak.json);

        let close_stack = e
            .close_stack
            .as_deref()
            .unwrap_or_else(|| panic!("no close_stack, though a close was seen: {}\n{ctx}", e.leak.json));
        assert!(
            stack_has(close_stack, "close_client_socket", FIXTURE_MODULE),
            "close_stack has no user frame in close_client_socket of {FIXTURE_MODULE} \
             (close_stack_error: {:?}):\n{}{}\n{ctx}",
            e.close_stack_error,
            format_stack(close_stack),
            e.leak.json
        );
        assert!(
            stack_has(&e.open_stack, "open_connection", FIXTURE_MODULE),
            "open_stack has no open_connection frame:\n{}{}\n{ctx}",
            format_stack(&e.open_stack),
            e.leak.json
        );

        // Whoever is named as the owner, the fd given must be theirs.
        assert!(
            e.leak.pid == client.pid() || e.leak.pid == holder,
            "owner is neither the opener nor the holder: {}\n{ctx}",
            e.leak.json
        );
        if let Some(fd) = e.leak.fd {
            assert_eq!(
                s.fd_of(e.leak.pid),
                Some(fd),
                "fd {fd} is not pid {}'s fd to the socket per ss ({}): {}\n{ctx}",
                e.leak.pid,
                s.line,
                e.leak.json
            );
        }
    }
}
