//! Sockets followed in the kernel (default `live`) and every event sent to
//! userspace (`live --events`) find the same leaks: two tracers run side by
//! side over one workload, and their findings must agree field by field
//! (only times differ: each reports on its own clock ticks), and agree
//! with `ss`.
//!
//! The workload covers each way the kernel side learns about a socket:
//! client leaks (connect), server leaks (accept, some accepted after the
//! peer's FIN), a leak whose fd was closed in one process while a forked
//! child still holds it (the shared close), late closes (a leaking client
//! that exits), and well-behaved clients and churn that must not appear.

use std::collections::BTreeMap;
use std::time::Duration;

use tracer_tests::{
    port_of, require_privileges, run_tracer, spawn_client, spawn_server, ss_sockets, start_client, wait_client_done,
    TracerOutput, Value,
};

const START_TIMEOUT: Duration = Duration::from_secs(20);
const RUN: Duration = Duration::from_secs(9);

/// The fields of a leak that must not depend on how it was learnt. Times
/// (`close_wait_ms`, `since`) are each tracer's own ticks.
const SAME: &[&str] = &[
    "pid",
    "comm",
    "cmdline",
    "local",
    "remote",
    "cookie",
    "close_wait_estimated",
    "fd",
    "owner_source",
    "unread_bytes",
    "unread_bytes_at_fin",
    "holders",
    "open_stack",
    "open_stack_error",
    "open_stack_truncated",
    "close_stack",
    "close_stack_error",
    "fd_closed_by",
];

/// Every leak-shaped object of one type, by cookie, restricted to `ports`.
fn by_cookie(objs: Vec<&Value>, ports: &[u16]) -> BTreeMap<u64, Value> {
    objs.into_iter()
        .filter(|l| {
            let p = |f: &str| l.get(f).and_then(Value::as_str).and_then(port_of);
            ports.iter().any(|&x| p("remote") == Some(x) || p("local") == Some(x))
        })
        .map(|l| (l["cookie"].as_u64().expect("cookie"), l.clone()))
        .collect()
}

fn same_fields(a: &Value, b: &Value) -> Vec<String> {
    SAME.iter()
        .filter(|f| a.get(**f) != b.get(**f))
        .map(|f| format!("{f}: followed {:?} vs events {:?}", a.get(*f), b.get(*f)))
        .collect()
}

fn compare(what: &str, followed: &BTreeMap<u64, Value>, events: &BTreeMap<u64, Value>, ctx: &str) {
    let a: Vec<_> = followed.keys().collect();
    let b: Vec<_> = events.keys().collect();
    assert_eq!(a, b, "{what}: the two modes found different sockets\n{ctx}");
    for (cookie, l) in followed {
        let diff = same_fields(l, &events[cookie]);
        assert!(
            diff.is_empty(),
            "{what} {cookie}: the modes disagree:\n  {}\n{ctx}",
            diff.join("\n  ")
        );
    }
}

fn context(followed: &TracerOutput, events: &TracerOutput) -> String {
    let pick = |o: &TracerOutput| {
        let mut s = String::new();
        for ty in ["leak", "late_close", "loss", "summary"] {
            for v in o.of_type(ty) {
                s.push_str(&format!("{v}\n"));
            }
        }
        s
    };
    format!("--- followed ---\n{}--- events ---\n{}", pick(followed), pick(events))
}

