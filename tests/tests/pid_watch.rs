//! `live --pid` on sockets older than the tracer: the snapshot puts them in
//! the kernel side's watch list, and their later state changes must reach
//! the agent (the kernel side recognises them by the cookie the socket
//! already holds, without asking for one).
//!
//! The process leaks sockets before the tracer starts, the tracer reports
//! them (checked against `ss`), then the process exits, which closes them:
//! each reported leak must end with a `late_close`, and the summary must
//! hold none of them. A leave the kernel side failed to send would leave
//! them in the summary as leaks that `ss` no longer shows.

use std::collections::BTreeSet;
use std::time::Duration;

use tracer_tests::{require_privileges, run_tracer, spawn_client, spawn_server, ss_sockets, wait_for_ss, Value};

const START_TIMEOUT: Duration = Duration::from_secs(20);
const LEAKS: usize = 3;

#[test]
fn preexisting_leaks_of_the_watched_process_end_with_its_exit() {
    if !require_privileges() {
        return;
    }
    let (_server, port) = spawn_server("127.0.0.1:0", &["--reply", "26"]);
    let server_addr = format!("127.0.0.1:{port}");
    let count = LEAKS.to_string();
    let (mut client, _) = spawn_client(&["--connect", &server_addr, "--count", &count, "--mode", "leak"]);
    let pid = client.pid();
    wait_for_ss(
        "close-wait",
        Duration::from_secs(5),
        "the client's sockets in CLOSE_WAIT",
        |snap| {
            snap.iter()
                .filter(|s| s.remote == server_addr && s.has_pid(pid))
                .count()
                == LEAKS
        },
    );
    let truth: BTreeSet<u64> = ss_sockets("close-wait")
        .iter()
        .filter(|s| s.remote == server_addr && s.has_pid(pid))
        .map(|s| s.cookie)
        .collect();

    // No --duration: the process's exit ends the trace.
    let mut tracer = run_tracer(&["--pid", &pid.to_string(), "--leak-after", "1s"]);
    tracer.wait_started(START_TIMEOUT);
    let mut reported = BTreeSet::new();
    while reported.len() < LEAKS {
        let leak = tracer.wait_json("leak", Duration::from_secs(10));
        reported.insert(leak["cookie"].as_u64().expect("leak.cookie"));
    }
    assert_eq!(reported, truth, "the leaks reported are the process's, as ss sees them");

    client.close_stdin();
    let status = client
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("fixture client ignored stdin EOF\n{}", client.describe()));
    assert!(status.success(), "fixture client failed\n{}", client.describe());
    let out = tracer.finish(Duration::from_secs(10));
    out.assert_success();
    let ctx = out.dump();

    let still_cw: Vec<u64> = ss_sockets("close-wait")
        .iter()
        .filter(|s| truth.contains(&s.cookie))
        .map(|s| s.cookie)
        .collect();
    assert!(
        still_cw.is_empty(),
        "fixture: the exit closed its sockets, ss still has {still_cw:?}"
    );
    let closed: BTreeSet<u64> = out
        .of_type("late_close")
        .iter()
        .filter_map(|v| v.get("cookie").and_then(Value::as_u64))
        .collect();
    assert_eq!(closed, truth, "each reported leak ends with a late_close\n{ctx}");
    let open: Vec<u64> = out
        .leaks()
        .iter()
        .filter_map(|v| v.get("cookie").and_then(Value::as_u64))
        .filter(|c| truth.contains(c))
        .collect();
    assert!(
        open.is_empty(),
        "closed sockets left in the summary as leaks: {open:?}\n{ctx}"
    );
}
