//! The ring buffer is drained while leak evidence is gathered (issue 9).
//!
//! Evidence costs a sock_diag dump and a scan of every process's fds: on a
//! big host that takes long, and if it ran on the loop that drains the ring
//! buffer, events would pile up and be dropped meanwhile. The debug build
//! of the tracer can be told to make every gathering slow
//! (`TRACER_TEST_EVIDENCE_DELAY_MS`); while one is under way, the status
//! lines must keep coming and count the connections made meanwhile, and the
//! leak must still be reported with its evidence once the gathering ends.

use std::process::Command;
use std::time::{Duration, Instant};

use tracer_tests::{
    require_privileges, spawn_client, spawn_server, start_client, tracer_bin, wait_client_done, wait_for_ss, Child,
    Leak, Value,
};

/// How long each evidence gathering is made to take.
const DELAY: Duration = Duration::from_secs(5);
/// The tracer's ring buffer.
const RING_BYTES: u64 = 512 * 1024;
/// The size of a state-change record, the bulk of the churn's.
const STATE_EVENT_BYTES: u64 = 112;
/// The server's reply: what the leaking client leaves unread.
const REPLY: u32 = 26;

fn json(line: &str) -> Option<Value> {
    serde_json::from_str::<Value>(line).ok().filter(Value::is_object)
}

fn of_type(v: &Value, ty: &str) -> bool {
    v.get("type").and_then(Value::as_str) == Some(ty)
}

