//! Compact recordings (format version 2) of real traffic: what a recorded
//! connection costs on a loopback churn, that the compact file reports the
//! leaks `live` found, and `--rotate`: the files kept and their union.
//!
//! The churn runs in a process of its own (this test binary, re-run for
//! [`churn_process`]) recorded with `--pid`: both ends of every connection
//! and nothing else on the host, so the size per connection is the
//! recording's own.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracer_tests::recording::checks::*;
use tracer_tests::recording::churn::{self, spawn_churn, start_churn, ChurnSpec};
use tracer_tests::recording::{parse_layout, FORMAT_VERSION};
use tracer_tests::{require_privileges, run_tracer, run_tracer_cmd, start_recorder, TempFile, TracerOutput};

/// How long each tracer runs (`--duration`).
const RUN: Duration = Duration::from_secs(12);
const RUN_ARG: &str = "12s";

/// The target: a recorded connection, at full fidelity.
const MAX_BYTES_PER_CONNECTION: f64 = 150.0;

/// The churn's process body (run by [`spawn_churn`], never on its own).
#[test]
#[ignore = "the churn process of the other tests"]
fn churn_process() {
    churn::churn_process();
}

fn leak_cookies(out: &TracerOutput) -> BTreeSet<u64> {
    out.leaks().iter().filter_map(|l| l["cookie"].as_u64()).collect()
}

fn kernel(out: &TracerOutput, name: &str) -> u64 {
    out.summary()["stats"]["kernel"][name].as_u64().unwrap_or(0)
}

#[test]
fn a_churn_costs_at_most_150_bytes_a_connection_and_reports_as_live() {
    if !require_privileges() {
        return;
    }
    let spec = ChurnSpec {
        connections: 6000,
        rate: 2000,
        leaks: 4,
    };
    let mut churn = spawn_churn(spec);
    let pid = churn.pid().to_string();
    let file = TempFile::new("compact-churn.trc");
    // Long enough for both tracers' start (the churn waits for both), the
    // churn (3 s) and the leaks' second in CLOSE_WAIT after it, in the one
    // that started first: with 7 s a slow start left the recorder ending
    // before its leaks were due (a flaky "report vs live").
    let args = ["--pid", &pid, "--leak-after", "1s", "--duration", RUN_ARG];
    let mut recorder = start_recorder(file.arg(), &args);
    let mut live = run_tracer(&args);
    recorder.wait_recording(START_TIMEOUT);
    live.wait_started(START_TIMEOUT);
    start_churn(&mut churn, Duration::from_secs(30));
    let live_out = live.finish(RUN + EXIT_SLACK);
    let rec = recorder.finish(RUN + EXIT_SLACK);
    check_recorder_finished(&rec, &file);
    live_out.assert_success();
    drop(churn);

    let bytes = file.read();
    let layout = parse_layout(&bytes).unwrap_or_else(|e| panic!("the recording's layout: {e}"));
    assert_eq!(layout.version, FORMAT_VERSION);
    let (ran, report) = run_report(&file);
    check_warnings(&ran, &[], &report.dump());
    let info = report.recording();
    assert!(!info.ended_early && info.damage.is_empty(), "{info:?}");

    // Every event recorded: the size is that of the whole churn.
    let drops = kernel(&report, "ringbuf_drops");
    let events = report.summary()["stats"]["agent"]["events"].as_u64().unwrap_or(0);
    let per_connection = bytes.len() as f64 / spec.connections as f64;
    let measured = format!(
        "{} bytes for {} connections: {per_connection:.1} bytes a connection ({events} events, \
         {drops} ring-buffer drops, {} blocks)",
        bytes.len(),
        spec.connections,
        layout.records.len()
    );
    eprintln!("recording_compact: {measured}");
    assert_eq!(
        drops, 0,
        "events were lost: the size is not that of the churn\n{measured}"
    );
    // With --pid, the server's half-open sockets are not watched before
    // their accept: their first two state changes (and often the FIN) are
    // not sent, 10 events a connection instead of the 13 host-wide.
    assert!(
        events >= 10 * spec.connections,
        "10 events a connection or more were recorded\n{measured}"
    );
    assert!(per_connection <= MAX_BYTES_PER_CONNECTION, "{measured}");
    // And at 13 events a connection, as host-wide, still within the
    // target.
    let per_13_events = bytes.len() as f64 / events as f64 * 13.0;
    assert!(
        per_13_events <= MAX_BYTES_PER_CONNECTION,
        "{per_13_events:.1} bytes for 13 events\n{measured}"
    );

    // The report finds what live found: the leaks, and only them.
    let live_leaks = leak_cookies(&live_out);
    assert_eq!(live_leaks.len(), spec.leaks as usize, "live:\n{}", live_out.dump());
    assert_eq!(leak_cookies(&report), live_leaks, "report vs live\n{}", report.dump());
    for l in report.leaks() {
        assert_eq!(l["unread_bytes"], REPLY, "{l}");
        assert_eq!(l["pid"].as_u64(), Some(u64::from(churn_pid(&pid))), "{l}");
    }
}

fn churn_pid(pid: &str) -> u32 {
    pid.parse().expect("a pid")
}

