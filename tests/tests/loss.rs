//! Loss accounting: with a deliberately tiny ring buffer, every event the
//! kernel generated is either delivered to the agent or counted as dropped,
//! exactly, and the drops are shown as they happen and in the summary.

use std::time::Duration;

use tracer_tests::{require_privileges, spawn_server, trace_held_client, Value};

fn num(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        cur = cur.get(p).unwrap_or_else(|| panic!("missing {path:?} in {v}"));
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

/// Every event sent (`--events`): a burst of connections overflows a
/// 4 KiB ring buffer.
#[test]
fn delivered_plus_dropped_equals_generated_with_every_event() {
    if !require_privileges() {
        return;
    }
    let (_server, port) = spawn_server("127.0.0.1:0", &["--reply", "8"]);
    let addr = format!("127.0.0.1:{port}");
    // A burst from one process: with --pid, only its events are generated,
    // so once it is idle the counters are final. One page of ring buffer
    // holds ~30 events; the burst is ~2000.
    let (_client, _socks, tracer) = trace_held_client(
        &["--connect", &addr, "--mode", "close"],
        400,
        &[
            "--ring-bytes",
            "4096",
            "--duration",
            "4s",
            "--leak-after",
            "10s",
            "--events",
        ],
    );
    check_balance(tracer.finish(Duration::from_secs(10)));
}

/// Sockets followed in the kernel (default `live`): 400 leaks, with room
/// for one in the kernel's CLOSE_WAIT map, so the other records go through
/// a 4 KiB ring buffer (~15 fit), and most are dropped.
#[test]
fn delivered_plus_dropped_equals_generated_when_followed() {
    if !require_privileges() {
        return;
    }
    let (_server, port) = spawn_server("127.0.0.1:0", &["--reply", "8"]);
    let addr = format!("127.0.0.1:{port}");
    let (_client, _socks, tracer) = trace_held_client(
        &["--connect", &addr, "--mode", "leak", "--read"],
        400,
        &[
            "--ring-bytes",
            "4096",
            "--close-wait-entries",
            "1",
            "--duration",
            "4s",
            "--leak-after",
            "10s",
        ],
    );
    let out = tracer.finish(Duration::from_secs(10));
    let spilled = num(out.summary(), &["stats", "kernel", "close_wait_spilled"]);
    assert!(spilled >= 399, "the CLOSE_WAIT map held one: {}", out.summary());
    check_balance(out);
}

fn check_balance(out: tracer_tests::TracerOutput) {
    out.assert_success();
    let summary = out.summary();
    let generated = num(summary, &["stats", "kernel", "generated"]);
    let dropped = num(summary, &["stats", "kernel", "ringbuf_drops"]);
    let delivered = num(summary, &["stats", "delivered"]) + num(summary, &["stats", "decode_errors"]);
    assert!(dropped > 0, "a 4 KiB ring buffer should have overflowed: {summary}");
    assert!(delivered > 0, "nothing delivered: {summary}");
    assert_eq!(
        delivered + dropped,
        generated,
        "delivered {delivered} + dropped {dropped} != generated {generated}"
    );

    // The drops were announced while tracing, and add up.
    let losses = out.of_type("loss");
    assert!(
        !losses.is_empty(),
        "drops happened but no loss line was printed\n{}",
        out.dump()
    );
    let announced: u64 = losses.iter().map(|l| num(l, &["new_ringbuf_drops"])).sum();
    assert_eq!(
        announced,
        dropped,
        "loss lines announce {announced}, summary says {dropped}\n{}",
        out.dump()
    );
    // Counters only grow: the summary's are at least every loss line's
    // (the kernel's count of skipped hook runs once read as 0 at the end,
    // the programs being gone by then).
    let totals = summary["stats"]["kernel"].as_object().expect("stats.kernel");
    for line in &losses {
        for (name, total) in totals {
            let (Some(then), Some(total)) = (line["kernel"][name].as_u64(), total.as_u64()) else {
                continue;
            };
            assert!(
                then <= total,
                "{name}: {then} in a loss line, {total} in the summary\n{}",
                out.dump()
            );
        }
    }
}
