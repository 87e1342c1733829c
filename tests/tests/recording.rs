//! Recordings (issue 4): `tracer record`, then `tracer report` and
//! `tracer export` on the file, checked against `tracer live` running at the
//! same time, against `ss`, and against each other; and damaged or bogus
//! files, which must never crash the reader.
//!
//! Like the other suites, every test has its own server on a random port
//! and only compares sockets of that port with the kernel, so they run in
//! parallel with each other and with anything else on the machine. The
//! reports are made after the traced processes are gone: a recording must
//! carry everything its analysis needs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracer_tests::recording::{hex_around, parse_layout, with_version, Layout, Rng};
use tracer_tests::{
    assert_same_cookies, format_ss, format_stack, port_of, require_privileges, run_tracer, run_tracer_cmd,
    spawn_client, spawn_server, ss_sockets, stack_has, start_client, start_recorder, wait_client_done, wait_for_ss,
    Child, Evidence, Group, Leak, Ran, RecordOutput, SockLine, SsSocket, TempFile, TracerOutput, Value,
};

// The timeouts only guard against hangs: on an idle machine each test takes
// a few seconds, but a host-wide recording on a host under heavy TCP load
// (a load generator next to the tests) is large and slow to start, stop
// and read.

/// Loading and attaching the eBPF programs, and the start-up snapshot.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Slack on top of `--duration` for a tracer to finish and exit.
const EXIT_SLACK: Duration = Duration::from_secs(30);
/// `report` or `export` of one recording.
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// `--leak-after 1s`, as `start.leak_after_ms` must echo it.
const LEAK_AFTER_MS: u64 = 1000;
/// The server's reply: what a client that never reads leaves unread.
const REPLY: u64 = 26;
/// Where the fixture's own frames are (the module path's end).
const FIXTURE_MODULE: &str = "tcp-fixture";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A fixture server replying [`REPLY`] bytes then closing.
fn server() -> (Child, u16, String) {
    let reply = REPLY.to_string();
    let (child, port) = spawn_server("127.0.0.1:0", &["--reply", &reply]);
    (child, port, format!("127.0.0.1:{port}"))
}

/// A client that opens `count` connections and never reads nor closes them.
fn leaky_client(server_addr: &str, count: usize) -> (Child, Vec<SockLine>) {
    let count = count.to_string();
    spawn_client(&["--connect", server_addr, "--count", &count, "--mode", "leak"])
}

/// A client that reads each connection to the FIN, then closes it.
fn good_client(server_addr: &str, count: usize) -> (Child, Vec<SockLine>) {
    let count = count.to_string();
    spawn_client(&["--connect", server_addr, "--count", &count, "--mode", "close"])
}

/// Records, with `--pid`, a client that opens `count` connections once the
/// recorder runs and never reads nor closes them: the recording holds its
/// sockets and nothing else, whatever runs on the host. Returns the client
/// (still running) and the recorder's output.
fn record_leaky_client(server_addr: &str, file: &TempFile, count: usize, duration_s: u64) -> (Child, RecordOutput) {
    let count_arg = count.to_string();
    let mut client = start_client(&[
        "--connect",
        server_addr,
        "--count",
        &count_arg,
        "--mode",
        "leak",
        "--wait-stdin-line",
    ]);
    let pid = client.pid().to_string();
    let duration = format!("{duration_s}s");
    let mut recorder = start_recorder(
        file.arg(),
        &["--pid", &pid, "--leak-after", "1s", "--duration", &duration],
    );
    recorder.wait_recording(START_TIMEOUT);
    client.send_line("go");
    wait_client_done(&mut client, count);
    wait_leaked(server_addr, &client, count);
    let rec = recorder.finish(Duration::from_secs(duration_s) + EXIT_SLACK);
    (client, rec)
}

/// Waits until ss shows the `count` sockets of `client` to the server in
/// CLOSE_WAIT with the reply and the FIN queued (`DONE` may come before
/// the FIN of a client that does not read).
fn wait_leaked(server_addr: &str, client: &Child, count: usize) {
    let pid = client.pid();
    wait_for_ss(
        "close-wait",
        Duration::from_secs(15),
        "the leaky client's sockets in CLOSE_WAIT with the reply and the FIN queued",
        |snap| {
            snap.iter()
                .filter(|s| s.remote == server_addr && s.has_pid(pid) && s.recv_q == REPLY + 1)
                .count()
                == count
        },
    );
}

/// ss's CLOSE_WAIT sockets to `server_addr`.
fn close_wait_to(server_addr: &str) -> Vec<SsSocket> {
    ss_sockets("close-wait")
        .into_iter()
        .filter(|s| s.remote == server_addr)
        .collect()
}

fn remote_port(v: &Value) -> Option<u16> {
    v.get("remote").and_then(Value::as_str).and_then(port_of)
}

/// Leak objects of type `ty` (`summary` for the summary's leaks, or `leak`
/// / `late_close` events) on connections to `port`, with their evidence.
/// Only those are parsed: other sockets on the host are not this test's.
fn leaks_on_port(out: &TracerOutput, ty: &str, port: u16) -> Vec<Evidence> {
    let objects: Vec<&Value> = if ty == "summary" {
        out.leaks().iter().collect()
    } else {
        out.of_type(ty)
    };
    objects
        .into_iter()
        .filter(|v| remote_port(v) == Some(port))
        .map(Evidence::from_json)
        .collect()
}

fn cookies(leaks: &[Evidence]) -> Vec<u64> {
    leaks.iter().map(|e| e.leak.cookie).collect()
}

fn ss_cookies(truth: &[SsSocket]) -> Vec<u64> {
    truth.iter().map(|s| s.cookie).collect()
}

/// Every cookie in a leak object (summary leaks, `leak` and `late_close`
/// events), any port.
fn all_leak_cookies(out: &TracerOutput) -> BTreeSet<u64> {
    out.leaks()
        .iter()
        .chain(out.of_type("leak"))
        .chain(out.of_type("late_close"))
        .filter_map(|v| v.get("cookie").and_then(Value::as_u64))
        .collect()
}

