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

use tracer_tests::{require_privileges, spawn_client, spawn_server, tracer_bin, wait_for_ss, Child, Leak, Value};

/// How long each evidence gathering is made to take.
const DELAY: Duration = Duration::from_secs(5);
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

    let mut cmd = Command::new(tracer_bin());
    cmd.args(["live", "--json", "--leak-after", "1s", "--status-interval", "200ms"])
        .env("TRACER_TEST_EVIDENCE_DELAY_MS", DELAY.as_millis().to_string());
    let mut tracer = Child::spawn("tracer live --json (slow evidence)", cmd);
    tracer.wait_line(|l| json(l).is_some_and(|v| of_type(&v, "start")), Duration::from_secs(60));
    let started = Instant::now();

    let (leaker, socks) = spawn_client(&["--connect", &addr, "--count", "1", "--mode", "leak"]);
    let truth: Vec<_> = wait_for_ss(
        "close-wait",
        Duration::from_secs(5),
        "the leaking client's socket in CLOSE_WAIT",
        |snap| snap.iter().any(|s| s.remote == addr && s.has_pid(leaker.pid())),
    )
    .into_iter()
    .filter(|s| s.remote == addr && s.has_pid(leaker.pid()))
    .collect();

    // The leak is due after 1 s; its gathering then takes DELAY. Meanwhile
    // connections keep coming, and must be drained and counted.
    let mut churn_until = started + Duration::from_secs(1) + DELAY - Duration::from_millis(500);
    if churn_until < Instant::now() {
        churn_until = Instant::now() + Duration::from_secs(2);
    }
    while Instant::now() < churn_until {
        let (_good, _) = spawn_client(&["--connect", &addr, "--count", "20", "--mode", "close"]);
        std::thread::sleep(Duration::from_millis(200));
    }

    let leak_line = tracer.wait_line(
        |l| {
            json(l).is_some_and(|v| {
                of_type(&v, "leak") && v["pid"].as_u64() == Some(u64::from(leaker.pid()))
            })
        },
        Duration::from_secs(30),
    );
    let reported_after = started.elapsed();
    let leak = Leak::from_json(&json(&leak_line).expect("matched above"));
    tracer.kill();

    let lines: Vec<Value> = tracer.lines_seen().iter().filter_map(|l| json(l)).collect();
    let ctx = format!("{}\nss: {truth:?}", tracer.describe());
    // The gathering was slow: the leak waited for it (else the debug hook
    // is missing, e.g. a release build of the tracer was given).
    assert!(
        reported_after >= DELAY,
        "the leak was reported {reported_after:?} after start, before the {DELAY:?} gathering could end: \
         is TRACER_BIN a debug build (the delay hook exists only there)?\n{ctx}"
    );
    // ... and it came with its evidence, which matches the kernel's view.
    assert_eq!(leak.cookie, truth[0].cookie, "{ctx}");
    assert_eq!(
        leak.json["unread_bytes"].as_u64(),
        Some(truth[0].recv_q - 1),
        "unread bytes, as ss's Recv-Q says (less the FIN)\n{ctx}"
    );
    assert_eq!(truth[0].recv_q - 1, u64::from(REPLY), "fixture sanity\n{ctx}");
    let holders = leak.json["holders"].as_array().cloned().unwrap_or_default();
    assert!(
        holders.iter().any(|h| h["pid"].as_u64() == Some(u64::from(leaker.pid()))
            && h["fd"].as_i64() == socks.first().map(|s| i64::from(s.fd))),
        "the leaking process holds the socket through its fd\n{ctx}"
    );
    // While the gathering ran, the drain went on: status lines kept coming
    // and the events they count kept growing.
    let during: Vec<(u64, u64)> = lines
        .iter()
        .filter(|v| of_type(v, "status"))
        .filter_map(|v| Some((v["uptime_ms"].as_u64()?, v["events"].as_u64()?)))
        .filter(|&(t, _)| t >= 2000 && t + 1000 <= DELAY.as_millis() as u64)
        .collect();
    assert!(
        during.len() >= 5,
        "only {} status lines while evidence was being gathered: the drain stopped\n{ctx}",
        during.len()
    );
    let (first, last) = (during[0].1, during[during.len() - 1].1);
    assert!(
        last > first + 40,
        "events counted while evidence was being gathered went from {first} to {last}: the drain stopped\n{ctx}"
    );
}
