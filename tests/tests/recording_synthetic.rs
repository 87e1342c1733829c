//! Recordings written from the format's documentation alone
//! (tracer_tests::recording::synth), read by the `tracer` binary: the
//! snapshot of a 200k-socket host, the counters of several files, crafted
//! values at the ends of their ranges, names that would break the folded
//! format. And the command line: `record --events` is refused. None of
//! these needs privileges.

use std::fs::File;
use std::io::{self, BufWriter};
use std::time::Duration;

use tracer_tests::recording::synth::{self, Writer, SEC, TCP_CLOSE_WAIT, TCP_ESTABLISHED};
use tracer_tests::{run_tracer_cmd, Ran, TempFile, Value};

/// Generous: a debug build reads the 200k-socket snapshot in seconds.
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

/// Writes a recording with `header` and what `body` writes.
fn recording(
    name: &str,
    header: &Value,
    body: impl FnOnce(&mut Writer<BufWriter<File>>) -> io::Result<()>,
) -> TempFile {
    let file = TempFile::new(name);
    let out = BufWriter::new(File::create(file.path()).expect("create"));
    let mut w = Writer::new(out, header).expect("write");
    body(&mut w).expect("write");
    w.finish().expect("flush");
    file
}

fn report_json(files: &[&TempFile], extra: &[&str]) -> (Ran, Vec<Value>) {
    let mut args = vec!["report", "--json"];
    args.extend_from_slice(extra);
    args.extend(files.iter().map(|f| f.arg()));
    let ran = run_tracer_cmd(&args, CMD_TIMEOUT);
    ran.assert_no_crash();
    ran.assert_success();
    let lines = ran.json_lines().unwrap_or_else(|e| panic!("{e}\n{}", ran.describe()));
    (ran, lines)
}

fn of_type<'a>(lines: &'a [Value], ty: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["type"] == ty).collect()
}

#[test]
fn a_200k_socket_snapshot_replays_with_its_sockets() {
    const N: u64 = 200_000;
    let t0 = 1000 * SEC;
    let file = recording("200k.trc", &synth::header(5000), |w| {
        w.process(42, "server")?;
        // Every 200th socket leaked, in CLOSE_WAIT for 10 s already.
        let sockets: Vec<Value> = (1..=N)
            .map(|c| {
                if c % 200 == 0 {
                    synth::snapshot_socket(c, TCP_CLOSE_WAIT, 42, Some(10 * SEC))
                } else {
                    synth::snapshot_socket(c, TCP_ESTABLISHED, 42, None)
                }
            })
            .collect();
        w.snapshot(t0, &sockets, 8192)?;
        w.tick(t0 + SEC)?;
        w.end(t0 + SEC)
    });
    let size = std::fs::metadata(file.path()).expect("stat").len();
    assert!(
        size > 16 << 20,
        "the snapshot alone would pass the record limit: {size} bytes"
    );

    let (ran, lines) = report_json(&[&file], &[]);
    let start = of_type(&lines, "start");
    assert_eq!(start[0]["preexisting_sockets"], N, "{}", ran.describe());
    let summary = lines.last().expect("a summary");
    assert_eq!(summary["stats"]["agent"]["sockets_tracked"], N, "{summary}");
    assert_eq!(summary["recording"]["damage"], serde_json::json!([]), "{summary}");
    let leaks = summary["leaks"].as_array().expect("leaks");
    assert_eq!(leaks.len() as u64, N / 200);
    assert!(leaks
        .iter()
        .all(|l| l["close_wait_estimated"] == true && l["pid"] == 42));
    assert!(ran.stderr.is_empty(), "{}", ran.describe());

    // The text report says so at its start.
    let ran = run_tracer_cmd(&["report", file.arg()], CMD_TIMEOUT);
    ran.assert_success();
    assert!(ran.stderr.contains("200000 sockets already open"), "{}", ran.describe());
}

#[test]
fn counters_of_several_files_are_summed() {
    // Each recording counts from zero. A tracer that subtracts the first
    // file's 100 drops from the second's 5 underflows (a panic in a debug
    // build, 2^64 - 95 drops in a release build).
    let a = recording("counters-a.trc", &synth::header(1000), |w| {
        w.stats(SEC, &[("ringbuf_drops", 100), ("generated", 1000)])?;
        w.end(2 * SEC)
    });
    let b = recording("counters-b.trc", &synth::header(1000), |w| {
        w.stats(3 * SEC, &[("ringbuf_drops", 5), ("stack_errors", 1), ("generated", 10)])?;
        w.stats(5 * SEC, &[("ringbuf_drops", 7), ("stack_errors", 1), ("generated", 30)])?;
        w.end(6 * SEC)
    });
    let (ran, lines) = report_json(&[&a, &b], &[]);
    let losses: Vec<(&Value, &Value)> = of_type(&lines, "loss")
        .into_iter()
        .map(|l| (&l["kernel"]["ringbuf_drops"], &l["new_ringbuf_drops"]))
        .collect();
    let n = |v: u64| Value::from(v);
    assert_eq!(
        losses,
        vec![(&n(100), &n(100)), (&n(105), &n(5)), (&n(107), &n(2))],
        "{}",
        ran.describe()
    );
    let k = &lines.last().expect("summary")["stats"]["kernel"];
    assert_eq!(
        (&k["ringbuf_drops"], &k["stack_errors"], &k["generated"]),
        (&n(107), &n(1), &n(1030)),
        "{}",
        ran.describe()
    );
    // The text report too.
    let ran = run_tracer_cmd(&["report", a.arg(), b.arg()], CMD_TIMEOUT);
    ran.assert_no_crash();
    ran.assert_success();
}

