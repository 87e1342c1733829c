//! tracer run as an unprivileged user (uid 65534) with only some
//! capabilities, tracing a leak in a process of another user (root): what
//! each capability gives (README, Requirements).
//!
//! * the full set (CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE,
//!   CAP_DAC_READ_SEARCH, CAP_CHECKPOINT_RESTORE): the same findings as
//!   root, checked against `ss`;
//! * without CAP_SYS_PTRACE: leaks are still found, without holders nor
//!   fd, and one line says so, once, however many times it happens;
//! * without CAP_CHECKPOINT_RESTORE: native frames are still named, from
//!   the paths in /proc/PID/maps, and one line says so;
//! * without CAP_BPF: a one-line error naming the set, before any work.

use std::collections::BTreeMap;
use std::time::Duration;

use tracer_tests::reduced::{
    assert_runs_with, finish, full_set_without, refusal_lines, require_setpriv, run_reduced, wait_started, FULL_SET,
};
use tracer_tests::{
    assert_same_cookies, format_ss, format_stack, require_privileges, spawn_client, spawn_server, ss_sockets,
    stack_has, start_client, wait_client_done, Evidence, Holder, SockLine, TracerOutput,
};

/// Loading and attaching the eBPF programs on a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// `--duration` plus time to print the summary and exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// The server's reply, left unread by the leaky clients.
const REPLY: &str = "26";

/// The leaks on connections to `server_addr` (summary), checked to be
/// exactly ss's CLOSE_WAIT sockets to it, sampled while the clients still
/// hold them. Returns them with ss's holders (pid -> comm, fd) per cookie.
fn leaks_vs_ss(out: &TracerOutput, server_addr: &str) -> Vec<(Evidence, Vec<Holder>)> {
    let truth: Vec<_> = ss_sockets("close-wait")
        .into_iter()
        .filter(|s| s.remote == server_addr)
        .collect();
    let ctx = format!(
        "{}\n--- ss close-wait to {server_addr}:\n{}",
        out.dump(),
        format_ss(&truth)
    );
    out.assert_success();
    // Other tests' leaks (other servers) may have no owner here: a process
    // of another user whose fds this tracer may not read.
    let leaks: Vec<Evidence> = out
        .leaks()
        .iter()
        .filter(|v| v["remote"].as_str().map(tracer_tests::normalize_addr).as_deref() == Some(server_addr))
        .map(Evidence::from_json)
        .collect();
    let cookies: Vec<u64> = leaks.iter().map(|e| e.leak.cookie).collect();
    let truth_cookies: Vec<u64> = truth.iter().map(|s| s.cookie).collect();
    assert!(
        !truth.is_empty(),
        "fixture sanity: no CLOSE_WAIT socket to the server\n{ctx}"
    );
    assert_same_cookies(&cookies, &truth_cookies, &format!("summary.leaks vs ss\n{ctx}"));
    let by_cookie: BTreeMap<u64, Vec<Holder>> = truth
        .iter()
        .map(|s| {
            let mut hs: Vec<Holder> = s
                .users
                .iter()
                .map(|(comm, pid, fd)| Holder {
                    pid: *pid,
                    comm: comm.clone(),
                    fd: *fd,
                })
                .collect();
            hs.sort();
            (s.cookie, hs)
        })
        .collect();
    leaks
        .into_iter()
        .map(|e| {
            let hs = by_cookie[&e.leak.cookie].clone();
            (e, hs)
        })
        .collect()
}

fn sock_of<'a>(socks: &'a [SockLine], e: &Evidence, ctx: &str) -> &'a SockLine {
    socks
        .iter()
        .find(|s| s.local == e.leak.local)
        .unwrap_or_else(|| panic!("no SOCK line for {}: {}\n{ctx}", e.leak.local, e.leak.json))
}