/// `text`, cut to a size fit for an assertion message.
fn capped(text: String) -> String {
    const MAX: usize = 8000;
    if text.len() <= MAX {
        return text;
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[... {} more bytes]", &text[..end], text.len() - end)
}

/// What a report or live output says about connections to `port` (the
/// start, leak objects, and the summary with only those leaks and groups),
/// for assertion messages: a host-wide output can be huge.
fn dump_port(out: &TracerOutput, port: u16) -> String {
    let mut text = format!(
        "tracer exit status: {}\n--- stdout (connections to port {port} only):\n",
        out.status
    );
    for o in &out.objects {
        let ty = o.get("type").and_then(Value::as_str).unwrap_or_default();
        let shown = match ty {
            "summary" => {
                let mut s = o.clone();
                for list in ["leaks", "groups"] {
                    if let Some(Value::Array(items)) = s.get_mut(list) {
                        items.retain(|v| remote_port(v) == Some(port));
                    }
                }
                s
            }
            "start" => o.clone(),
            _ if remote_port(o) == Some(port) => o.clone(),
            _ => continue,
        };
        text.push_str(&format!("  {shown}\n"));
    }
    text.push_str(&format!("--- stderr:\n{}", out.stderr));
    text
}

/// A leak must agree with the kernel's view of its socket: addresses as ss
/// prints them, held by the reported pid under the reported fd, and
/// `unread_bytes` = Recv-Q minus the FIN.
fn check_against_ss(e: &Evidence, truth: &[SsSocket], ctx: &str) {
    let s = truth
        .iter()
        .find(|s| s.cookie == e.leak.cookie)
        .unwrap_or_else(|| panic!("leak not in ss close-wait: {}\n{ctx}", e.leak.json));
    assert_eq!(
        (e.leak.raw_local(), e.leak.raw_remote()),
        (s.local.as_str(), s.remote.as_str()),
        "addresses differ from ss ({}): {}\n{ctx}",
        s.line,
        e.leak.json
    );
    assert!(
        s.has_pid(e.leak.pid),
        "pid {} does not hold the socket per ss ({}): {}\n{ctx}",
        e.leak.pid,
        s.line,
        e.leak.json
    );
    assert_eq!(
        e.leak.fd,
        s.fd_of(e.leak.pid),
        "fd differs from ss ({}): {}\n{ctx}",
        s.line,
        e.leak.json
    );
    assert_eq!(
        e.unread_bytes,
        s.recv_q.saturating_sub(1),
        "unread_bytes should be ss Recv-Q minus the FIN ({}): {}\n{ctx}",
        s.line,
        e.leak.json
    );
    assert_eq!(e.leak.comm, "tcp-fixture", "comm: {}\n{ctx}", e.leak.json);
}

/// Permission bits of a file.
fn mode_of(file: &TempFile) -> u32 {
    std::fs::metadata(file.path())
        .unwrap_or_else(|e| panic!("stat {}: {e}", file.arg()))
        .permissions()
        .mode()
        & 0o7777
}

/// The recorder's own contract at a clean end: exit 0, nothing on stdout,
/// `tracer: wrote FILE` on stderr, a 0600 file.
fn check_recorder_finished(rec: &RecordOutput, file: &TempFile) {
    assert!(rec.status.success(), "tracer record failed\n{}", rec.dump());
    assert!(
        rec.stdout_lines.is_empty(),
        "tracer record must print nothing on stdout\n{}",
        rec.dump()
    );
    let wrote = format!("tracer: wrote {}", file.arg());
    assert!(
        rec.stderr.lines().any(|l| l.starts_with(&wrote)),
        "no {wrote:?} line on stderr\n{}",
        rec.dump()
    );
    assert_eq!(mode_of(file), 0o600, "the recording's mode\n{}", rec.dump());
}

/// `report` damage contract: every damage string is printed on stderr as a
/// `tracer: warning: ...` line, and there is no warning without damage.
fn check_warnings(ran: &Ran, damage: &[String], ctx: &str) {
    let warnings: Vec<&str> = ran
        .stderr_lines()
        .into_iter()
        .filter(|l| l.starts_with("tracer: warning: "))
        .collect();
    if damage.is_empty() {
        assert!(
            warnings.is_empty(),
            "warnings without any damage in the summary\n{}\n{ctx}",
            ran.describe()
        );
    }
    for d in damage {
        assert!(
            warnings.iter().any(|l| l.contains(d.as_str())),
            "damage {d:?} is not printed as a `tracer: warning:` line on stderr\n{}\n{ctx}",
            ran.describe()
        );
    }
}

/// `report --json FILE`, which must succeed with JSON lines.
fn run_report(file: &TempFile) -> (Ran, TracerOutput) {
    let ran = run_tracer_cmd(&["report", "--json", file.arg()], CMD_TIMEOUT);
    ran.assert_no_crash();
    ran.assert_success();
    let out = ran.output();
    (ran, out)
}

/// The summary is the one and last object, with groups and stats.
fn check_report_shape(out: &TracerOutput) {
    let s = out.summary();
    assert!(
        s.get("groups").is_some_and(Value::is_array) && s.get("stats").is_some_and(Value::is_object),
        "summary.groups / summary.stats missing\n{}",
        capped(out.dump())
    );
    assert_eq!(
        out.objects.last().and_then(|o| o.get("type")).and_then(Value::as_str),
        Some("summary"),
        "the summary must be the last line\n{}",
        capped(out.dump())
    );
    assert_eq!(
        out.start().get("leak_after_ms").and_then(Value::as_u64),
        Some(LEAK_AFTER_MS),
        "without --leak-after, report uses the recording's threshold\n{}",
        capped(out.dump())
    );
}

/// What must be the same whether a leak was found live or from a
/// recording.
fn comparable(e: &Evidence) -> Value {
    let mut holders = e.holders.clone();
    holders.sort();
    let frames = |stack: &[tracer_tests::Frame]| -> Vec<String> {
        stack
            .iter()
            .map(|f| format!("{:#x} {:?} {:?} {:?} {}", f.ip, f.symbol, f.module, f.offset, f.kernel))
            .collect()
    };
    serde_json::json!({
        "cookie": e.leak.cookie,
        "pid": e.leak.pid,
        "comm": e.leak.comm,
        "cmdline": e.leak.cmdline,
        "local": e.leak.raw_local(),
        "remote": e.leak.raw_remote(),
        "fd": e.leak.fd,
        "close_wait_estimated": e.leak.close_wait_estimated,
        "owner_source": e.leak.json.get("owner_source"),
        "unread_bytes": e.unread_bytes,
        "unread_bytes_at_fin": e.unread_bytes_at_fin,
        "holders": holders.iter().map(|h| format!("{} {} {}", h.pid, h.comm, h.fd)).collect::<Vec<_>>(),
        "open_stack": frames(&e.open_stack),
    })
}

// ---------------------------------------------------------------------------
// a. report = live = ss
// ---------------------------------------------------------------------------

#[test]
fn report_matches_live_and_ss() {
    if !require_privileges() {
        return;
    }
    let (server, port, server_addr) = server();
    let file = TempFile::new("live-vs-report.trc");
    // Both start loading at once; clients connect once both are tracing.
    let mut recorder = start_recorder(file.arg(), &["--leak-after", "1s", "--duration", "6s"]);
    let mut live = run_tracer(&["--leak-after", "1s", "--duration", "6s"]);
    recorder.wait_recording(START_TIMEOUT);
    live.wait_started(START_TIMEOUT);

    let (leaky, leaky_socks) = leaky_client(&server_addr, 4);
    let (good, good_socks) = good_client(&server_addr, 4);
    wait_leaked(&server_addr, &leaky, 4);

    let live_out = live.finish(Duration::from_secs(6) + EXIT_SLACK);
    let rec = recorder.finish(Duration::from_secs(6) + EXIT_SLACK);
    let truth = close_wait_to(&server_addr);
    let (leaky_pid, good_pid, server_pid) = (leaky.pid(), good.pid(), server.pid());
    // The report is made once every traced process is gone.
    drop((leaky, good, server));
    let (ran, report) = run_report(&file);
    let ctx = format!(
        "=== report:\n{}\n=== live:\n{}\n=== ss close-wait to {server_addr} (right after both tracers exited):\n{}\n\
         leaky client {leaky_pid}, good client {good_pid}, server {server_pid}",
        dump_port(&report, port),
        dump_port(&live_out, port),
        format_ss(&truth)
    );
    check_recorder_finished(&rec, &file);
    live_out.assert_success();
    check_report_shape(&report);
    check_warnings(&ran, &[], &ctx);

    let info = report.recording();
    assert_eq!(info.files, vec![file.arg().to_string()], "recording.files\n{ctx}");
    assert!(
        !info.ended_early && info.damage.is_empty(),
        "a clean recording: {info:?}\n{ctx}"
    );
    assert!(info.records > 0, "recording.records: {info:?}\n{ctx}");

    // Ground truth: exactly the leaky client's sockets, as it printed them.
    let want: BTreeSet<(String, i32)> = leaky_socks.iter().map(|s| (s.local.clone(), s.fd)).collect();
    let got: BTreeSet<(String, i32)> = truth
        .iter()
        .map(|s| (s.local.clone(), s.fd_of(leaky_pid).unwrap_or(-1)))
        .collect();
    assert_eq!(got, want, "fixture sanity: ss vs the leaky client's SOCK lines\n{ctx}");

    let rep = leaks_on_port(&report, "summary", port);
    let liv = leaks_on_port(&live_out, "summary", port);
    assert_same_cookies(
        &cookies(&rep),
        &ss_cookies(&truth),
        &format!("report summary vs ss\n{ctx}"),
    );
    assert_same_cookies(
        &cookies(&liv),
        &ss_cookies(&truth),
        &format!("live summary vs ss\n{ctx}"),
    );
    let rep_events = leaks_on_port(&report, "leak", port);
    assert_same_cookies(
        &cookies(&rep_events),
        &ss_cookies(&truth),
        &format!("report leak events vs ss\n{ctx}"),
    );
    assert!(
        leaks_on_port(&report, "late_close", port).is_empty(),
        "late_close in the report for sockets never closed\n{ctx}"
    );

    let live_by_cookie: BTreeMap<u64, &Evidence> = liv.iter().map(|e| (e.leak.cookie, e)).collect();
    for e in rep.iter().chain(&rep_events) {
        assert_eq!(e.leak.pid, leaky_pid, "owner: {}\n{ctx}", e.leak.json);
        assert_eq!(e.unread_bytes, REPLY, "unread_bytes: {}\n{ctx}", e.leak.json);
        check_against_ss(e, &truth, &ctx);
        assert!(
            stack_has(&e.open_stack, "open_connection", FIXTURE_MODULE),
            "open_stack has no open_connection frame:\n{}{}\n{ctx}",
            format_stack(&e.open_stack),
            e.leak.json
        );
    }
    for e in &rep {
        let l = live_by_cookie[&e.leak.cookie];
        assert_eq!(
            comparable(e),
            comparable(l),
            "the report and live differ on cookie {} (left: report, right: live)\n{ctx}",
            e.leak.cookie
        );
    }
    // Each run ends on its own clock, so the ages differ; both are within
    // the run, past the threshold.
    for (what, out, leaks) in [("report", &report, &rep), ("live", &live_out, &liv)] {
        let duration_ms = out.summary()["duration_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: summary.duration_ms\n{ctx}"));
        for e in leaks {
            assert!(
                e.leak.close_wait_ms >= LEAK_AFTER_MS && e.leak.close_wait_ms <= duration_ms + 250,
                "{what}: close_wait_ms should be in [leak_after, duration_ms={duration_ms}]: {}\n{ctx}",
                e.leak.json
            );
        }
    }

    // The well-behaved client's sockets never appear, in either.
    let good_locals: BTreeSet<&str> = good_socks.iter().map(|s| s.local.as_str()).collect();
    for (what, out) in [("report", &report), ("live", &live_out)] {
        for v in out
            .leaks()
            .iter()
            .chain(out.of_type("leak"))
            .chain(out.of_type("late_close"))
        {
            let local = v.get("local").and_then(Value::as_str).map(tracer_tests::normalize_addr);
            assert!(
                v.get("pid").and_then(Value::as_u64) != Some(u64::from(good_pid))
                    && !local.is_some_and(|l| good_locals.contains(l.as_str())),
                "{what} reports a socket of the client that closes them: {v}\n{ctx}"
            );
        }
    }

    // One group for the leaky client, the same in both.
    let group = |out: &TracerOutput| -> Group {
        let gs: Vec<Group> = out.summary()["groups"]
            .as_array()
            .unwrap_or_else(|| panic!("summary.groups\n{ctx}"))
            .iter()
            .filter(|g| g.get("pid").and_then(Value::as_u64) == Some(u64::from(leaky_pid)))
            .map(Group::from_json)
            .collect();
        assert_eq!(gs.len(), 1, "groups of the leaky client: {gs:?}\n{ctx}");
        gs.into_iter().next().expect("one")
    };
    let (rg, lg) = (group(&report), group(&live_out));
    assert_eq!(
        (rg.count, &rg.remote, rg.json.get("unread_bytes")),
        (4, &server_addr, Some(&Value::from(4 * REPLY))),
        "report group: {}\n{ctx}",
        rg.json
    );
    assert_eq!(
        (rg.count, &rg.remote, rg.json.get("unread_bytes"), &rg.open_stack),
        (lg.count, &lg.remote, lg.json.get("unread_bytes"), &lg.open_stack),
        "report vs live group\n{ctx}"
    );
}

