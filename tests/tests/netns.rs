//! Leaks in other network namespaces and in containers (issue 11): found
//! host-wide, those older than the tracer included, with their evidence
//! read inside their namespace (unread bytes, fd, holders), and named by
//! namespace, container and pid inside the container. Checked both ways
//! against `ss` run inside each namespace.
//!
//! Each test makes its own namespaces, whose ephemeral ports are disjoint
//! from the host's (tracer_tests::netns), so that the tests of the host's
//! namespace, which tell their sockets by port, never take these leaks for
//! theirs; and each looks only at the leaks in its own namespaces.

use std::process::Command;
use std::time::{Duration, Instant};

use tracer_tests::netns::{cgroup2_mount, disjoint_port_range, ns_inode, random_container_id};
use tracer_tests::procfs::parent_pid;
use tracer_tests::reduced::{assert_runs_with, finish, require_setpriv, run_reduced, wait_started, FULL_SET};
use tracer_tests::{
    assert_same_cookies, fixture_bin, format_ss, require_privileges, run_tracer, spawn_client_via, spawn_server_via,
    ss_sockets_via, Child, Evidence, Holder, Leak, NetNs, SockLine, SsSocket, TestCgroup, TracerOutput, Value,
};

/// Loading and attaching the eBPF programs on a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Slack on top of `--duration` for the tracer to print its summary and exit.
const EXIT_SLACK: Duration = Duration::from_secs(8);
/// The server's reply: what a client that never reads leaves unread.
const REPLY: u64 = 26;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The leak objects (summary entries, then `leak` events) in namespace
/// `netns`, each set checked to be exactly `truth` (ss inside the
/// namespace), both ways; none of `truth` closed late. Selected by
/// namespace, so that a leak reported without it is missing.
fn leaks_of(out: &TracerOutput, truth: &[SsSocket], netns: u64, ctx: &str) -> Vec<Evidence> {
    let cookies: Vec<u64> = truth.iter().map(|s| s.cookie).collect();
    let mut all = Vec::new();
    for (what, objs) in [
        ("summary.leaks", out.leaks().iter().collect::<Vec<_>>()),
        ("leak events", out.of_type("leak")),
    ] {
        let picked: Vec<Evidence> = objs
            .into_iter()
            .filter(|v| v["netns"].as_u64() == Some(netns))
            .map(Evidence::from_json)
            .collect();
        let got: Vec<u64> = picked.iter().map(|e| e.leak.cookie).collect();
        assert_same_cookies(&got, &cookies, &format!("{what} in namespace {netns}\n{ctx}"));
        all.extend(picked);
    }
    let late: Vec<&Value> = out
        .of_type("late_close")
        .into_iter()
        .filter(|v| v["cookie"].as_u64().is_some_and(|c| cookies.contains(&c)))
        .collect();
    assert!(late.is_empty(), "late_close for sockets never closed: {late:?}\n{ctx}");
    all
}

fn ss_of<'a>(truth: &'a [SsSocket], e: &Evidence, ctx: &str) -> &'a SsSocket {
    truth
        .iter()
        .find(|s| s.cookie == e.leak.cookie)
        .unwrap_or_else(|| panic!("cookie {} not in CLOSE_WAIT per ss\n{ctx}", e.leak.cookie))
}

fn sorted(mut v: Vec<Holder>) -> Vec<Holder> {
    v.sort();
    v
}

/// ss's `users:` as holders, sorted.
fn ss_holders(s: &SsSocket) -> Vec<Holder> {
    sorted(
        s.users
            .iter()
            .map(|(comm, pid, fd)| Holder {
                pid: *pid,
                comm: comm.clone(),
                fd: *fd,
            })
            .collect(),
    )
}

/// What every leak must agree with ss on: addresses, unread bytes, the
/// owner's fd, every holder; and its namespace.
fn check_against_ss(e: &Evidence, s: &SsSocket, netns: u64, ctx: &str) {
    let j = &e.leak.json;
    assert_eq!(
        (&e.leak.local, &e.leak.remote),
        (&s.local, &s.remote),
        "addresses: {j}\n{ctx}"
    );
    assert_eq!(e.leak.json["netns"].as_u64(), Some(netns), "netns: {j}\n{ctx}");
    // In CLOSE_WAIT the FIN is one more in the receive queue, until read.
    assert_eq!(
        e.unread_bytes,
        s.recv_q.saturating_sub(1),
        "unread_bytes vs ss Recv-Q ({}): {j}\n{ctx}",
        s.line
    );
    assert_eq!(e.leak.fd, s.fd_of(e.leak.pid), "fd vs ss ({}): {j}\n{ctx}", s.line);
    assert_eq!(
        sorted(e.holders.clone()),
        ss_holders(s),
        "holders vs ss users ({}): {j}\n{ctx}",
        s.line
    );
    assert_eq!(e.leak.comm, "tcp-fixture", "{j}\n{ctx}");
}