/// A root client leaking `count` sockets, traced with `--pid` by uid 65534
/// with `caps`. Returns the server and the client (both still running,
/// the client holding its sockets), the client's sockets, the tracer's
/// output and the server's address.
fn trace_root_leaks(setpriv: &std::path::PathBuf, caps: &[&str], count: usize) -> RootLeaks {
    let (server, port) = spawn_server("127.0.0.1:0", &["--reply", REPLY]);
    let addr = format!("127.0.0.1:{port}");
    // Held until the tracer watches it.
    let count_arg = count.to_string();
    let mut client = start_client(&[
        "--connect",
        &addr,
        "--count",
        &count_arg,
        "--mode",
        "leak",
        "--wait-stdin-line",
    ]);
    let pid = client.pid().to_string();
    let mut tracer = run_reduced(
        setpriv,
        caps,
        &["--pid", &pid, "--leak-after", "1s", "--duration", "4s"],
    );
    wait_started(&mut tracer, START_TIMEOUT);
    assert_runs_with(tracer.pid(), caps);
    client.send_line("go");
    let socks = wait_client_done(&mut client, count);
    let out = finish(tracer, EXIT_TIMEOUT);
    RootLeaks {
        _server: server,
        client,
        socks,
        out,
        addr,
    }
}

struct RootLeaks {
    _server: tracer_tests::Child,
    client: tracer_tests::Child,
    socks: Vec<SockLine>,
    out: TracerOutput,
    addr: String,
}

#[test]
fn full_set_finds_a_root_process_leak_with_fd_holders_and_stack() {
    if !require_privileges() {
        return;
    }
    let Some(setpriv) = require_setpriv() else { return };
    let RootLeaks {
        _server: _server_alive,
        client,
        socks,
        out,
        addr,
    } = trace_root_leaks(&setpriv, &FULL_SET, 2);
    let leaks = leaks_vs_ss(&out, &addr);
    let ctx = out.dump();
    assert_eq!(leaks.len(), 2, "{ctx}");
    for (e, ss_holders) in &leaks {
        let sock = sock_of(&socks, e, &ctx);
        assert_eq!(e.leak.pid, client.pid(), "owner: {}\n{ctx}", e.leak.json);
        assert_eq!(e.leak.comm, "tcp-fixture", "{}\n{ctx}", e.leak.json);
        assert_eq!(e.leak.fd, Some(sock.fd), "the owner's fd: {}\n{ctx}", e.leak.json);
        let mut holders = e.holders.clone();
        holders.sort();
        assert_eq!(&holders, ss_holders, "holders vs ss users: {}\n{ctx}", e.leak.json);
        assert!(
            stack_has(&e.open_stack, "open_connection", "tcp-fixture"),
            "the open stack names the fixture's frames (map_files, CAP_CHECKPOINT_RESTORE):\n{}\n{ctx}",
            format_stack(&e.open_stack)
        );
        assert!(
            stack_has(&e.open_stack, "connect_socket", "tcp-fixture"),
            "the caller of libc's connect is recovered (/proc/PID/mem, CAP_SYS_PTRACE):\n{}\n{ctx}",
            format_stack(&e.open_stack)
        );
    }
    assert_eq!(
        refusal_lines(&out.stderr),
        Vec::<&str>::new(),
        "nothing refused with the full set\n{ctx}"
    );
}