// ---------------------------------------------------------------------------
// b. a SIGKILLed recorder leaves a readable file
// ---------------------------------------------------------------------------

#[test]
fn sigkill_mid_recording_is_readable() {
    if !require_privileges() {
        return;
    }
    let (server, port, server_addr) = server();
    let file = TempFile::new("sigkill.trc");
    // No --duration: only the kill ends it.
    let mut recorder = start_recorder(file.arg(), &["--leak-after", "1s"]);
    recorder.wait_recording(START_TIMEOUT);
    let (leaky, _socks) = leaky_client(&server_addr, 4);
    let done = Instant::now();
    wait_leaked(&server_addr, &leaky, 4);
    // Well past --leak-after: the recorder has seen them leak.
    std::thread::sleep(Duration::from_millis(2500).saturating_sub(done.elapsed()));
    assert!(
        recorder.child().is_running(),
        "the recorder stopped by itself\n{}",
        recorder.child().describe()
    );
    let truth = close_wait_to(&server_addr);
    let rec = recorder.kill();
    assert_eq!(rec.status.signal(), Some(libc::SIGKILL), "{}", rec.dump());
    assert_eq!(mode_of(&file), 0o600, "the recording's mode");
    let leaky_pid = leaky.pid();
    drop((leaky, server));

    let (ran, report) = run_report(&file);
    let ctx = format!(
        "=== report:\n{}\n=== recorder:\n{}\n=== ss close-wait to {server_addr} (right before the kill):\n{}",
        dump_port(&report, port),
        rec.dump(),
        format_ss(&truth)
    );
    assert_eq!(truth.len(), 4, "fixture sanity\n{ctx}");
    let info = report.recording();
    assert!(info.ended_early, "a killed recording ended early: {info:?}\n{ctx}");
    assert!(
        !info.damage.is_empty() && info.damage.iter().all(|d| !d.trim().is_empty()),
        "a killed recording has damage to show: {info:?}\n{ctx}"
    );
    check_warnings(&ran, &info.damage, &ctx);

    // The evidence (fd, holders, unread bytes) is gathered a moment after a
    // leak is found, so a recorder killed before that leaves it unknown
    // (null). Whatever is there must be right.
    let base = |ty: &str| -> Vec<Leak> {
        let objects: Vec<&Value> = if ty == "summary" {
            report.leaks().iter().collect()
        } else {
            report.of_type(ty)
        };
        objects
            .into_iter()
            .filter(|v| remote_port(v) == Some(port))
            .map(Leak::from_json)
            .collect()
    };
    let (leaks, events) = (base("summary"), base("leak"));
    let leak_cookies = |v: &[Leak]| v.iter().map(|l| l.cookie).collect::<Vec<_>>();
    assert_same_cookies(
        &leak_cookies(&leaks),
        &ss_cookies(&truth),
        &format!("summary vs ss\n{ctx}"),
    );
    assert_same_cookies(
        &leak_cookies(&events),
        &ss_cookies(&truth),
        &format!("leak events vs ss\n{ctx}"),
    );
    for l in leaks.iter().chain(&events) {
        assert_eq!(l.pid, leaky_pid, "owner: {}\n{ctx}", l.json);
        let s = truth.iter().find(|s| s.cookie == l.cookie).expect("same cookies");
        assert_eq!(
            (l.raw_local(), l.raw_remote()),
            (s.local.as_str(), s.remote.as_str()),
            "addresses differ from ss ({}): {}\n{ctx}",
            s.line,
            l.json
        );
        if let Some(fd) = l.fd {
            assert_eq!(
                Some(fd),
                s.fd_of(leaky_pid),
                "fd differs from ss ({}): {}\n{ctx}",
                s.line,
                l.json
            );
        }
        match l.json.get("unread_bytes") {
            Some(Value::Null) => {}
            Some(n) => assert_eq!(
                n.as_u64(),
                Some(s.recv_q.saturating_sub(1)),
                "unread_bytes should be ss Recv-Q minus the FIN ({}): {}\n{ctx}",
                s.line,
                l.json
            ),
            None => panic!("no unread_bytes: {}\n{ctx}", l.json),
        }
    }
}

