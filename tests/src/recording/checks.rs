//! What the recording tests share: a fixture server and clients, running
//! `report`, and the checks every recording test makes (the recorder's
//! contract, warnings for damage, the report's shape, leaks against `ss`).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::Value;

use super::{run_tracer_cmd, start_recorder, Ran, RecordOutput, TempFile};
use crate::evidence::{Evidence, Frame};
use crate::fixture::{spawn_client, spawn_server, start_client, wait_client_done, SockLine};
use crate::ss::{ss_sockets, wait_for_ss, SsSocket};
use crate::tracer::TracerOutput;
use crate::{port_of, Child};

// The timeouts only guard against hangs: on an idle machine each test takes
// a few seconds, but a host-wide recording on a host under heavy TCP load
// (a load generator next to the tests) is large and slow to start, stop
// and read.

/// Loading and attaching the eBPF programs, and the start-up snapshot.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Slack on top of `--duration` for a tracer to finish and exit.
pub const EXIT_SLACK: Duration = Duration::from_secs(30);
/// `report` or `export` of one recording.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// `--leak-after 1s`, as `start.leak_after_ms` must echo it.
pub const LEAK_AFTER_MS: u64 = 1000;
/// The server's reply: what a client that never reads leaves unread.
pub const REPLY: u64 = 26;
/// Where the fixture's own frames are (the module path's end).
pub const FIXTURE_MODULE: &str = "tcp-fixture";

/// A fixture server replying [`REPLY`] bytes then closing.
pub fn server() -> (Child, u16, String) {
    let reply = REPLY.to_string();
    let (child, port) = spawn_server("127.0.0.1:0", &["--reply", &reply]);
    (child, port, format!("127.0.0.1:{port}"))
}

/// A client that opens `count` connections and never reads nor closes them.
pub fn leaky_client(server_addr: &str, count: usize) -> (Child, Vec<SockLine>) {
    let count = count.to_string();
    spawn_client(&["--connect", server_addr, "--count", &count, "--mode", "leak"])
}

/// A client that reads each connection to the FIN, then closes it.
pub fn good_client(server_addr: &str, count: usize) -> (Child, Vec<SockLine>) {
    let count = count.to_string();
    spawn_client(&["--connect", server_addr, "--count", &count, "--mode", "close"])
}

/// Records, with `--pid`, a client that opens `count` connections once the
/// recorder runs and never reads nor closes them: the recording holds its
/// sockets and nothing else, whatever runs on the host. Returns the client
/// (still running) and the recorder's output.
pub fn record_leaky_client(server_addr: &str, file: &TempFile, count: usize, duration_s: u64) -> (Child, RecordOutput) {
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
pub fn wait_leaked(server_addr: &str, client: &Child, count: usize) {
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
pub fn close_wait_to(server_addr: &str) -> Vec<SsSocket> {
    ss_sockets("close-wait")
        .into_iter()
        .filter(|s| s.remote == server_addr)
        .collect()
}

pub fn remote_port(v: &Value) -> Option<u16> {
    v.get("remote").and_then(Value::as_str).and_then(port_of)
}

/// Leak objects of type `ty` (`summary` for the summary's leaks, or `leak`
/// / `late_close` events) on connections to `port`, with their evidence.
/// Only those are parsed: other sockets on the host are not this test's.
pub fn leaks_on_port(out: &TracerOutput, ty: &str, port: u16) -> Vec<Evidence> {
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

pub fn cookies(leaks: &[Evidence]) -> Vec<u64> {
    leaks.iter().map(|e| e.leak.cookie).collect()
}

pub fn ss_cookies(truth: &[SsSocket]) -> Vec<u64> {
    truth.iter().map(|s| s.cookie).collect()
}

/// Every cookie in a leak object (summary leaks, `leak` and `late_close`
/// events), any port.
pub fn all_leak_cookies(out: &TracerOutput) -> BTreeSet<u64> {
    out.leaks()
        .iter()
        .chain(out.of_type("leak"))
        .chain(out.of_type("late_close"))
        .filter_map(|v| v.get("cookie").and_then(Value::as_u64))
        .collect()
}

/// `text`, cut to a size fit for an assertion message.
pub fn capped(text: String) -> String {
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
pub fn dump_port(out: &TracerOutput, port: u16) -> String {
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
pub fn check_against_ss(e: &Evidence, truth: &[SsSocket], ctx: &str) {
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
pub fn mode_of(file: &TempFile) -> u32 {
    std::fs::metadata(file.path())
        .unwrap_or_else(|e| panic!("stat {}: {e}", file.arg()))
        .permissions()
        .mode()
        & 0o7777
}

/// The recorder's own contract at a clean end: exit 0, nothing on stdout,
/// `tracer: wrote FILE` on stderr, a 0600 file.
pub fn check_recorder_finished(rec: &RecordOutput, file: &TempFile) {
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
pub fn check_warnings(ran: &Ran, damage: &[String], ctx: &str) {
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
pub fn run_report(file: &TempFile) -> (Ran, TracerOutput) {
    let ran = run_tracer_cmd(&["report", "--json", file.arg()], CMD_TIMEOUT);
    ran.assert_no_crash();
    ran.assert_success();
    let out = ran.output();
    (ran, out)
}

/// The summary is the one and last object, with groups and stats.
pub fn check_report_shape(out: &TracerOutput) {
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
pub fn comparable(e: &Evidence) -> Value {
    let mut holders = e.holders.clone();
    holders.sort();
    let frames = |stack: &[Frame]| -> Vec<String> {
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