/// Every command that reads recordings, on `file`: none may crash.
fn read_every_way(file: &TempFile) {
    let cmds: [&[&str]; 8] = [
        &["report", "--json"],
        &["report"],
        &["report", "--events"],
        &["report", "--leak-after", "1ms"],
        &["export", "--format", "jsonl"],
        &["export", "--format", "chrome-trace"],
        &["export", "--format", "folded"],
        &["export", "--format", "flamegraph"],
    ];
    for cmd in cmds {
        let mut args = cmd.to_vec();
        args.push(file.arg());
        let ran = run_tracer_cmd(&args, CMD_TIMEOUT);
        ran.assert_no_crash();
        if !ran.status.success() {
            // Only the flame graph of a recording without leaks fails.
            assert!(cmd.contains(&"flamegraph"), "{}", ran.describe());
            ran.assert_one_line_error();
        }
    }
}

#[test]
fn crafted_values_at_the_ends_of_their_ranges_never_crash() {
    let max = u64::MAX;
    let comm = b"client";
    // A threshold whose nanoseconds pass u64, a clock offset at i64's end,
    // events on the clock's last nanoseconds.
    let mut header = synth::header(u64::MAX);
    header["boot_to_wall_offset_ns"] = i64::MAX.into();
    let huge = recording("crafted-huge.trc", &header, |w| {
        synth::connect_then_fin(w, (max - 20, max - 10), 7, comm, 1, synth::NO_STACK)?;
        w.stats(max, &[("ringbuf_drops", max), ("generated", max)])?;
        w.tick(max)?;
        w.end(max)
    });
    read_every_way(&huge);

    // A leak found on the clock's last nanosecond and closed then: its
    // late close is past since + threshold, beyond u64.
    let late = recording("crafted-late.trc", &synth::header(1000), |w| {
        synth::connect_then_fin(w, (max - 20, max - 10), 7, comm, 1, synth::NO_STACK)?;
        w.tick(max)?;
        w.event(&synth::fd_event(synth::CLOSE, max, 7, comm, 1, 3))?;
        w.event(&synth::state_event(max, 7, comm, 1, TCP_CLOSE_WAIT, 9, synth::NO_STACK))?;
        w.end(max)
    });
    read_every_way(&late);
    let (ran, lines) = report_json(&[&late], &[]);
    let closes = of_type(&lines, "late_close");
    assert_eq!(closes.len(), 1, "{}", ran.describe());
    assert_eq!(closes[0]["closed_after_ms"], 0, "{}", ran.describe());
}

#[test]
fn folded_export_keeps_one_frame_per_name_whatever_the_names() {
    // A process may name itself anything (prctl PR_SET_NAME): separators,
    // spaces, a newline.
    let comm = b"a;b c\nd";
    let file = recording("folded-names.trc", &synth::header(1000), |w| {
        w.process(7, "a;b c\nd")?;
        w.json(
            synth::kind::STACK,
            &serde_json::json!({"key": {"pid": 7, "id": 0}, "frames": {"Ok": [
                {"ip": "0x1", "symbol": "connect", "module": null, "offset": null, "file": null, "line": null, "kernel": false},
                {"ip": "0x2", "symbol": "open(int, char *)", "module": null, "offset": null, "file": null, "line": null, "kernel": false},
                {"ip": "0x3", "symbol": "main;\n", "module": null, "offset": null, "file": null, "line": null, "kernel": false},
            ]}}),
        )?;
        synth::connect_then_fin(w, (SEC, 2 * SEC), 7, comm, 1, 0)?;
        synth::connect_then_fin(w, (SEC, 2 * SEC), 7, comm, 2, 0)?;
        w.tick(4 * SEC)?;
        w.end(4 * SEC)
    });
    let ran = run_tracer_cmd(&["export", "--format", "folded", file.arg()], CMD_TIMEOUT);
    ran.assert_success();
    let text = ran.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec!["a:b_c_d;main:_;open(int,_char_*);connect 2"],
        "{}",
        ran.describe()
    );
    // And the flame graph tool reads it.
    let ran = run_tracer_cmd(&["export", "--format", "flamegraph", file.arg()], CMD_TIMEOUT);
    ran.assert_success();
    assert!(ran.stdout_text().contains("open(int,_char_*)"), "{}", ran.describe());
}

#[test]
fn record_refuses_events_in_one_line() {
    // --events prints every event; `record` prints none (report --events
    // does, from the recording).
    let file = TempFile::new("never-written.trc");
    // --duration: a tracer that accepted it would stop soon, and fail.
    let ran = run_tracer_cmd(
        &["record", "-o", file.arg(), "--duration", "1s", "--events"],
        CMD_TIMEOUT,
    );
    ran.assert_one_line_error();
    assert!(ran.stderr.contains("--events"), "{}", ran.describe());
    assert!(!file.path().exists(), "record created its file anyway");
    for ok in [
        &["live", "--events", "--help"][..],
        &["report", "--events", "--help"][..],
    ] {
        let ran = run_tracer_cmd(ok, CMD_TIMEOUT);
        ran.assert_success();
    }
}