// ---------------------------------------------------------------------------
// c. damaged recordings
// ---------------------------------------------------------------------------

/// One way of damaging a file.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Keep only the first N bytes.
    Truncate(usize),
    /// XOR the byte at this offset with a non-zero value.
    Flip(usize, u8),
}

/// `Damage`s applied together.
#[derive(Clone, Debug)]
struct Variant(Vec<Damage>);

impl Variant {
    fn apply(&self, bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        for d in &self.0 {
            if let Damage::Flip(at, x) = *d {
                out[at] ^= x;
            }
        }
        for d in &self.0 {
            if let Damage::Truncate(n) = *d {
                out.truncate(n);
            }
        }
        out
    }

    fn truncated(&self) -> bool {
        self.0.iter().any(|d| matches!(d, Damage::Truncate(_)))
    }

    /// The lowest offset touched: a truncation at N touches N.
    fn first_offset(&self) -> usize {
        self.0
            .iter()
            .map(|d| match *d {
                Damage::Truncate(n) | Damage::Flip(n, _) => n,
            })
            .min()
            .unwrap_or(usize::MAX)
    }
}

/// About 30 deterministic variants: truncations and flips in the header,
/// truncations and flips among the records (also on record boundaries),
/// and both at once.
fn variants(len: usize, layout: &Layout) -> Vec<Variant> {
    let mut rng = Rng::new(0x7ACE_2C3D);
    let h = layout.header_end;
    let mut v = Vec::new();
    for _ in 0..4 {
        v.push(Variant(vec![Damage::Truncate(rng.range(1, h))]));
    }
    for _ in 0..4 {
        v.push(Variant(vec![Damage::Flip(rng.range(0, h), rng.nonzero_byte())]));
    }
    // The version field and the header length, on purpose.
    v.push(Variant(vec![Damage::Flip(9, 0x80)]));
    v.push(Variant(vec![Damage::Flip(13, 0x01)]));
    // No record at all, then cuts between records.
    v.push(Variant(vec![Damage::Truncate(h)]));
    for _ in 0..2 {
        let (at, _) = layout.records[rng.range(1, layout.records.len())];
        v.push(Variant(vec![Damage::Truncate(at)]));
    }
    for _ in 0..7 {
        v.push(Variant(vec![Damage::Truncate(rng.range(h + 1, len))]));
    }
    for _ in 0..8 {
        v.push(Variant(vec![Damage::Flip(rng.range(h, len), rng.nonzero_byte())]));
    }
    // A record's length field.
    let (at, _) = layout.records[rng.range(0, layout.records.len())];
    v.push(Variant(vec![Damage::Flip(at + 1, 0x40)]));
    for _ in 0..2 {
        let flip = rng.range(h, len - 1);
        v.push(Variant(vec![
            Damage::Flip(flip, rng.nonzero_byte()),
            Damage::Truncate(rng.range(flip + 1, len)),
        ]));
    }
    v
}