#[test]
fn followed_and_full_event_modes_find_the_same_leaks() {
    if !require_privileges() {
        return;
    }
    let (_replying, reply_port) = spawn_server("127.0.0.1:0", &["--reply", "26"]);
    let (_silent, silent_port) = spawn_server("127.0.0.1:0", &["--never-close"]);
    let reply = format!("127.0.0.1:{reply_port}");
    let silent = format!("127.0.0.1:{silent_port}");
    let ports = [reply_port, silent_port];

    let args = ["--leak-after", "1s", "--duration", "9s"];
    let mut followed = run_tracer(&args);
    let mut events = run_tracer(&[&args[..], &["--events"]].concat());
    followed.wait_started(START_TIMEOUT);
    events.wait_started(START_TIMEOUT);

    // Client leaks, some with unread bytes (no --read).
    let (_leaky, _) = spawn_client(&["--connect", &reply, "--count", "4", "--mode", "leak", "--read"]);
    let (_unread, _) = spawn_client(&["--connect", &reply, "--count", "3", "--mode", "leak"]);
    // Well-behaved.
    let (_good, _) = spawn_client(&["--connect", &reply, "--count", "20", "--mode", "close"]);
    // Server leaks: the client closes at once, often before the accept.
    let (_closer, _) = spawn_client(&["--connect", &silent, "--count", "4", "--mode", "close-now"]);
    // The fd closed in the parent, the socket held by its forked child.
    let (_forker, _) = spawn_client(&[
        "--connect",
        &reply,
        "--count",
        "2",
        "--mode",
        "leak",
        "--read",
        "--fork-holder",
        "--close-after-fork",
    ]);
    // Leaks that end while traced: late closes.
    let mut late = start_client(&[
        "--connect",
        &reply,
        "--count",
        "3",
        "--mode",
        "leak",
        "--read",
        "--hold-secs",
        "4",
    ]);
    wait_client_done(&mut late, 3);

    let timeout = RUN + Duration::from_secs(10);
    let followed = followed.finish(timeout);
    let events = events.finish(timeout);
    let truth = ss_sockets("close-wait");
    let ctx = context(&followed, &events);
    followed.assert_success();
    events.assert_success();

    // A comparison means something only if neither lost anything.
    for (name, o) in [("followed", &followed), ("events", &events)] {
        let drops = o.summary()["stats"]["kernel"]["ringbuf_drops"].as_u64();
        assert_eq!(
            drops,
            Some(0),
            "{name}: events were dropped, the modes cannot be compared\n{ctx}"
        );
    }
    // The followed mode sent far fewer events to get there.
    let delivered = |o: &TracerOutput| o.summary()["stats"]["delivered"].as_u64().expect("delivered");
    assert!(
        delivered(&followed) < delivered(&events),
        "following sockets in the kernel should send fewer events\n{ctx}"
    );

    let leaks = |o: &TracerOutput| by_cookie(o.leaks().iter().collect(), &ports);
    let (f, e) = (leaks(&followed), leaks(&events));
    // Both agree with the kernel: the leaks still open are ss's CLOSE_WAIT
    // sockets on these ports, both ways.
    let mut ss: Vec<u64> = truth
        .iter()
        .filter(|s| {
            ports
                .iter()
                .any(|p| port_of(&s.local) == Some(*p) || port_of(&s.remote) == Some(*p))
        })
        .map(|s| s.cookie)
        .collect();
    ss.sort_unstable();
    let found: Vec<u64> = f.keys().copied().collect();
    assert_eq!(found, ss, "followed mode vs ss (CLOSE_WAIT on the test's ports)\n{ctx}");
    assert_eq!(found.len(), 4 + 3 + 4 + 2, "fixture sanity: leaks expected\n{ctx}");
    compare("summary leak", &f, &e, &ctx);
    compare(
        "leak event",
        &by_cookie(followed.of_type("leak"), &ports),
        &by_cookie(events.of_type("leak"), &ports),
        &ctx,
    );
    let late_f = by_cookie(followed.of_type("late_close"), &ports);
    assert_eq!(
        late_f.len(),
        3,
        "the exiting client's 3 leaks end as late closes\n{ctx}"
    );
    compare(
        "late close",
        &late_f,
        &by_cookie(events.of_type("late_close"), &ports),
        &ctx,
    );

    // Each kind of evidence was there to compare.
    let has = |f: &str| e.values().any(|l| l.get(f).is_some_and(|v| !v.is_null()));
    for field in ["fd_closed_by", "unread_bytes_at_fin", "owner_source"] {
        assert!(
            has(field),
            "no leak carried {field}: the workload did not cover it\n{ctx}"
        );
    }
    assert!(
        e.values().any(|l| l["owner_source"] == "accept") && e.values().any(|l| l["owner_source"] == "connect"),
        "both connect and accept owners expected\n{ctx}"
    );
    assert!(
        e.values()
            .any(|l| l["open_stack"].as_array().is_some_and(|s| !s.is_empty())),
        "open stacks expected\n{ctx}"
    );
}
