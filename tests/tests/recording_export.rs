//! `tracer export` of a recording, in every format, checked against the
//! report of the same recording and against `ss`.

use std::collections::BTreeSet;

use tracer_tests::recording::checks::*;
use tracer_tests::recording::exports::*;
use tracer_tests::{assert_same_cookies, format_ss, require_privileges, run_tracer_cmd, Ran, TempFile};

#[test]
fn exports_round_trip() {
    if !require_privileges() {
        return;
    }
    let (server, port, server_addr) = server();
    let file = TempFile::new("exports.trc");
    // Only the leaky client (--pid), so that every export can be checked
    // exactly; sockets_churning_at_startup_stay_consistent checks the
    // exports of a host-wide recording.
    let (leaky, rec) = record_leaky_client(&server_addr, &file, 3, 4);
    let truth = close_wait_to(&server_addr);
    let leaky_pid = leaky.pid();
    drop((leaky, server));
    check_recorder_finished(&rec, &file);
    assert_eq!(truth.len(), 3, "fixture sanity\n{}", format_ss(&truth));
    let leaked: BTreeSet<u64> = truth.iter().map(|s| s.cookie).collect();

    let (_, report) = run_report(&file);
    let here = leaks_on_port(&report, "summary", port);
    assert_same_cookies(
        &cookies(&here),
        &ss_cookies(&truth),
        &format!("report vs ss\n{}\n{}", dump_port(&report, port), format_ss(&truth)),
    );

    let export = |format: &str| -> Ran {
        let ran = run_tracer_cmd(&["export", "--format", format, file.arg()], CMD_TIMEOUT);
        ran.assert_no_crash();
        ran.assert_success();
        assert!(
            !ran.stderr.contains("warning"),
            "warnings on a clean recording\n{}",
            ran.describe()
        );
        ran
    };

    let jsonl = export("jsonl");
    let facts = jsonl_facts(&jsonl);
    assert_eq!(
        facts.seen,
        leaked,
        "a --pid recording holds the process's sockets, no other\n{}",
        jsonl.describe()
    );
    check_no_closed_leaks(&report, &facts);
    let missing: Vec<&u64> = leaked.difference(&facts.entered_close_wait).collect();
    assert!(
        missing.is_empty(),
        "leaked sockets (per ss) with no state event into CLOSE_WAIT in jsonl: {missing:?}\n{}",
        format_ss(&truth)
    );

    let chrome = export("chrome-trace");
    let (spans, names) = check_chrome_trace(&chrome, &facts.seen);
    for cookie in &leaked {
        let span = &spans[cookie];
        assert_eq!(
            span["pid"].as_u64(),
            Some(u64::from(leaky_pid)),
            "a leaked socket's span is on its owner's track: {span}"
        );
    }
    assert!(
        names
            .get(&u64::from(leaky_pid))
            .is_some_and(|n| n.contains("tcp-fixture")),
        "process_name of the leaky client: {names:?}"
    );

    // folded: `frames count`, the leaks at the end and only those.
    let folded = export("folded");
    let text = folded.stdout_text();
    let ctx = folded.describe();
    let mut total = 0;
    let mut opened_here = 0;
    for line in text.lines() {
        let n = folded_count(line).unwrap_or_else(|| panic!("not a folded line: {line:?}\n{ctx}"));
        assert!(n > 0, "zero count: {line:?}");
        total += n;
        if line.contains("open_connection") {
            assert!(line.starts_with("tcp-fixture;"), "comm first: {line:?}");
            opened_here += n;
        }
    }
    assert_eq!(
        total,
        report.leaks().len() as u64,
        "folded counts vs the report's leaks at the end\n{ctx}\n--- the report's leaks:\n{}",
        capped(
            report
                .leaks()
                .iter()
                .map(|l| format!("  {} {} {} {}\n", l["cookie"], l["pid"], l["comm"], l["remote"]))
                .collect()
        )
    );
    assert_eq!(
        (total, opened_here),
        (3, 3),
        "the leaky client's 3 sockets, opened via open_connection\n{ctx}"
    );

    // flamegraph: well-formed SVG naming the opening function.
    let svg = export("flamegraph");
    let svg_text = svg.stdout_text();
    let opts = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(&svg_text, opts)
        .unwrap_or_else(|e| panic!("the flame graph is not well-formed XML: {e}\n{}", svg.describe()));
    assert_eq!(doc.root_element().tag_name().name(), "svg", "root element");
    let all_text: String = doc.descendants().filter_map(|n| n.text()).collect();
    assert!(
        all_text.contains("open_connection"),
        "no open_connection in the flame graph's text\n{}",
        svg.describe()
    );

    // -o OUT: the same bytes in the file, nothing on stdout.
    for (format, stdout) in [
        ("jsonl", &jsonl),
        ("chrome-trace", &chrome),
        ("folded", &folded),
        ("flamegraph", &svg),
    ] {
        let out = TempFile::new(&format!("export.{format}"));
        let ran = run_tracer_cmd(
            &["export", "--format", format, "-o", out.arg(), file.arg()],
            CMD_TIMEOUT,
        );
        ran.assert_no_crash();
        ran.assert_success();
        assert!(ran.stdout.is_empty(), "-o and output on stdout\n{}", ran.describe());
        assert!(
            out.read() == stdout.stdout,
            "{format}: -o {} differs from stdout",
            out.arg()
        );
    }
}