#[test]
fn damaged_recordings_never_panic() {
    if !require_privileges() {
        return;
    }
    let (server, port, server_addr) = server();
    let file = TempFile::new("damage-orig.trc");
    // Only the client's sockets (--pid): what the recording holds, and so
    // what the damage hits, does not depend on what else runs on the host.
    let (client, rec) = record_leaky_client(&server_addr, &file, 3, 3);
    let truth = close_wait_to(&server_addr);
    drop((client, server));
    check_recorder_finished(&rec, &file);

    let (_, original) = run_report(&file);
    let octx = format!("=== original report:\n{}", dump_port(&original, port));
    let here = leaks_on_port(&original, "summary", port);
    assert_same_cookies(
        &cookies(&here),
        &ss_cookies(&truth),
        &format!("original summary vs ss\n{}\n{octx}", format_ss(&truth)),
    );
    let original_records = original.recording().records;
    // A damaged copy can lose leaks, never invent one.
    let allowed = all_leak_cookies(&original);

    let bytes = file.read();
    let layout = parse_layout(&bytes).unwrap_or_else(|e| panic!("the recording's layout: {e}\n{octx}"));
    assert_eq!(layout.version, 1, "format version");
    assert!(layout.records.len() > 3, "too few records to damage: {layout:?}");
    let all = variants(bytes.len(), &layout);
    assert!(all.len() >= 30);

    let damaged = TempFile::new("damaged.trc");
    for (i, variant) in all.iter().enumerate() {
        let copy = variant.apply(&bytes);
        damaged.write(&copy);
        let in_records = variant.first_offset() >= layout.header_end;
        let ctx = format!(
            "variant #{i} {variant:?} of a {}-byte recording (header ends at {}, {} records); bytes {}",
            bytes.len(),
            layout.header_end,
            layout.records.len(),
            hex_around(&bytes, variant.first_offset().min(bytes.len() - 1)),
        );

        let ran = run_tracer_cmd(&["report", "--json", damaged.arg()], CMD_TIMEOUT);
        check_damaged_run(&ran, in_records, &ctx);
        if ran.status.success() {
            let out = ran.output();
            let sums = out.of_type("summary");
            assert_eq!(sums.len(), 1, "one summary\n{}\n{ctx}", ran.describe());
            check_report_shape(&out);
            let info = out.recording();
            assert!(
                !info.damage.is_empty(),
                "damage not reported: {info:?}\n{}\n{ctx}",
                ran.describe()
            );
            assert_eq!(info.files, vec![damaged.arg().to_string()], "recording.files\n{ctx}");
            check_warnings(&ran, &info.damage, &ctx);
            if variant.truncated() {
                assert!(info.ended_early, "a cut file ended early: {info:?}\n{ctx}");
            }
            if in_records {
                assert!(
                    info.records < original_records,
                    "{} records read from a damaged copy of {original_records}\n{ctx}",
                    info.records
                );
            }
            let extra: Vec<u64> = all_leak_cookies(&out).difference(&allowed).copied().collect();
            assert!(
                extra.is_empty(),
                "leaks the intact recording does not have: {extra:?}\n{}\n{ctx}\n{octx}",
                ran.describe()
            );
        }

        let ran = run_tracer_cmd(&["export", "--format", "chrome-trace", damaged.arg()], CMD_TIMEOUT);
        check_damaged_run(&ran, in_records, &ctx);
        if ran.status.success() {
            let doc: Value = serde_json::from_slice(&ran.stdout)
                .unwrap_or_else(|e| panic!("chrome-trace is not JSON: {e}\n{}\n{ctx}", ran.describe()));
            socket_spans(&doc, &ctx);
        }
    }
}

/// Either success or a one-line error; never a crash. Damage after the
/// header is never fatal.
fn check_damaged_run(ran: &Ran, in_records: bool, ctx: &str) {
    assert!(
        ran.status.signal().is_none(),
        "killed by a signal\n{}\n{ctx}",
        ran.describe()
    );
    assert!(!ran.panicked(), "panicked\n{}\n{ctx}", ran.describe());
    if ran.status.success() {
        return;
    }
    assert!(
        !in_records,
        "damage after the header must not be fatal\n{}\n{ctx}",
        ran.describe()
    );
    let lines = ran.stderr_lines();
    assert!(
        lines.len() == 1 && !lines[0].trim().is_empty() && ran.stdout.is_empty(),
        "a failure must be exactly one stderr line and no stdout\n{}\n{ctx}",
        ran.describe()
    );
}

// ---------------------------------------------------------------------------
// d. bad files
// ---------------------------------------------------------------------------

/// The commands that read recordings.
fn readers(path: &str) -> Vec<Vec<String>> {
    let cmds: [&[&str]; 5] = [
        &["report", "--json"],
        &["report"],
        &["export", "--format", "jsonl"],
        &["export", "--format", "chrome-trace"],
        &["export", "--format", "flamegraph"],
    ];
    cmds.iter()
        .map(|c| {
            let mut v: Vec<String> = c.iter().map(|s| s.to_string()).collect();
            v.push(path.to_string());
            v
        })
        .collect()
}

fn assert_all_readers_fail(path: &str, case: &str, must_mention: Option<&str>) {
    for args in readers(path) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ran = run_tracer_cmd(&args, CMD_TIMEOUT);
        let what = format!("{case}: {}", ran.describe());
        assert!(ran.status.signal().is_none() && !ran.panicked(), "crashed on {what}");
        assert!(!ran.status.success(), "accepted {what}");
        let lines = ran.stderr_lines();
        assert!(
            lines.len() == 1 && !lines[0].trim().is_empty(),
            "stderr should be exactly one line for {what}"
        );
        assert!(ran.stdout.is_empty(), "printed on stdout for {what}");
        if let Some(word) = must_mention {
            assert!(
                lines[0].to_lowercase().contains(word),
                "the error should say {word:?} for {what}"
            );
        }
    }
}

