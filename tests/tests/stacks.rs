//! The per-process stack budget (`--stack-rate`): a process that opens
//! sockets faster than its budget gets stacks for a sample of them, and
//! every open it did not get one for is counted and says so. Nothing is
//! dropped silently: leaks with a stack + leaks sampled out = every leak,
//! and the kernel's counter equals the leaks sampled out.

use std::time::Duration;

use tracer_tests::{
    assert_same_cookies, require_privileges, spawn_server, ss_sockets, stack_has, trace_held_client, Evidence, Value,
};

/// Connections the client opens in one burst, all leaked.
const COUNT: usize = 12;
/// Stacks per second per process and CPU: far fewer than the burst.
const RATE: &str = "2";

#[test]
fn over_budget_opens_are_sampled_out_and_counted() {
    if !require_privileges() {
        return;
    }
    let (_server, port) = spawn_server("127.0.0.1:0", &["--reply", "26"]);
    let addr = format!("127.0.0.1:{port}");
    // Held until the tracer watches it: with --pid only its own opens are
    // counted, so the counter can be checked exactly.
    let (_client, socks, tracer) = trace_held_client(
        &["--connect", &addr, "--mode", "leak"],
        COUNT,
        &["--stack-rate", RATE, "--leak-after", "1s", "--duration", "4s"],
    );
    assert_eq!(socks.len(), COUNT, "fixture sanity");
    let out = tracer.finish(Duration::from_secs(15));
    // Ground truth while the client still holds them.
    let truth: Vec<u64> = ss_sockets("close-wait")
        .into_iter()
        .filter(|s| s.remote == addr)
        .map(|s| s.cookie)
        .collect();
    out.assert_success();

    let leaks: Vec<Evidence> = out.leaks().iter().map(Evidence::from_json).collect();
    assert_eq!(leaks.len(), COUNT, "every leak is found, stack or not\n{}", out.dump());
    let found: Vec<u64> = leaks.iter().map(|e| e.leak.cookie).collect();
    assert_same_cookies(&found, &truth, &format!("leaks vs ss\n{}", out.dump()));
    let (with, without): (Vec<&Evidence>, Vec<&Evidence>) = leaks.iter().partition(|e| !e.open_stack.is_empty());
    assert!(!with.is_empty(), "the budget's first stacks are taken\n{}", out.dump());
    assert!(
        !without.is_empty(),
        "{COUNT} opens at once against a budget of {RATE}/s per CPU: some must be sampled out\n{}",
        out.dump()
    );
    for e in &with {
        assert!(
            stack_has(&e.open_stack, "open_connection", "tcp-fixture"),
            "a stack taken within the budget is a real one: {}",
            e.leak.json
        );
    }
    for e in &without {
        assert!(
            e.open_stack_error
                .as_deref()
                .is_some_and(|m| m.contains("--stack-rate")),
            "a leak without a stack must say it was sampled out: {:?}\n{}",
            e.open_stack_error,
            e.leak.json
        );
    }
    let sampled = out
        .summary()
        .pointer("/stats/kernel/stacks_sampled_out")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no stats.kernel.stacks_sampled_out\n{}", out.dump()));
    assert_eq!(
        sampled,
        without.len() as u64,
        "the kernel's count of sampled-out opens vs the leaks without a stack\n{}",
        out.dump()
    );
}