#[test]
fn without_sys_ptrace_leaks_are_found_and_the_loss_is_said_once() {
    if !require_privileges() {
        return;
    }
    let Some(setpriv) = require_setpriv() else { return };
    let caps = full_set_without("sys_ptrace");
    let (_server, port) = spawn_server("127.0.0.1:0", &["--reply", REPLY]);
    let addr = format!("127.0.0.1:{port}");
    // Host-wide, so that two clients leak in two batches: evidence is
    // gathered twice, and refused twice, but said once.
    let mut tracer = run_reduced(&setpriv, &caps, &["--leak-after", "1s", "--duration", "6s"]);
    wait_started(&mut tracer, START_TIMEOUT);
    assert_runs_with(tracer.pid(), &caps);
    let (first, _) = spawn_client(&["--connect", &addr, "--count", "1", "--mode", "leak"]);
    std::thread::sleep(Duration::from_millis(2500));
    let (second, _) = spawn_client(&["--connect", &addr, "--count", "1", "--mode", "leak"]);
    let out = finish(tracer, EXIT_TIMEOUT);
    let leaks = leaks_vs_ss(&out, &addr);
    let ctx = out.dump();
    assert_eq!(leaks.len(), 2, "{ctx}");
    let events = out
        .of_type("leak")
        .into_iter()
        .filter(|v| v["remote"].as_str().is_some_and(|r| r.ends_with(&format!(":{port}"))))
        .count();
    assert_eq!(events, 2, "two leak events, from two gatherings\n{ctx}");
    for (e, ss_holders) in &leaks {
        assert!(
            [first.pid(), second.pid()].contains(&e.leak.pid),
            "owner: {}\n{ctx}",
            e.leak.json
        );
        assert_eq!(
            e.leak.comm, "tcp-fixture",
            "stat needs no privilege: {}\n{ctx}",
            e.leak.json
        );
        assert!(!ss_holders.is_empty(), "fixture sanity: ss sees the holder\n{ctx}");
        assert!(e.holders.is_empty(), "root's fds are refused: {}\n{ctx}", e.leak.json);
        assert_eq!(e.leak.fd, None, "root's fds are refused: {}\n{ctx}", e.leak.json);
        assert_eq!(
            e.unread_bytes, 26,
            "sock_diag needs no privilege: {}\n{ctx}",
            e.leak.json
        );
    }
    let refusals = refusal_lines(&out.stderr);
    let fd_lines: Vec<&&str> = refusals.iter().filter(|l| l.contains("/proc/PID/fd ")).collect();
    assert_eq!(fd_lines.len(), 1, "one line about /proc/PID/fd\n{ctx}");
    assert!(
        fd_lines[0].contains("grant CAP_SYS_PTRACE (") && fd_lines[0].contains("holders"),
        "it names the capability and what is missing: {}",
        fd_lines[0]
    );
    // Each kind of refusal (fd, mem, map_files) is said once.
    let mut kinds: Vec<&str> = refusals
        .iter()
        .filter_map(|l| l.split("cannot read ").nth(1)?.split(' ').next())
        .collect();
    let n = kinds.len();
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(kinds.len(), n, "a kind of refusal said twice\n{ctx}");
    assert!(!out.stderr.contains("panicked"), "{ctx}");
}

#[test]
fn without_bpf_it_refuses_in_one_line_naming_the_set() {
    if !require_privileges() {
        return;
    }
    let Some(setpriv) = require_setpriv() else { return };
    let caps = full_set_without("bpf");
    let tracer = run_reduced(&setpriv, &caps, &["--duration", "2s"]);
    let out = finish(tracer, Duration::from_secs(10));
    let ctx = out.dump();
    assert!(!out.status.success(), "{ctx}");
    assert!(out.objects.is_empty(), "nothing on stdout\n{ctx}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr\n{ctx}");
    assert_eq!(
        lines[0],
        "error: tracer needs CAP_BPF and CAP_PERFMON to load its eBPF programs and lacks CAP_BPF: run it as \
         root, or grant CAP_BPF,CAP_PERFMON,CAP_SYS_PTRACE,CAP_DAC_READ_SEARCH,CAP_CHECKPOINT_RESTORE (see \
         README, Requirements)",
        "{ctx}"
    );
}

/// Without CAP_CHECKPOINT_RESTORE, `/proc/PID/map_files` is refused: the
/// native frames are named from the paths in `/proc/PID/maps` instead, and
/// one line says so.
#[test]
fn without_checkpoint_restore_native_frames_are_still_named() {
    if !require_privileges() {
        return;
    }
    let Some(setpriv) = require_setpriv() else { return };
    let caps = full_set_without("checkpoint_restore");
    let run = trace_root_leaks(&setpriv, &caps, 1);
    let (out, addr) = (&run.out, &run.addr);
    let leaks = leaks_vs_ss(out, addr);
    let ctx = out.dump();
    assert_eq!(leaks.len(), 1, "{ctx}");
    let e = &leaks[0].0;
    assert!(
        stack_has(&e.open_stack, "open_connection", "tcp-fixture"),
        "the open stack names the fixture's frames from /proc/PID/maps' paths:\n{}\n{ctx}",
        format_stack(&e.open_stack)
    );
    let lines = refusal_lines(&out.stderr);
    assert!(
        lines.len() == 1 && lines[0].contains("map_files") && lines[0].contains("CAP_CHECKPOINT_RESTORE"),
        "one line says map_files was refused and what to grant: {lines:?}\n{ctx}"
    );
}
