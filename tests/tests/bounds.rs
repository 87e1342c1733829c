//! Full kernel maps are counted and shown, never fatal (issue 9).
//!
//! The maps' bounds are hidden options (`--watch-entries`,
//! `--reported-entries`), so a test can fill them with a handful of
//! sockets instead of 65536.

use std::collections::BTreeSet;
use std::time::Duration;

use tracer_tests::{
    require_privileges, run_tracer, spawn_client, spawn_server, ss_sockets, trace_held_client, TracerOutput,
};

const LEAKS: usize = 10;

fn kernel_stat(out: &TracerOutput, name: &str) -> u64 {
    out.summary()["stats"]["kernel"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("summary has no stats.kernel.{name}\n{}", out.dump()))
}

fn leak_cookies(out: &TracerOutput) -> BTreeSet<u64> {
    out.summary_leaks().iter().map(|l| l.cookie).collect()
}

fn loss_lines_with(out: &TracerOutput, name: &str) -> usize {
    out.of_type("loss")
        .iter()
        .filter(|l| l["kernel"][name].as_u64().unwrap_or(0) > 0)
        .count()
}

/// `--pid` on a process with more sockets than the watch list holds:
/// tracing starts, the overflow is counted, and every leak is still found
/// (the start-up snapshot sees them all).
#[test]
fn full_watch_list_is_counted_not_fatal() {
    if !require_privileges() {
        return;
    }
    let (_server, port) = spawn_server("127.0.0.1:0", &["--reply", "26"]);
    let addr = format!("127.0.0.1:{port}");
    let count = LEAKS.to_string();
    let (client, _) = spawn_client(&["--connect", &addr, "--count", &count, "--mode", "leak"]);
    let pid = client.pid();
    let truth: BTreeSet<u64> = ss_sockets("close-wait")
        .iter()
        .filter(|s| s.has_pid(pid))
        .map(|s| s.cookie)
        .collect();
    let all_of_pid = ss_sockets("all").iter().filter(|s| s.has_pid(pid)).count() as u64;
    assert_eq!(truth.len(), LEAKS, "fixture sanity");

    let pid_arg = pid.to_string();
    let tracer = run_tracer(&[
        "--pid",
        &pid_arg,
        "--watch-entries",
        "4",
        "--leak-after",
        "1s",
        "--duration",
        "3s",
    ]);
    let out = tracer.finish(Duration::from_secs(60));
    out.assert_success();
    let ctx = out.dump();
    assert_eq!(
        out.start()["preexisting_sockets"].as_u64(),
        Some(all_of_pid),
        "the snapshot has every socket of the process\n{ctx}"
    );
    assert_eq!(
        kernel_stat(&out, "watch_full"),
        all_of_pid - 4,
        "every socket beyond the 4-entry watch list is counted\n{ctx}"
    );
    assert!(loss_lines_with(&out, "watch_full") >= 1, "a loss line says so\n{ctx}");
    assert_eq!(leak_cookies(&out), truth, "every leak is found, as ss sees them\n{ctx}");
}

/// More leaks than the kernel's list of reported leaks holds: the overflow
/// is counted (their late close would come without a stack).
/// A client leaking `LEAKS` sockets, traced with `--pid` and
/// `tracer_args`: the tracer's output, the leaks as `ss` sees them (read
/// while the client still holds them), and the output for messages.
fn traced_leaks(tracer_args: &[&str]) -> (TracerOutput, BTreeSet<u64>, String) {
    let (_server, port) = spawn_server("127.0.0.1:0", &["--reply", "26"]);
    let addr = format!("127.0.0.1:{port}");
    let (client, _, tracer) = trace_held_client(&["--connect", &addr, "--mode", "leak"], LEAKS, tracer_args);
    let out = tracer.finish(Duration::from_secs(60));
    out.assert_success();
    let ctx = out.dump();
    let truth: BTreeSet<u64> = ss_sockets("close-wait")
        .iter()
        .filter(|s| s.has_pid(client.pid()))
        .map(|s| s.cookie)
        .collect();
    assert_eq!(truth.len(), LEAKS, "fixture sanity\n{ctx}");
    (out, truth, ctx)
}

#[test]
fn full_reported_list_is_counted() {
    if !require_privileges() {
        return;
    }
    let (out, truth, ctx) = traced_leaks(&["--reported-entries", "3", "--leak-after", "1s", "--duration", "4s"]);
    assert_eq!(leak_cookies(&out), truth, "every leak is found, as ss sees them\n{ctx}");
    assert_eq!(
        kernel_stat(&out, "reported_full"),
        (LEAKS - 3) as u64,
        "leaks beyond the 3-entry list are counted\n{ctx}"
    );
    assert!(
        loss_lines_with(&out, "reported_full") >= 1,
        "a loss line says so\n{ctx}"
    );
}

/// Default `live` keeps each socket's opener in a table of slots with an
/// overflow map (hidden `--socket-entries`: 2 slots, and an overflow of 2).
/// With `--pid`, only the process's sockets are kept: of its 10 leaks, 4
/// have room (2 slots, 2 overflow entries) and are found with their owner;
/// the 6 without room are counted (owners_full), with a loss line, and are
/// not reported as the process's (nothing says they are).
#[test]
fn full_socket_table_is_counted() {
    if !require_privileges() {
        return;
    }
    let (out, truth, ctx) = traced_leaks(&["--socket-entries", "2", "--leak-after", "1s", "--duration", "4s"]);
    let found = leak_cookies(&out);
    assert_eq!(found.len(), 4, "the leaks whose opener had room\n{ctx}");
    assert!(found.is_subset(&truth), "every leak found is one ss sees\n{ctx}");
    let pid = out.start()["filter_pid"].as_u64();
    for leak in out.summary_leaks() {
        assert_eq!(Some(u64::from(leak.pid)), pid, "owner: {}\n{ctx}", leak.json);
        assert_eq!(leak.json["owner_source"], "connect", "{}\n{ctx}", leak.json);
    }
    assert_eq!(
        kernel_stat(&out, "owners_full"),
        (LEAKS - 4) as u64,
        "openers beyond the table and its overflow are counted\n{ctx}"
    );
    assert!(loss_lines_with(&out, "owners_full") >= 1, "a loss line says so\n{ctx}");
}
