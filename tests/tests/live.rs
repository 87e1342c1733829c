//! End-to-end tests of `tracer live --json` against real sockets made by the
//! `tcp-fixture` program, with `ss` as the ground truth.
//!
//! Every test uses its own server on a random port and only looks at
//! sockets of that port (except for the host-wide "no false leak" check),
//! so the tests can run in parallel with each other and with anything else
//! on the machine.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use tracer_tests::{
    assert_same_cookies, format_ss, require_privileges, run_tracer, spawn_client, spawn_server, ss_sockets,
    start_client, tracer_bin, wait_client_done, wait_for_ss, Child, Leak, SsMonitor, SsSocket, TracerOutput, Value,
};

/// Loading and attaching the eBPF programs on a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Slack on top of `--duration` for the tracer to print its summary and exit.
const EXIT_SLACK: Duration = Duration::from_secs(8);
/// `--leak-after 1s` as the start object must echo it.
const LEAK_AFTER_MS: u64 = 1000;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')?.1.parse().ok()
}

/// Checks the `start` object against the contract.
fn check_start(start: &Value, filter_pid: Option<u32>, leak_after_ms: u64) {
    let hooks = start
        .get("hooks")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("start has no \"hooks\" array: {start}"));
    assert!(!hooks.is_empty(), "start lists no hooks: {start}");
    match filter_pid {
        None => assert!(
            start.get("filter_pid").is_some_and(Value::is_null),
            "start.filter_pid should be null without --pid: {start}"
        ),
        Some(pid) => assert_eq!(
            start.get("filter_pid").and_then(Value::as_u64),
            Some(u64::from(pid)),
            "start.filter_pid should be the --pid value: {start}"
        ),
    }
    assert_eq!(
        start.get("leak_after_ms").and_then(Value::as_u64),
        Some(leak_after_ms),
        "start.leak_after_ms: {start}"
    );
}

/// Checks the summary's shape (beyond `leaks`, which is parsed separately).
fn check_summary_shape(out: &TracerOutput) {
    let s = out.summary();
    assert!(
        s.get("duration_ms").is_some_and(Value::is_u64),
        "summary.duration_ms missing or not a number\n{}",
        out.dump()
    );
    assert!(
        s.get("groups").is_some_and(Value::is_array),
        "summary.groups missing or not an array\n{}",
        out.dump()
    );
    assert!(
        s.get("stats").is_some_and(Value::is_object),
        "summary.stats missing or not an object\n{}",
        out.dump()
    );
    let last = out.objects.last().expect("summary exists");
    assert_eq!(
        last.get("type").and_then(Value::as_str),
        Some("summary"),
        "the summary must be the last line\n{}",
        out.dump()
    );
}

fn summary_duration_ms(out: &TracerOutput) -> u64 {
    out.summary()["duration_ms"].as_u64().unwrap_or(0)
}

fn context(out: &TracerOutput, truth: &[SsSocket]) -> String {
    format!(
        "{}\n--- ss -tanpeH state close-wait (right after the tracer exited):\n{}",
        out.dump(),
        format_ss(truth)
    )
}

fn cookies(leaks: &[&Leak]) -> Vec<u64> {
    leaks.iter().map(|l| l.cookie).collect()
}

fn ss_cookies(socks: &[&SsSocket]) -> Vec<u64> {
    socks.iter().map(|s| s.cookie).collect()
}

/// A reported leak must agree with the kernel's view of the same socket:
/// addresses exactly as ss prints them, and the fd (when given) under which
/// the reported pid holds it.
fn check_leak_against_ss(leak: &Leak, truth: &[SsSocket], ctx: &str) {
    let s = truth
        .iter()
        .find(|s| s.cookie == leak.cookie)
        .unwrap_or_else(|| panic!("leak {} not in ss close-wait\n{ctx}", leak.json));
    assert_eq!(
        (leak.raw_local(), leak.raw_remote()),
        (s.local.as_str(), s.remote.as_str()),
        "leak addresses differ from ss for cookie {}: {}\n{ctx}",
        leak.cookie,
        leak.json
    );
    assert!(
        s.has_pid(leak.pid),
        "leak pid {} does not hold the socket according to ss ({})\n{ctx}",
        leak.pid,
        s.line
    );
    if let Some(fd) = leak.fd {
        assert_eq!(
            Some(fd),
            s.fd_of(leak.pid),
            "leak fd differs from ss for cookie {}: {}\n{ctx}",
            leak.cookie,
            leak.json
        );
    }
    assert_eq!(leak.comm, "tcp-fixture", "comm: {}\n{ctx}", leak.json);
    assert!(
        leak.cmdline.contains("tcp-fixture"),
        "cmdline should be the fixture's command line: {}\n{ctx}",
        leak.json
    );
}