#[test]
fn bad_files_are_one_line_errors() {
    // Reading needs no privileges: these run as any user.
    let missing = TempFile::new("missing.trc");
    assert_all_readers_fail(missing.arg(), "a missing file", None);

    let dir = TempFile::new("a-directory");
    std::fs::create_dir(dir.path()).expect("mkdir");
    assert_all_readers_fail(dir.arg(), "a directory", None);

    let empty = TempFile::new("empty.trc");
    empty.write(b"");
    assert_all_readers_fail(empty.arg(), "an empty file", None);

    let random = TempFile::new("random.trc");
    random.write(&Rng::new(4096).bytes(4096));
    assert_all_readers_fail(random.arg(), "4 KiB of random bytes", None);

    let magic_only = TempFile::new("magic-only.trc");
    magic_only.write(tracer_tests::recording::MAGIC);
    assert_all_readers_fail(magic_only.arg(), "the magic number alone", None);

    // A file from a newer tracer may have another header: the version is
    // checked first.
    let newer = TempFile::new("newer-synthetic.trc");
    newer.write(&tracer_tests::recording::header_only(2, r#"{"from":"the future"}"#));
    assert_all_readers_fail(newer.arg(), "a version 2 header", Some("newer"));

    // A real recording with its version set to 2 (recording needs root).
    if !require_privileges() {
        return;
    }
    // A process with no socket: a recording without any leak.
    let mut idle = start_client(&["--connect", "127.0.0.1:9", "--wait-stdin-line"]);
    let file = TempFile::new("real.trc");
    let pid = idle.pid().to_string();
    let rec = start_recorder(file.arg(), &["--pid", &pid, "--duration", "1s"]).finish(START_TIMEOUT + EXIT_SLACK);
    check_recorder_finished(&rec, &file);
    idle.kill();

    let (ran, out) = run_report(&file);
    check_warnings(&ran, &[], &out.dump());
    let info = out.recording();
    assert!(!info.ended_early && info.damage.is_empty(), "{info:?}\n{}", out.dump());
    assert!(out.leaks().is_empty(), "nothing leaked\n{}", out.dump());

    // Nothing leaked: no flame graph, and it says so in one line.
    let ran = run_tracer_cmd(&["export", "--format", "flamegraph", file.arg()], CMD_TIMEOUT);
    ran.assert_one_line_error();
    let ran = run_tracer_cmd(&["export", "--format", "folded", file.arg()], CMD_TIMEOUT);
    ran.assert_no_crash();
    if ran.status.success() {
        assert!(
            ran.stdout_text().trim().is_empty(),
            "folded stacks without any leak\n{}",
            ran.describe()
        );
    }

    let newer = TempFile::new("newer-real.trc");
    newer.write(&with_version(&file.read(), 2));
    assert_all_readers_fail(newer.arg(), "a real recording with version 2", Some("newer"));
}

// ---------------------------------------------------------------------------
// e. exports
// ---------------------------------------------------------------------------

/// The `cat:"socket"` spans of a chrome-trace document, checked: complete
/// events with a numeric `args.cookie`, at most one per cookie.
fn socket_spans<'a>(doc: &'a Value, ctx: &str) -> BTreeMap<u64, &'a Value> {
    let events = doc
        .get("traceEvents")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no traceEvents array\n{ctx}"));
    let mut spans = BTreeMap::new();
    for e in events {
        if e.get("cat").and_then(Value::as_str) != Some("socket") {
            continue;
        }
        assert_eq!(
            e.get("ph").and_then(Value::as_str),
            Some("X"),
            "socket span: {e}\n{ctx}"
        );
        let cookie = e
            .get("args")
            .and_then(|a| a.get("cookie"))
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("socket span without args.cookie: {e}\n{ctx}"));
        if let Some(first) = spans.insert(cookie, e) {
            panic!("two socket spans for cookie {cookie}:\n  {first}\n  {e}\n{ctx}");
        }
    }
    spans
}

/// What a jsonl export says about sockets.
struct JsonlFacts {
    records: Vec<Value>,
    /// Cookies of every event and of the start-up snapshot's sockets.
    seen: BTreeSet<u64>,
    /// Cookies with a state event into CLOSE_WAIT.
    entered_close_wait: BTreeSet<u64>,
    /// Cookies with a state event out of CLOSE_WAIT, or into CLOSE.
    left_close_wait: BTreeSet<u64>,
}

/// Parses a clean recording's jsonl export: every line an object with a
/// `"type"`, a header first, one end; events with a cookie and a kind.
fn jsonl_facts(jsonl: &Ran) -> JsonlFacts {
    let records = jsonl
        .json_lines()
        .unwrap_or_else(|e| panic!("{e}\n{}", jsonl.describe()));
    let ty = |v: &Value| v["type"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        records.first().map(ty).as_deref(),
        Some("header"),
        "first record\n{}",
        jsonl.describe()
    );
    let count = |t: &str| records.iter().filter(|r| ty(r) == t).count();
    assert_eq!(
        (count("header"), count("end")),
        (1, 1),
        "one header, one end\n{}",
        jsonl.describe()
    );
    let mut seen = BTreeSet::new();
    let mut entered_close_wait = BTreeSet::new();
    let mut left_close_wait = BTreeSet::new();
    for r in &records {
        match ty(r).as_str() {
            "event" => {
                let cookie = r
                    .get("cookie")
                    .and_then(Value::as_u64)
                    .unwrap_or_else(|| panic!("event without a cookie: {r}"));
                let kind = r.get("kind").and_then(Value::as_str);
                assert!(matches!(kind, Some("state" | "accept" | "close")), "event kind: {r}");
                if kind == Some("state") {
                    for f in ["old_state", "new_state"] {
                        assert!(r.get(f).is_some_and(Value::is_string), "{f}: {r}");
                    }
                    if r["new_state"] == "CLOSE_WAIT" {
                        entered_close_wait.insert(cookie);
                    }
                    if r["old_state"] == "CLOSE_WAIT" || r["new_state"] == "CLOSE" {
                        left_close_wait.insert(cookie);
                    }
                }
                // 0: an fd event for a socket the kernel had not given a
                // cookie yet (it predates the tracer and changed no state
                // since); not an identity, so no span of its own.
                if cookie != 0 || kind == Some("state") {
                    seen.insert(cookie);
                }
            }
            "snapshot" => {
                let sockets = r
                    .pointer("/snapshot/sockets")
                    .and_then(Value::as_array)
                    .unwrap_or_else(|| panic!("snapshot without sockets: {r}"));
                for s in sockets {
                    seen.insert(
                        s.get("cookie")
                            .and_then(Value::as_u64)
                            .unwrap_or_else(|| panic!("snapshot socket without a cookie: {s}")),
                    );
                }
            }
            _ => {}
        }
    }
    JsonlFacts {
        records,
        seen,
        entered_close_wait,
        left_close_wait,
    }
}

