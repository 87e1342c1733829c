//! Recordings against the truth: `tracer report` of a recording made
//! while `tracer live` ran on the same sockets agrees with it and with
//! `ss`, and a recorder killed with SIGKILL leaves a file `report` reads.
//!
//! Like the other suites, every test has its own server on a random port
//! and only compares sockets of that port with the kernel, so they run in
//! parallel with each other and with anything else on the machine. The
//! reports are made after the traced processes are gone: a recording must
//! carry everything its analysis needs.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use tracer_tests::recording::checks::*;
use tracer_tests::slowed;
use tracer_tests::{
    assert_same_cookies, format_ss, format_stack, require_privileges, run_tracer, stack_has, start_recorder, Evidence,
    Group, Leak, TempFile, TracerOutput, Value,
};

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
    // Well past --leak-after: the recorder has seen them leak (in a slow
    // guest, later: see `slowed`).
    std::thread::sleep(slowed(Duration::from_millis(2500)).saturating_sub(done.elapsed()));
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