/// Ground-truth sanity: the fixture's sockets towards the server are in
/// CLOSE_WAIT, held by the expected process under the fds it printed.
fn check_fixture_truth(truth: &[&SsSocket], owner: &Child, socks: &[tracer_tests::SockLine]) {
    let pid = owner.pid();
    let want: BTreeSet<(&str, &str, i32)> = socks
        .iter()
        .map(|s| (s.local.as_str(), s.remote.as_str(), s.fd))
        .collect();
    let got: BTreeSet<(&str, &str, i32)> = truth
        .iter()
        .filter(|s| s.has_pid(pid))
        .map(|s| (s.local.as_str(), s.remote.as_str(), s.fd_of(pid).unwrap_or(-1)))
        .collect();
    assert_eq!(
        got,
        want,
        "fixture sanity: ss close-wait sockets of {} (pid {pid}) differ from what it printed\n{}",
        owner.name(),
        truth.iter().map(|s| format!("  {}\n", s.line)).collect::<String>()
    );
}

/// Host-wide: every socket the tracer calls leaked (summary or `leak`
/// event, any port, any process) must have been in CLOSE_WAIT according to
/// the kernel, with the same addresses. `seen` is every close-wait socket ss
/// showed during the run plus `truth` (sampled right after exit); sockets of
/// other processes may legitimately be closed before the last sample.
fn assert_no_false_leaks(out: &TracerOutput, seen: &BTreeMap<u64, SsSocket>, truth: &[SsSocket], ctx: &str) {
    let mut all = seen.clone();
    for s in truth {
        all.entry(s.cookie).or_insert_with(|| s.clone());
    }
    let mut reported = out.summary_leaks();
    reported.extend(out.leak_events("leak"));
    let mut false_leaks = String::new();
    for leak in &reported {
        match all.get(&leak.cookie) {
            None => {
                let _ = writeln!(false_leaks, "  never in CLOSE_WAIT per ss: {}", leak.json);
            }
            Some(s) if (s.local.as_str(), s.remote.as_str()) != (leak.raw_local(), leak.raw_remote()) => {
                let _ = writeln!(false_leaks, "  addresses differ from ss ({}): {}", s.line, leak.json);
            }
            Some(_) => {}
        }
    }
    assert!(
        false_leaks.is_empty(),
        "false leaks reported (host-wide):\n{false_leaks}\n--- every close-wait socket ss showed during the run:\n{}\n{ctx}",
        all.values().map(|s| format!("  {}\n", s.line)).collect::<String>()
    );
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn leaking_and_closing_clients_host_wide() {
    if !require_privileges() {
        return;
    }
    let (server, port) = spawn_server("127.0.0.1:0", &["--reply", "26"]);
    let server_addr = format!("127.0.0.1:{port}");

    let monitor = SsMonitor::start("close-wait");
    let mut tracer = run_tracer(&["--leak-after", "1s", "--duration", "6s"]);
    let start = tracer.wait_started(START_TIMEOUT);
    check_start(&start, None, LEAK_AFTER_MS);

    let (leaky, leaky_socks) = spawn_client(&["--connect", &server_addr, "--count", "5", "--mode", "leak", "--read"]);
    let (good, good_socks) = spawn_client(&["--connect", &server_addr, "--count", "5", "--mode", "close"]);

    let out = tracer.finish(Duration::from_secs(6) + EXIT_SLACK);
    // Sampled right after the tracer exited; both clients still run.
    let truth = ss_sockets("close-wait");
    let seen = monitor.stop();
    let ctx = context(&out, &truth);
    out.assert_success();
    check_summary_shape(&out);

    // Ground truth: exactly the leaky client's 5 sockets, none of the good
    // client's.
    let truth_here: Vec<&SsSocket> = truth.iter().filter(|s| s.remote == server_addr).collect();
    check_fixture_truth(&truth_here, &leaky, &leaky_socks);
    for g in &good_socks {
        assert!(
            !truth.iter().any(|s| s.local == g.local),
            "fixture sanity: the well-behaved client's socket {} is in CLOSE_WAIT\n{ctx}",
            g.local
        );
    }

    let leaks = out.summary_leaks();
    let here: Vec<&Leak> = leaks.iter().filter(|l| port_of(&l.remote) == Some(port)).collect();
    assert_same_cookies(&cookies(&here), &ss_cookies(&truth_here), &ctx);
    let duration_ms = summary_duration_ms(&out);
    for leak in &here {
        assert_eq!(
            leak.pid,
            leaky.pid(),
            "leak attributed to the wrong process (server {}, good client {}): {}\n{ctx}",
            server.pid(),
            good.pid(),
            leak.json
        );
        check_leak_against_ss(leak, &truth, &ctx);
        assert!(
            !leak.close_wait_estimated,
            "CLOSE_WAIT entered while tracing, so its age is known: {}\n{ctx}",
            leak.json
        );
        assert!(
            leak.close_wait_ms >= LEAK_AFTER_MS && leak.close_wait_ms <= duration_ms + 250,
            "close_wait_ms should be in [leak_after, duration_ms={duration_ms}]: {}\n{ctx}",
            leak.json
        );
    }

    // Each of them was also announced once, while it happened, and none was
    // closed.
    let events = out.leak_events("leak");
    let events_here: Vec<&Leak> = events.iter().filter(|l| port_of(&l.remote) == Some(port)).collect();
    assert_same_cookies(&cookies(&events_here), &ss_cookies(&truth_here), &ctx);
    let late = out.leak_events("late_close");
    assert!(
        !late.iter().any(|l| port_of(&l.remote) == Some(port)),
        "late_close for a socket that was never closed\n{ctx}"
    );
    for l in events.iter().chain(&leaks).chain(&late) {
        assert!(
            l.pid != good.pid() && l.pid != server.pid(),
            "leak reported for a process that closes its sockets: {}\n{ctx}",
            l.json
        );
    }

    assert_no_false_leaks(&out, &seen, &truth, &ctx);
}

#[test]
fn ipv6_and_ipv4_mapped() {
    if !require_privileges() {
        return;
    }
    // Dual stack: IPV6_V6ONLY off, so IPv4-mapped connections arrive too.
    let (_server, port) = spawn_server("[::]:0", &["--reply", "26"]);
    let v6_addr = format!("[::1]:{port}");
    let mapped_addr = format!("[::ffff:127.0.0.1]:{port}");

    let mut tracer = run_tracer(&["--leak-after", "1s", "--duration", "6s"]);
    let start = tracer.wait_started(START_TIMEOUT);
    check_start(&start, None, LEAK_AFTER_MS);

    let leak_args = |addr: &str| -> Vec<String> {
        ["--connect", addr, "--count", "3", "--mode", "leak", "--read"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let a6 = leak_args(&v6_addr);
    let am = leak_args(&mapped_addr);
    let (c6, socks6) = spawn_client(&a6.iter().map(String::as_str).collect::<Vec<_>>());
    let (cm, socksm) = spawn_client(&am.iter().map(String::as_str).collect::<Vec<_>>());

    let out = tracer.finish(Duration::from_secs(6) + EXIT_SLACK);
    let truth = ss_sockets("close-wait");
    let ctx = context(&out, &truth);
    out.assert_success();
    check_summary_shape(&out);

    let truth6: Vec<&SsSocket> = truth.iter().filter(|s| s.remote == v6_addr).collect();
    let truthm: Vec<&SsSocket> = truth.iter().filter(|s| s.remote == mapped_addr).collect();
    check_fixture_truth(&truth6, &c6, &socks6);
    check_fixture_truth(&truthm, &cm, &socksm);
    let truth_here: Vec<&SsSocket> = truth6.iter().chain(&truthm).copied().collect();

    let leaks = out.summary_leaks();
    let here: Vec<&Leak> = leaks.iter().filter(|l| port_of(l.raw_remote()) == Some(port)).collect();
    assert_same_cookies(&cookies(&here), &ss_cookies(&truth_here), &ctx);
    for leak in &here {
        for addr in [leak.raw_local(), leak.raw_remote()] {
            assert!(
                addr.starts_with('[') && addr.contains("]:"),
                "IPv6 address not in [..]:port form: {addr:?} in {}\n{ctx}",
                leak.json
            );
        }
        let (want_pid, want_remote) = if truth6.iter().any(|s| s.cookie == leak.cookie) {
            (c6.pid(), &v6_addr)
        } else {
            (cm.pid(), &mapped_addr)
        };
        assert_eq!(leak.pid, want_pid, "wrong pid: {}\n{ctx}", leak.json);
        assert_eq!(leak.raw_remote(), want_remote, "remote: {}\n{ctx}", leak.json);
        check_leak_against_ss(leak, &truth, &ctx);
    }
}

#[test]
fn pid_filter_one_of_two() {
    if !require_privileges() {
        return;
    }
    let (_server, port) = spawn_server("127.0.0.1:0", &["--reply", "26"]);
    let server_addr = format!("127.0.0.1:{port}");
    let args = [
        "--connect",
        &server_addr,
        "--count",
        "3",
        "--mode",
        "leak",
        "--read",
        "--wait-stdin-line",
    ];
    // Both exist before the tracer starts (required by --pid), and connect
    // only once it runs.
    let mut a = start_client(&args);
    let mut b = start_client(&args);
    let a_pid = a.pid().to_string();

    let mut tracer = run_tracer(&["--pid", &a_pid, "--leak-after", "1s", "--duration", "5s"]);
    let start = tracer.wait_started(START_TIMEOUT);
    check_start(&start, Some(a.pid()), LEAK_AFTER_MS);
    a.send_line("go");
    b.send_line("go");
    let a_socks = wait_client_done(&mut a, 3);
    let b_socks = wait_client_done(&mut b, 3);

    let out = tracer.finish(Duration::from_secs(5) + EXIT_SLACK);
    let truth = ss_sockets("close-wait");
    let ctx = context(&out, &truth);
    out.assert_success();
    check_summary_shape(&out);

    let truth_here: Vec<&SsSocket> = truth.iter().filter(|s| s.remote == server_addr).collect();
    check_fixture_truth(&truth_here, &a, &a_socks);
    check_fixture_truth(&truth_here, &b, &b_socks);
    let truth_a: Vec<&SsSocket> = truth_here.iter().filter(|s| s.has_pid(a.pid())).copied().collect();
    let b_cookies: BTreeSet<u64> = truth_here
        .iter()
        .filter(|s| s.has_pid(b.pid()))
        .map(|s| s.cookie)
        .collect();

    let leaks = out.summary_leaks();
    let events = out.leak_events("leak");
    for l in leaks.iter().chain(&events).chain(&out.leak_events("late_close")) {
        assert_eq!(
            l.pid,
            a.pid(),
            "--pid {a_pid} reported another process's socket (B is {}): {}\n{ctx}",
            b.pid(),
            l.json
        );
        assert!(
            !b_cookies.contains(&l.cookie),
            "B's socket reported under --pid A: {}\n{ctx}",
            l.json
        );
    }
    let all: Vec<&Leak> = leaks.iter().collect();
    assert_same_cookies(&cookies(&all), &ss_cookies(&truth_a), &ctx);
    for leak in &all {
        check_leak_against_ss(leak, &truth, &ctx);
    }
}

#[test]
fn preexisting_leak_is_found() {
    if !require_privileges() {
        return;
    }
    let (_server, port) = spawn_server("127.0.0.1:0", &["--reply", "26"]);
    let server_addr = format!("127.0.0.1:{port}");
    let (client, socks) = spawn_client(&["--connect", &server_addr, "--count", "4", "--mode", "leak", "--read"]);
    // The leak exists before the tracer starts.
    wait_for_ss(
        "close-wait",
        Duration::from_secs(5),
        "the client's 4 sockets in CLOSE_WAIT",
        |snap| {
            snap.iter()
                .filter(|s| s.remote == server_addr && s.has_pid(client.pid()))
                .count()
                == 4
        },
    );

    let mut tracer = run_tracer(&["--leak-after", "1s", "--duration", "4s"]);
    let start = tracer.wait_started(START_TIMEOUT);
    check_start(&start, None, LEAK_AFTER_MS);
    let out = tracer.finish(Duration::from_secs(4) + EXIT_SLACK);
    let truth = ss_sockets("close-wait");
    let ctx = context(&out, &truth);
    out.assert_success();
    check_summary_shape(&out);

    let truth_here: Vec<&SsSocket> = truth.iter().filter(|s| s.remote == server_addr).collect();
    check_fixture_truth(&truth_here, &client, &socks);

    let leaks = out.summary_leaks();
    let here: Vec<&Leak> = leaks.iter().filter(|l| port_of(&l.remote) == Some(port)).collect();
    assert_same_cookies(&cookies(&here), &ss_cookies(&truth_here), &ctx);
    for leak in &here {
        assert_eq!(leak.pid, client.pid(), "wrong pid: {}\n{ctx}", leak.json);
        check_leak_against_ss(leak, &truth, &ctx);
        assert!(
            leak.close_wait_estimated,
            "CLOSE_WAIT began before the tracer started, so its age can only be estimated: {}\n{ctx}",
            leak.json
        );
        assert!(leak.close_wait_ms > 0, "close_wait_ms: {}\n{ctx}", leak.json);
    }
    // Found at startup, they have been in CLOSE_WAIT longer than
    // --leak-after by the end, so each is announced as a leak too.
    let events = out.leak_events("leak");
    let events_here: Vec<&Leak> = events.iter().filter(|l| port_of(&l.remote) == Some(port)).collect();
    assert_same_cookies(&cookies(&events_here), &ss_cookies(&truth_here), &ctx);
}

#[test]
fn server_side_leak_attributed_to_server() {
    if !require_privileges() {
        return;
    }
    let (server, port) = spawn_server("127.0.0.1:0", &["--never-close"]);
    let server_addr = format!("127.0.0.1:{port}");

    let mut tracer = run_tracer(&["--leak-after", "1s", "--duration", "6s"]);
    let start = tracer.wait_started(START_TIMEOUT);
    check_start(&start, None, LEAK_AFTER_MS);

    // The client closes right away. On loopback the server socket's move to
    // CLOSE_WAIT runs in the client's context, but the server holds it.
    let (client, _socks) = spawn_client(&["--connect", &server_addr, "--count", "4", "--mode", "close-now"]);
    wait_for_ss(
        "close-wait",
        Duration::from_secs(5),
        "the server's 4 accepted sockets in CLOSE_WAIT, held by the server",
        |snap| {
            snap.iter()
                .filter(|s| s.local == server_addr && s.has_pid(server.pid()))
                .count()
                == 4
        },
    );

    let out = tracer.finish(Duration::from_secs(6) + EXIT_SLACK);
    let truth = ss_sockets("close-wait");
    let ctx = context(&out, &truth);
    out.assert_success();
    check_summary_shape(&out);

    let truth_here: Vec<&SsSocket> = truth.iter().filter(|s| s.local == server_addr).collect();
    assert_eq!(truth_here.len(), 4, "fixture sanity\n{ctx}");
    assert!(
        truth_here
            .iter()
            .all(|s| s.has_pid(server.pid()) && !s.has_pid(client.pid())),
        "fixture sanity: the server should hold its CLOSE_WAIT sockets\n{ctx}"
    );

    let leaks = out.summary_leaks();
    let here: Vec<&Leak> = leaks.iter().filter(|l| port_of(&l.local) == Some(port)).collect();
    assert_same_cookies(&cookies(&here), &ss_cookies(&truth_here), &ctx);
    for leak in &here {
        assert_eq!(
            leak.pid,
            server.pid(),
            "server-side leak attributed to pid {} (server {}, client {}): {}\n{ctx}",
            leak.pid,
            server.pid(),
            client.pid(),
            leak.json
        );
        check_leak_against_ss(leak, &truth, &ctx);
    }
    for l in leaks.iter().chain(&out.leak_events("leak")) {
        assert_ne!(l.pid, client.pid(), "leak blamed on the client: {}\n{ctx}", l.json);
    }
}

#[test]
fn pid_exit_ends_trace() {
    if !require_privileges() {
        return;
    }
    let (_server, port) = spawn_server("127.0.0.1:0", &["--reply", "26"]);
    let server_addr = format!("127.0.0.1:{port}");
    let mut client = start_client(&[
        "--connect",
        &server_addr,
        "--count",
        "2",
        "--mode",
        "leak",
        "--read",
        "--wait-stdin-line",
    ]);
    let pid = client.pid();

    // No --duration: only the process's exit ends the trace.
    let mut tracer = run_tracer(&["--pid", &pid.to_string(), "--leak-after", "1s"]);
    let start = tracer.wait_started(START_TIMEOUT);
    check_start(&start, Some(pid), LEAK_AFTER_MS);
    client.send_line("go");
    wait_client_done(&mut client, 2);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        tracer.is_running(),
        "tracer exited before the --pid process did\n{}",
        tracer.child().describe()
    );

    client.close_stdin();
    let status = client
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("fixture client ignored stdin EOF\n{}", client.describe()));
    assert!(status.success(), "fixture client failed\n{}", client.describe());
    let exited = Instant::now();

    let out = tracer.finish(Duration::from_secs(5));
    let took = exited.elapsed();
    out.assert_success();
    check_summary_shape(&out);
    let exits = out.of_type("process_exit");
    assert_eq!(
        exits.len(),
        1,
        "expected one process_exit (after {took:?})\n{}",
        out.dump()
    );
    assert_eq!(
        exits[0].get("pid").and_then(Value::as_u64),
        Some(u64::from(pid)),
        "process_exit pid\n{}",
        out.dump()
    );
    let pos = |ty: &str| {
        out.objects
            .iter()
            .position(|o| o.get("type").and_then(Value::as_str) == Some(ty))
    };
    assert!(
        pos("process_exit") < pos("summary"),
        "process_exit must come before the summary\n{}",
        out.dump()
    );
}

#[test]
fn bad_input_is_one_line_error() {
    // Runs without root: argument errors must come before any privileged
    // work (and are reported the same way as root).
    let cases: [&[&str]; 3] = [
        &["live", "--pid", "999999999"],
        &["live", "--leak-after", "banana"],
        &["live", "--no-stacks", "--kernel-stacks"],
    ];
    for args in cases {
        // The message must not depend on how the user's shell is set up.
        for backtrace in [None, Some("1")] {
            let mut cmd = Command::new(tracer_bin());
            cmd.args(args).env_remove("RUST_LOG").env_remove("RUST_LIB_BACKTRACE");
            match backtrace {
                Some(v) => cmd.env("RUST_BACKTRACE", v),
                None => cmd.env_remove("RUST_BACKTRACE"),
            };
            let what = format!("tracer {} (RUST_BACKTRACE={backtrace:?})", args.join(" "));
            let mut child = Child::spawn(&what, cmd);
            let status = child
                .wait_finished(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("{what} did not exit\n{}", child.describe()));
            let stderr = child.stderr_text();
            let lines: Vec<&str> = stderr.lines().collect();
            assert!(!status.success(), "{what} should fail\n{}", child.describe());
            assert!(
                lines.len() == 1 && !lines[0].trim().is_empty(),
                "{what}: stderr should be exactly one non-empty line, got {}:\n{stderr}",
                lines.len()
            );
            let lower = stderr.to_lowercase();
            assert!(
                !lower.contains("panicked") && !lower.contains("backtrace"),
                "{what}: panic or backtrace on stderr:\n{stderr}"
            );
        }
    }
}