/// The report's leaks at the end are sockets of the recording, none of
/// which the recording shows leaving CLOSE_WAIT (closed, or reset): cookies
/// are unique per boot, so nothing can bring such a socket back.
fn check_no_closed_leaks(report: &TracerOutput, facts: &JsonlFacts) {
    for leak in report.leaks() {
        let cookie = leak["cookie"].as_u64().unwrap_or_default();
        assert!(
            facts.seen.contains(&cookie),
            "the report's leak is in no event nor the snapshot: {leak}"
        );
        assert!(
            !facts.left_close_wait.contains(&cookie),
            "the report calls a socket leaked that the recording shows closed: {leak}\n  its state events:{}",
            facts
                .records
                .iter()
                .filter(|r| r["type"] == "event" && r["kind"] == "state" && r["cookie"] == cookie)
                .map(|r| format!("\n    {r}"))
                .collect::<String>()
        );
    }
}

/// Checks a chrome-trace export against the cookies the recording holds
/// (`seen`): exactly one socket span per cookie, a process_name for every
/// track, state spans inside their socket's span. Returns the socket spans
/// by cookie and the process names by pid.
fn check_chrome_trace(chrome: &Ran, seen: &BTreeSet<u64>) -> (BTreeMap<u64, Value>, BTreeMap<u64, String>) {
    let doc: Value =
        serde_json::from_slice(&chrome.stdout).unwrap_or_else(|e| panic!("not JSON: {e}\n{}", chrome.describe()));
    let ctx = chrome.describe();
    let spans = socket_spans(&doc, &ctx);
    let span_cookies: BTreeSet<u64> = spans.keys().copied().collect();
    let only_spans: Vec<&u64> = span_cookies.difference(seen).collect();
    let only_jsonl: Vec<&u64> = seen.difference(&span_cookies).collect();
    assert!(
        only_spans.is_empty() && only_jsonl.is_empty(),
        "socket spans vs cookies of jsonl events and snapshot: only in spans {only_spans:?}, \
         only in jsonl {only_jsonl:?}"
    );
    let events = doc["traceEvents"].as_array().expect("checked");
    let names: BTreeMap<u64, String> = events
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "process_name")
        .filter_map(|e| Some((e.get("pid")?.as_u64()?, e.pointer("/args/name")?.as_str()?.to_string())))
        .collect();
    let mut tracks: BTreeMap<(String, String), Vec<&Value>> = BTreeMap::new();
    for span in spans.values() {
        let pid = span
            .get("pid")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("span pid: {span}"));
        assert!(
            names.contains_key(&pid),
            "no process_name metadata for pid {pid} of {span}\n{ctx}"
        );
        tracks
            .entry((span["pid"].to_string(), span["tid"].to_string()))
            .or_default()
            .push(span);
    }
    // State spans sit inside their socket's span, on its track.
    let mut state_spans = 0;
    for st in events.iter().filter(|e| e["cat"] == "state") {
        assert_eq!(st["ph"], "X", "state span: {st}");
        let (ts, end) = (num(st, "ts"), num(st, "ts") + num(st, "dur"));
        let track = tracks
            .get(&(st["pid"].to_string(), st["tid"].to_string()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let inside = track
            .iter()
            .any(|s| num(s, "ts") - 0.01 <= ts && end <= num(s, "ts") + num(s, "dur") + 0.01);
        assert!(
            inside,
            "state span outside its socket's span (pid, tid): {st}\n  socket spans on that track: {track:?}"
        );
        state_spans += 1;
    }
    assert!(state_spans >= spans.len(), "fewer state spans than sockets\n{ctx}");
    let spans = spans.into_iter().map(|(c, v)| (c, v.clone())).collect();
    (spans, names)
}

fn num(v: &Value, name: &str) -> f64 {
    v.get(name)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{name:?} is not a number: {v}"))
}

/// Parses `N` from a folded line `frames N`.
fn folded_count(line: &str) -> Option<u64> {
    let (stack, count) = line.rsplit_once(' ')?;
    let first = stack.chars().next()?;
    if first.is_whitespace() || count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    count.parse().ok()
}

#[test]
fn exports_round_trip() {
    if !require_privileges() {
        return;
    }
    let (server, port, server_addr) = server();
    let file = TempFile::new("exports.trc");
    // Only the leaky client (--pid), so that every export can be checked
    // exactly; sockets_churning_at_startup_stay_consistent checks the
    // exports of a host-wide recording.
    let (leaky, rec) = record_leaky_client(&server_addr, &file, 3, 4);
    let truth = close_wait_to(&server_addr);
    let leaky_pid = leaky.pid();
    drop((leaky, server));
    check_recorder_finished(&rec, &file);
    assert_eq!(truth.len(), 3, "fixture sanity\n{}", format_ss(&truth));
    let leaked: BTreeSet<u64> = truth.iter().map(|s| s.cookie).collect();

    let (_, report) = run_report(&file);
    let here = leaks_on_port(&report, "summary", port);
    assert_same_cookies(
        &cookies(&here),
        &ss_cookies(&truth),
        &format!("report vs ss\n{}\n{}", dump_port(&report, port), format_ss(&truth)),
    );

    let export = |format: &str| -> Ran {
        let ran = run_tracer_cmd(&["export", "--format", format, file.arg()], CMD_TIMEOUT);
        ran.assert_no_crash();
        ran.assert_success();
        assert!(
            !ran.stderr.contains("warning"),
            "warnings on a clean recording\n{}",
            ran.describe()
        );
        ran
    };

    let jsonl = export("jsonl");
    let facts = jsonl_facts(&jsonl);
    assert_eq!(
        facts.seen,
        leaked,
        "a --pid recording holds the process's sockets, no other\n{}",
        jsonl.describe()
    );
    check_no_closed_leaks(&report, &facts);
    let missing: Vec<&u64> = leaked.difference(&facts.entered_close_wait).collect();
    assert!(
        missing.is_empty(),
        "leaked sockets (per ss) with no state event into CLOSE_WAIT in jsonl: {missing:?}\n{}",
        format_ss(&truth)
    );

    let chrome = export("chrome-trace");
    let (spans, names) = check_chrome_trace(&chrome, &facts.seen);
    for cookie in &leaked {
        let span = &spans[cookie];
        assert_eq!(
            span["pid"].as_u64(),
            Some(u64::from(leaky_pid)),
            "a leaked socket's span is on its owner's track: {span}"
        );
    }
    assert!(
        names
            .get(&u64::from(leaky_pid))
            .is_some_and(|n| n.contains("tcp-fixture")),
        "process_name of the leaky client: {names:?}"
    );

    // folded: `frames count`, the leaks at the end and only those.
    let folded = export("folded");
    let text = folded.stdout_text();
    let ctx = folded.describe();
    let mut total = 0;
    let mut opened_here = 0;
    for line in text.lines() {
        let n = folded_count(line).unwrap_or_else(|| panic!("not a folded line: {line:?}\n{ctx}"));
        assert!(n > 0, "zero count: {line:?}");
        total += n;
        if line.contains("open_connection") {
            assert!(line.starts_with("tcp-fixture;"), "comm first: {line:?}");
            opened_here += n;
        }
    }
    assert_eq!(
        total,
        report.leaks().len() as u64,
        "folded counts vs the report's leaks at the end\n{ctx}\n--- the report's leaks:\n{}",
        capped(
            report
                .leaks()
                .iter()
                .map(|l| format!("  {} {} {} {}\n", l["cookie"], l["pid"], l["comm"], l["remote"]))
                .collect()
        )
    );
    assert_eq!(
        (total, opened_here),
        (3, 3),
        "the leaky client's 3 sockets, opened via open_connection\n{ctx}"
    );

    // flamegraph: well-formed SVG naming the opening function.
    let svg = export("flamegraph");
    let svg_text = svg.stdout_text();
    let opts = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(&svg_text, opts)
        .unwrap_or_else(|e| panic!("the flame graph is not well-formed XML: {e}\n{}", svg.describe()));
    assert_eq!(doc.root_element().tag_name().name(), "svg", "root element");
    let all_text: String = doc.descendants().filter_map(|n| n.text()).collect();
    assert!(
        all_text.contains("open_connection"),
        "no open_connection in the flame graph's text\n{}",
        svg.describe()
    );

    // -o OUT: the same bytes in the file, nothing on stdout.
    for (format, stdout) in [
        ("jsonl", &jsonl),
        ("chrome-trace", &chrome),
        ("folded", &folded),
        ("flamegraph", &svg),
    ] {
        let out = TempFile::new(&format!("export.{format}"));
        let ran = run_tracer_cmd(
            &["export", "--format", format, "-o", out.arg(), file.arg()],
            CMD_TIMEOUT,
        );
        ran.assert_no_crash();
        ran.assert_success();
        assert!(ran.stdout.is_empty(), "-o and output on stdout\n{}", ran.describe());
        assert!(
            out.read() == stdout.stdout,
            "{format}: -o {} differs from stdout",
            out.arg()
        );
    }
}

// ---------------------------------------------------------------------------
// f. sockets that come and go while the tracer starts
// ---------------------------------------------------------------------------

/// Connections from this process to `server_addr`, each kept about 100 ms
/// (it reaches CLOSE_WAIT at once: the server replies and closes), then
/// dropped with the reply unread (a reset: CLOSE_WAIT -> CLOSE), until
/// `stop`. Returns the local address of every connection made.
fn churn(server_addr: String, stop: Arc<AtomicBool>) -> JoinHandle<BTreeSet<String>> {
    std::thread::spawn(move || {
        let mut open = VecDeque::new();
        let mut locals = BTreeSet::new();
        while !stop.load(Ordering::SeqCst) {
            let s = TcpStream::connect(&server_addr).unwrap_or_else(|e| panic!("connect {server_addr}: {e}"));
            locals.insert(s.local_addr().expect("local_addr").to_string());
            open.push_back(s);
            if open.len() > 20 {
                open.pop_front();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        locals
    })
}

#[test]
fn sockets_churning_at_startup_stay_consistent() {
    if !require_privileges() {
        return;
    }
    let (server, port, server_addr) = server();
    // Sockets are opened, enter CLOSE_WAIT and are closed all through the
    // tracers' start: between attaching the programs and the start-up
    // snapshot, and while the snapshot is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let churner = churn(server_addr.clone(), Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(200));
    let file = TempFile::new("startup-churn.trc");
    let mut recorder = start_recorder(file.arg(), &["--leak-after", "1s", "--duration", "4s"]);
    let mut live = run_tracer(&["--leak-after", "1s", "--duration", "4s"]);
    recorder.wait_recording(START_TIMEOUT);
    live.wait_started(START_TIMEOUT);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let locals = churner.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    // Ground truth: every one of them is closed.
    wait_for_ss(
        "close-wait",
        Duration::from_secs(5),
        "no churned connection left in CLOSE_WAIT",
        |snap| !snap.iter().any(|s| s.remote == server_addr),
    );
    let live_out = live.finish(Duration::from_secs(4) + EXIT_SLACK);
    let rec = recorder.finish(Duration::from_secs(4) + EXIT_SLACK);
    drop(server);
    check_recorder_finished(&rec, &file);
    let (_, report) = run_report(&file);

    // None of them lived a second in CLOSE_WAIT: nothing to this port is a
    // leak, in the report or live.
    let mut false_leaks = String::new();
    for (what, out) in [("report", &report), ("live", &live_out)] {
        let here: Vec<&Value> = out
            .leaks()
            .iter()
            .chain(out.of_type("leak"))
            .chain(out.of_type("late_close"))
            .filter(|v| remote_port(v) == Some(port))
            .collect();
        if !here.is_empty() {
            let _ = writeln!(false_leaks, "{what}: {} leak object(s):", here.len());
            for v in here {
                let brief: BTreeMap<&str, &Value> = [
                    "type",
                    "cookie",
                    "local",
                    "close_wait_ms",
                    "close_wait_estimated",
                    "owner_source",
                    "holders",
                    "fd_closed_by",
                ]
                .into_iter()
                .filter_map(|k| Some((k, v.get(k)?)))
                .collect();
                let _ = writeln!(false_leaks, "  {}", serde_json::to_string(&brief).unwrap_or_default());
            }
        }
    }

    // Independent checks: run them all, then report every failure.
    let mut failures: Vec<String> = Vec::new();
    if !false_leaks.is_empty() {
        failures.push(format!(
            "leaks reported for connections closed within ~100 ms ({} connections made while the \
             tracers started):\n{}",
            locals.len(),
            capped(false_leaks)
        ));
    }
    let export = |format: &str| -> Ran {
        let ran = run_tracer_cmd(&["export", "--format", format, file.arg()], CMD_TIMEOUT);
        ran.assert_no_crash();
        ran.assert_success();
        ran
    };
    let facts = jsonl_facts(&export("jsonl"));
    let chrome = export("chrome-trace");
    let checks: [(&str, &dyn Fn()); 2] = [
        ("report vs the recording's events", &|| {
            check_no_closed_leaks(&report, &facts)
        }),
        ("chrome-trace", &|| {
            check_chrome_trace(&chrome, &facts.seen);
        }),
    ];
    for (what, check) in checks {
        if let Err(e) = std::panic::catch_unwind(AssertUnwindSafe(check)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{what}: {}", capped(msg)));
        }
    }
    assert!(
        failures.is_empty(),
        "{} check(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