/// The rotated files of `base` there are, by their index.
fn segments(base: &Path) -> Vec<(u64, PathBuf)> {
    let dir = base.parent().expect("a directory");
    let name = base.file_name().and_then(|n| n.to_str()).expect("a name");
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .expect("read_dir")
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let digits = n.strip_prefix(name)?.strip_prefix('.')?;
            if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some((digits.parse().ok()?, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Removes the rotated files of a test at the end.
struct Segments(PathBuf);

impl Drop for Segments {
    fn drop(&mut self) {
        if std::env::var_os("TRACER_TEST_KEEP").is_none() {
            for (_, p) in segments(&self.0) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

#[test]
fn rotation_keeps_n_files_whose_union_reports_the_recording() {
    if !require_privileges() {
        return;
    }
    const MAX_SIZE: u64 = 64 << 10;
    let spec = ChurnSpec {
        connections: 8000,
        rate: 2500,
        leaks: 3,
    };
    let mut churn = spawn_churn(spec);
    let pid = churn.pid().to_string();
    let base = TempFile::new("rotated.trc");
    let _cleanup = Segments(base.path().to_path_buf());
    let whole = TempFile::new("not-rotated.trc");
    // Long enough for both tracers' start (the churn waits for both), the
    // churn (3 s) and the leaks' second in CLOSE_WAIT after it, in the one
    // that started first: with 7 s a slow start left the recorder ending
    // before its leaks were due (a flaky "report vs live").
    let args = ["--pid", &pid, "--leak-after", "1s", "--duration", RUN_ARG];
    let mut rotated = start_recorder(
        base.arg(),
        &[&args[..], &["--max-size", "64K", "--rotate", "3"]].concat(),
    );
    let mut plain = start_recorder(whole.arg(), &args);
    // The first file is FILE.000000, not FILE.
    rotated
        .child()
        .wait_stderr_line(|l| l.starts_with("tracer: recording to"), START_TIMEOUT);
    plain.wait_recording(START_TIMEOUT);
    start_churn(&mut churn, Duration::from_secs(30));
    let rot = rotated.finish(RUN + EXIT_SLACK);
    let rec = plain.finish(RUN + EXIT_SLACK);
    assert!(rot.status.success(), "{}", rot.dump());
    check_recorder_finished(&rec, &whole);
    drop(churn);
    assert!(!base.path().exists(), "FILE itself is not written with --rotate");

    let files = segments(base.path());
    let ctx = format!("{:?}\n{}", files, rot.dump());
    assert_eq!(files.len(), 3, "the last 3 files are kept\n{ctx}");
    let last = files[2].0;
    assert!(last >= 3, "the recording rotated more than 3 times\n{ctx}");
    assert_eq!(
        files.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![last - 2, last - 1, last],
        "the newest, in sequence\n{ctx}"
    );
    for (i, p) in &files {
        let bytes = std::fs::read(p).expect("read");
        assert!(
            bytes.len() as u64 <= MAX_SIZE,
            "{}: {} bytes\n{ctx}",
            p.display(),
            bytes.len()
        );
        let layout = parse_layout(&bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(layout.header["segment"]["index"], *i, "{}", layout.header);
        assert_eq!(layout.header["segment"]["rotate"], 3, "{}", layout.header);
        // Each file stands alone.
        let ran = run_tracer_cmd(&["report", "--json", p.to_str().expect("utf-8")], CMD_TIMEOUT);
        ran.assert_success();
        let info = ran.output().recording();
        assert!(info.damage.is_empty(), "{}: {info:?}", p.display());
    }

    // Their union, as a shell gives FILE.* (sorted by name): no damage,
    // and the leaks of the recording that was not rotated, named.
    let mut names: Vec<String> = files.iter().map(|(_, p)| p.display().to_string()).collect();
    names.sort();
    let mut cmd = vec!["report", "--json"];
    cmd.extend(names.iter().map(String::as_str));
    let ran = run_tracer_cmd(&cmd, CMD_TIMEOUT);
    ran.assert_success();
    let union = ran.output();
    let info = union.recording();
    assert_eq!(info.files, names);
    assert!(info.damage.is_empty() && !info.ended_early, "{info:?}");
    let (_, full) = run_report(&whole);
    assert_eq!(leak_cookies(&full).len(), spec.leaks as usize, "{}", full.dump());
    assert_eq!(leak_cookies(&union), leak_cookies(&full), "{}", union.dump());
    for l in union.leaks() {
        assert_eq!(l["unread_bytes"], REPLY, "{l}");
        assert!(
            l["cmdline"].as_str().is_some_and(|c| c.contains(churn::CHURN_TEST)),
            "the owner's command line, recorded in an older file: {l}"
        );
    }
    // Each file counts from its start: the kept files' counters add up to
    // what happened in them, about the other recording's (two tracers
    // attach and stop a moment apart), not to the sum of running totals.
    let generated = |o: &TracerOutput| kernel(o, "generated") as f64;
    assert!(
        generated(&union) <= generated(&full) * 1.05,
        "{} events generated in the kept files, {} in the whole recording",
        generated(&union),
        generated(&full)
    );
}

#[test]
fn bad_rotation_options_are_one_line_errors() {
    let file = TempFile::new("never-written.trc");
    for (args, word) in [
        (vec!["--rotate", "3"], "--max-size"),
        (vec!["--rotate", "0", "--max-size", "1M"], "--rotate"),
        (vec!["--rotate", "many", "--max-size", "1M"], "--rotate"),
        (vec!["--rotate", "-1", "--max-size", "1M"], "-1"),
    ] {
        let mut all = vec!["record", "-o", file.arg()];
        all.extend(&args);
        let ran = run_tracer_cmd(&all, CMD_TIMEOUT);
        ran.assert_one_line_error();
        assert!(ran.stderr_lines()[0].contains(word), "{args:?}: {}", ran.describe());
        assert!(!file.path().exists(), "{args:?}");
    }
}