fn context(out: &TracerOutput, truth: &[SsSocket]) -> String {
    format!(
        "{}\n--- ss -tanpeH state close-wait inside the namespace, right after the tracer exited:\n{}",
        out.dump(),
        format_ss(truth)
    )
}

/// Polls `ss` through `wrapper` until `count` sockets are in CLOSE_WAIT
/// with `recv_q` bytes queued (the FIN arrived).
fn wait_close_wait(wrapper: &[&str], count: usize, recv_q: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = ss_sockets_via(wrapper, "close-wait");
        if snap.iter().filter(|s| s.recv_q == recv_q).count() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {count} CLOSE_WAIT sockets with Recv-Q {recv_q} via {wrapper:?}:\n{}",
            format_ss(&snap)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Our own cgroup v2 path: the fixture's, started by us.
fn own_cgroup() -> Option<String> {
    std::fs::read_to_string("/proc/self/cgroup")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}

/// Where cgroup v2 is mounted; None (after a skip notice) without it,
/// outside CI. Under CI its absence fails.
fn require_cgroup2() -> Option<std::path::PathBuf> {
    let found = cgroup2_mount();
    if found.is_none() {
        let msg = "cgroup v2 is not mounted (no cgroup2 line in /proc/self/mounts; usually at /sys/fs/cgroup): \
                   the container test needs it to put a process in a cgroup named as a container runtime names one";
        assert!(
            std::env::var_os("CI").is_none_or(|v| v.is_empty()),
            "{msg}, and CI is set"
        );
        eprintln!("skipping: {msg}");
    }
    found
}

/// A pid whose parent is `parent` (its first child), waiting for it.
fn child_of(parent: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = std::fs::read_dir("/proc").ok().and_then(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .find(|&p| parent_pid(p) == Some(parent))
        });
        if let Some(pid) = found {
            return pid;
        }
        assert!(Instant::now() < deadline, "pid {parent} has no child after 10s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// A network namespace with leaks made before the tracer started (found by
/// the start-up snapshot, read inside the namespace) and after (found by
/// the hooks, their evidence read inside it): all of them, and only them,
/// with their unread bytes, fd, holders (one socket held by two processes)
/// and namespace as ss inside the namespace shows them.
#[test]
fn leaks_in_another_namespace_before_and_after_start() {
    if !require_privileges() {
        return;
    }
    let ns = NetNs::create();
    let w = ns.wrapper();
    let reply = REPLY.to_string();
    let (_server, port) = spawn_server_via(&w, "127.0.0.1:0", &["--reply", &reply]);
    let (lo, hi) = disjoint_port_range();
    assert!(
        (lo..=hi).contains(&port),
        "fixture sanity: port {port} outside {lo}-{hi}"
    );
    let addr = format!("127.0.0.1:{port}");
    // Before the tracer: nothing read (Recv-Q = reply + FIN).
    let (early, _) = spawn_client_via(&w, &["--connect", &addr, "--count", "2", "--mode", "leak"]);
    wait_close_wait(&w, 2, REPLY + 1);

    let mut tracer = run_tracer(&["--leak-after", "1s", "--duration", "5s"]);
    tracer.wait_started(START_TIMEOUT);
    let (late, _) = spawn_client_via(&w, &["--connect", &addr, "--count", "2", "--mode", "leak", "--read"]);
    let (shared, _) = spawn_client_via(
        &w,
        &["--connect", &addr, "--count", "1", "--mode", "leak", "--fork-holder"],
    );
    let out = tracer.finish(Duration::from_secs(5) + EXIT_SLACK);
    // Sampled right after the tracer exited; the clients still run.
    let truth = ns.ss("close-wait");
    let ctx = context(&out, &truth);
    out.assert_success();
    let holder = tracer_tests::holder_pid(&shared).expect("--fork-holder prints its child");
    let held = |pids: &[u32]| {
        truth
            .iter()
            .filter(|s| s.users.iter().map(|u| u.1).eq(pids.iter().copied()))
            .count()
    };
    assert_eq!(
        (held(&[early.pid()]), held(&[late.pid()]), truth.len()),
        (2, 2, 5),
        "fixture sanity\n{ctx}"
    );

    let cgroup = own_cgroup();
    for e in leaks_of(&out, &truth, ns.inode(), &ctx) {
        let s = ss_of(&truth, &e, &ctx);
        check_against_ss(&e, s, ns.inode(), &ctx);
        let j = &e.leak.json;
        let (owner, unread, snapshot) = if s.has_pid(early.pid()) {
            (early.pid(), REPLY, true)
        } else if s.has_pid(late.pid()) {
            (late.pid(), 0, false)
        } else {
            let mut pids: Vec<u32> = e.holders.iter().map(|h| h.pid).collect();
            pids.sort_unstable();
            let mut want = vec![shared.pid(), holder];
            want.sort_unstable();
            assert_eq!(pids, want, "both processes hold the shared socket: {j}\n{ctx}");
            (shared.pid(), REPLY, false)
        };
        assert_eq!(e.leak.pid, owner, "owner: {j}\n{ctx}");
        assert_eq!(e.unread_bytes, unread, "{j}\n{ctx}");
        assert_eq!(
            e.leak.close_wait_estimated, snapshot,
            "older than the tracer or not: {j}\n{ctx}"
        );
        let source = if snapshot { "snapshot" } else { "connect" };
        assert_eq!(j["owner_source"], source, "{j}\n{ctx}");
        // `ip netns exec` changes no pid namespace nor cgroup.
        assert_eq!(j["container_id"], Value::Null, "{j}\n{ctx}");
        assert_eq!(j["container_pid"], Value::Null, "{j}\n{ctx}");
        assert_eq!(j["cgroup"].as_str(), cgroup.as_deref(), "{j}\n{ctx}");
    }
}

/// A container built by hand, as a runtime builds one: new pid, network and
/// mount namespaces (`unshare`), in a cgroup named as podman names its own
/// (`libpod-<id>.scope`). Its leaks name the container by that id, its
/// namespace, and the leaking process's pid inside (1) and on the host.
#[test]
fn a_hand_built_container_is_named() {
    if !require_privileges() {
        return;
    }
    let Some(mount) = require_cgroup2() else { return };
    let id = random_container_id();
    let cg = TestCgroup::new(&mount, &format!("libpod-{id}.scope"));
    let (lo, hi) = disjoint_port_range();
    // A fresh namespace: nothing else listens there.
    let port = lo + 7;
    let fixture = fixture_bin();
    let fx = fixture.display();
    // pid 1 of the container: waits to be moved into the cgroup, starts the
    // server, and becomes the client, which leaks what the server sends.
    let script = format!(
        "read go || exit 1\n\
         ip link set lo up\n\
         echo '{lo} {hi}' > /proc/sys/net/ipv4/ip_local_port_range\n\
         '{fx}' server --listen 127.0.0.1:{port} --reply {REPLY} >/dev/null 2>&1 &\n\
         until ss -Htln 'sport = :{port}' | grep -q .; do sleep 0.05; done\n\
         exec '{fx}' client --connect 127.0.0.1:{port} --count 2 --mode leak\n"
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--net", "--mount-proc", "--kill-child", "sh", "-c", &script]);
    let mut container = Child::spawn("container (unshare)", cmd);
    let init = child_of(container.pid());
    cg.add(init);
    let netns = ns_inode(init);

    let mut tracer = run_tracer(&["--leak-after", "1s", "--duration", "4s"]);
    tracer.wait_started(START_TIMEOUT);
    container.send_line("go");
    let done = container.wait_line(|l| l.starts_with("DONE "), Duration::from_secs(20));
    assert_eq!(
        done,
        "DONE 1",
        "the client is pid 1 in the container\n{}",
        container.describe()
    );
    let socks: Vec<SockLine> = (0..2)
        .map(|_| {
            let l = container.wait_line(|l| l.starts_with("SOCK "), Duration::from_secs(10));
            SockLine::parse(&l).unwrap_or_else(|| panic!("bad SOCK line {l:?}"))
        })
        .collect();
    let out = tracer.finish(Duration::from_secs(4) + EXIT_SLACK);
    let net = format!("--net=/proc/{init}/ns/net");
    let truth = ss_sockets_via(&["nsenter", &net], "close-wait");
    let ctx = context(&out, &truth);
    out.assert_success();
    assert_eq!(truth.len(), 2, "fixture sanity\n{ctx}");
    assert!(
        std::fs::read_to_string(format!("/proc/{init}/cgroup"))
            .is_ok_and(|c| c.contains(&format!("0::{}\n", cg.path()))),
        "fixture sanity: the container's process is in {}",
        cg.path()
    );

    for e in leaks_of(&out, &truth, netns, &ctx) {
        let s = ss_of(&truth, &e, &ctx);
        check_against_ss(&e, s, netns, &ctx);
        let j = &e.leak.json;
        assert_eq!(e.leak.pid, init, "the host's pid: {j}\n{ctx}");
        assert_eq!(
            j["container_pid"].as_u64(),
            Some(1),
            "its pid in the container: {j}\n{ctx}"
        );
        assert_eq!(j["container_id"].as_str(), Some(id.as_str()), "{j}\n{ctx}");
        assert_eq!(j["cgroup"].as_str(), Some(cg.path()), "{j}\n{ctx}");
        assert_eq!(e.unread_bytes, REPLY, "{j}\n{ctx}");
        let sock = socks
            .iter()
            .find(|k| k.local == e.leak.local)
            .unwrap_or_else(|| panic!("no SOCK line for {}: {j}\n{ctx}", e.leak.local));
        assert_eq!(e.leak.fd, Some(sock.fd), "the fd it printed: {j}\n{ctx}");
    }
}

/// Without CAP_SYS_ADMIN (the full set of README, Requirements), another
/// namespace cannot be entered: its leaks are still found (the hooks are
/// host-wide), without evidence, and one line says so, naming the
/// capability, however many times it is refused.
#[test]
fn a_refused_namespace_is_said_once() {
    if !require_privileges() {
        return;
    }
    let Some(setpriv) = require_setpriv() else { return };
    let ns = NetNs::create();
    let w = ns.wrapper();
    let reply = REPLY.to_string();
    let (_server, port) = spawn_server_via(&w, "127.0.0.1:0", &["--reply", &reply]);
    let addr = format!("127.0.0.1:{port}");
    // Host-wide, so the snapshot and each gathering try to enter it.
    let mut tracer = run_reduced(&setpriv, &FULL_SET, &["--leak-after", "1s", "--duration", "5s"]);
    wait_started(&mut tracer, START_TIMEOUT);
    assert_runs_with(tracer.pid(), &FULL_SET);
    let (first, _) = spawn_client_via(&w, &["--connect", &addr, "--count", "1", "--mode", "leak"]);
    std::thread::sleep(Duration::from_millis(2000));
    let (second, _) = spawn_client_via(&w, &["--connect", &addr, "--count", "1", "--mode", "leak"]);
    let out = finish(tracer, Duration::from_secs(5) + EXIT_SLACK);
    let truth = ns.ss("close-wait");
    let ctx = context(&out, &truth);
    out.assert_success();
    assert_eq!(truth.len(), 2, "fixture sanity\n{ctx}");
    let cookies: Vec<u64> = truth.iter().map(|s| s.cookie).collect();
    // Without evidence, unread_bytes is null: only the base contract holds.
    let leaks: Vec<Leak> = out
        .leaks()
        .iter()
        .filter(|v| v["cookie"].as_u64().is_some_and(|c| cookies.contains(&c)))
        .map(Leak::from_json)
        .collect();
    let got: Vec<u64> = leaks.iter().map(|l| l.cookie).collect();
    assert_same_cookies(&got, &cookies, &format!("summary.leaks\n{ctx}"));
    for l in &leaks {
        let j = &l.json;
        assert!([first.pid(), second.pid()].contains(&l.pid), "owner: {j}\n{ctx}");
        for field in ["netns", "unread_bytes"] {
            assert_eq!(j[field], Value::Null, "not read without entering: {j}\n{ctx}");
        }
    }
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("cannot enter") && l.contains("(permission denied)"))
        .collect();
    assert_eq!(lines.len(), 1, "one line about the namespaces not entered\n{ctx}");
    assert!(
        lines[0].contains("network namespace") && lines[0].contains("grant CAP_SYS_ADMIN"),
        "it names the capability: {}",
        lines[0]
    );
}

/// The host-wide ground truth of the other tests (live.rs's "no false
/// leak" check) sees every namespace's sockets, as a host-wide tracer
/// does; ss in our own namespace does not.
#[test]
fn host_wide_ground_truth_sees_every_namespace() {
    if !require_privileges() {
        return;
    }
    let ns = NetNs::create();
    let w = ns.wrapper();
    let (_server, port) = spawn_server_via(&w, "127.0.0.1:0", &["--reply", "1"]);
    let addr = format!("127.0.0.1:{port}");
    let (_client, _) = spawn_client_via(&w, &["--connect", &addr, "--mode", "leak", "--read"]);
    let theirs: Vec<u64> = ns.ss("close-wait").iter().map(|s| s.cookie).collect();
    assert_eq!(theirs.len(), 1, "fixture sanity: {:?}", ns.ss("close-wait"));
    let ours = ss_sockets_via(&[], "close-wait");
    assert!(!ours.iter().any(|s| theirs.contains(&s.cookie)), "{}", format_ss(&ours));
    let every = tracer_tests::ss_sockets_every_netns("close-wait");
    assert!(
        theirs.iter().all(|c| every.iter().any(|s| s.cookie == *c)),
        "{:?} not in\n{}",
        theirs,
        format_ss(&every)
    );
}