#[test]
fn slow_evidence_does_not_stop_the_drain() {
    if !require_privileges() {
        return;
    }
    let (_server, port) = spawn_server("127.0.0.1:0", &["--reply", &REPLY.to_string()]);
    let addr = format!("127.0.0.1:{port}");

    // A small ring buffer (512 KiB): not drained for the gathering's 5 s,
    // the churn below would overflow it.
    let mut cmd = Command::new(tracer_bin());
    cmd.args([
        "live",
        "--json",
        "--leak-after",
        "1s",
        "--status-interval",
        "200ms",
        "--ring-bytes",
        &RING_BYTES.to_string(),
        "--duration",
        "12s",
        // Every event through the ring buffer (sockets followed in the
        // kernel would send almost nothing to drain).
        "--every-event",
    ])
    .env("TRACER_TEST_EVIDENCE_DELAY_MS", DELAY.as_millis().to_string());
    let mut tracer = Child::spawn("tracer live --json (slow evidence)", cmd);
    tracer.wait_line(
        |l| json(l).is_some_and(|v| of_type(&v, "start")),
        Duration::from_secs(60),
    );
    let started = Instant::now();

    // Warm-up: the first stack of a binary parses its symbols and DWARF
    // (long for a debug build), which is not what this test measures.
    let (_warm, _) = spawn_client(&["--connect", &addr, "--count", "1", "--mode", "close"]);
    tracer.wait_line(
        |l| json(l).is_some_and(|v| of_type(&v, "status") && v["stacks_held"].as_u64().unwrap_or(0) >= 1),
        Duration::from_secs(30),
    );
    let leaks_start_ms = started.elapsed().as_millis() as u64;

    // Two leaks: one stays (its evidence is checked), one's owner exits
    // while the gathering runs (it was a leak all the same, then a late
    // close).
    // Both started before either is waited for, so that their FINs come
    // together and both leaks are due in the same sweep (one after the
    // other, they could straddle a tick and be gathered for apart).
    let leak = ["--connect", addr.as_str(), "--count", "1", "--mode", "leak"];
    let (mut stays, mut exits) = (start_client(&leak), start_client(&leak));
    let socks = wait_client_done(&mut stays, 1);
    wait_client_done(&mut exits, 1);
    let truth: Vec<_> = wait_for_ss(
        "close-wait",
        Duration::from_secs(5),
        "the leaking clients' sockets in CLOSE_WAIT",
        |snap| {
            [stays.pid(), exits.pid()]
                .iter()
                .all(|&p| snap.iter().any(|s| s.remote == addr && s.has_pid(p)))
        },
    )
    .into_iter()
    .filter(|s| s.remote == addr && s.has_pid(stays.pid()))
    .collect();

    // The leaks are due after 1 s; their gathering then takes DELAY.
    // Meanwhile connections keep coming, and must be drained.
    let in_close_wait = Instant::now();
    let gathering_ends = in_close_wait + Duration::from_secs(1) + DELAY;
    let mut killed = false;
    while Instant::now() + Duration::from_millis(500) < gathering_ends {
        let (_good, _) = spawn_client(&["--connect", &addr, "--count", "40", "--mode", "close"]);
        // Due after 1 s, so surely being gathered for after 2.5 s.
        if !killed && in_close_wait.elapsed() > Duration::from_millis(2500) {
            exits.kill();
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(killed, "fixture sanity: the second owner exits during the gathering");

    let Some(status) = tracer.wait_finished(Duration::from_secs(60)) else {
        panic!("tracer did not finish\n{}", tracer.describe());
    };
    let lines: Vec<Value> = tracer.lines_seen().iter().filter_map(|l| json(l)).collect();
    let ctx = format!("{}\nss: {truth:?}", tracer.describe());
    assert!(status.success(), "{ctx}");
    let of_pid = |ty: &str, pid: u32| -> Vec<&Value> {
        lines
            .iter()
            .filter(|v| of_type(v, ty) && v["pid"].as_u64() == Some(u64::from(pid)))
            .collect()
    };

    // The gathering was slow: the leaks waited for it (else the debug hook
    // is missing, e.g. a release build of the tracer was given). This test
    // is host-wide: it assumes no other test leaks sockets meanwhile (each
    // test file runs on its own), since another leak's gathering would
    // shift when ours are swept.
    let leak = of_pid("leak", stays.pid());
    assert_eq!(leak.len(), 1, "the staying leak is reported once\n{ctx}");
    let at = lines
        .iter()
        .position(|v| std::ptr::eq(v, leak[0]))
        .expect("a line of ours");
    let before = lines[..at]
        .iter()
        .filter(|v| of_type(v, "status"))
        .filter_map(|v| v["uptime_ms"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(
        before >= leaks_start_ms + DELAY.as_millis() as u64,
        "the leak was printed {before} ms into the trace, before the {DELAY:?} gathering could end: \
         is TRACER_BIN a debug build (the delay hook exists only there)?\n{ctx}"
    );
    // ... and it came with its evidence, which matches the kernel's view.
    let leak = Leak::from_json(leak[0]);
    assert_eq!(leak.cookie, truth[0].cookie, "{ctx}");
    assert_eq!(
        leak.json["unread_bytes"].as_u64(),
        Some(truth[0].recv_q - 1),
        "unread bytes, as ss's Recv-Q says (less the FIN)\n{ctx}"
    );
    assert_eq!(truth[0].recv_q - 1, u64::from(REPLY), "fixture sanity\n{ctx}");
    let holders = leak.json["holders"].as_array().cloned().unwrap_or_default();
    assert!(
        holders.iter().any(|h| h["pid"].as_u64() == Some(u64::from(stays.pid()))
            && h["fd"].as_i64() == socks.first().map(|s| i64::from(s.fd))),
        "the leaking process holds the socket through its fd\n{ctx}"
    );
    // The owner that exited during the gathering: its socket was leaked
    // when the sweep was due, so it is a leak, then a late close.
    assert_eq!(
        of_pid("leak", exits.pid()).len(),
        1,
        "a leak whose owner exits while evidence is gathered\n{ctx}"
    );
    assert_eq!(
        of_pid("late_close", exits.pid()).len(),
        1,
        "... then its late close\n{ctx}"
    );

    // While the gathering ran, the drain went on: status lines kept
    // coming, and the small ring buffer never overflowed.
    let during = lines
        .iter()
        .filter(|v| of_type(v, "status"))
        .filter_map(|v| v["uptime_ms"].as_u64())
        .filter(|&t| t >= leaks_start_ms + 2000 && t + 1000 <= leaks_start_ms + DELAY.as_millis() as u64)
        .count();
    assert!(
        during >= 5,
        "only {during} status lines while evidence was being gathered\n{ctx}"
    );
    let summary = lines.iter().find(|v| of_type(v, "summary")).expect("a summary");
    let k = &summary["stats"]["kernel"];
    assert_eq!(
        k["ringbuf_drops"].as_u64(),
        Some(0),
        "the ring buffer overflowed: the drain stopped\n{ctx}"
    );
    assert!(
        k["generated"].as_u64().unwrap_or(0) * STATE_EVENT_BYTES > 2 * RING_BYTES,
        "fixture sanity: the churn made more than two ring buffers' worth of events\n{ctx}"
    );
}
