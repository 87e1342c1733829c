//! Sockets that are opened, enter CLOSE_WAIT and are closed all through
//! the tracers' start (between attaching the programs and the start-up
//! snapshot, and while it is taken): no false leak, in `live` or in a
//! recording, and exports consistent with the recorded events.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::net::TcpStream;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracer_tests::recording::checks::*;
use tracer_tests::recording::exports::*;
use tracer_tests::{require_privileges, run_tracer, run_tracer_cmd, start_recorder, wait_for_ss, Ran, TempFile, Value};

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
