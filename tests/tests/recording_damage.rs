//! Damaged and bogus recordings: a real recording damaged in about 30
//! ways (cut, flipped, both; in the header and among the records), and
//! files that are not recordings at all. The reader must never crash;
//! damage after the header is never fatal and always reported; anything
//! else is a one-line error.

use std::os::unix::process::ExitStatusExt;

use tracer_tests::recording::checks::*;
use tracer_tests::recording::exports::socket_spans;
use tracer_tests::recording::{hex_around, parse_layout, with_version, Layout, Rng, FORMAT_VERSION};
use tracer_tests::{
    assert_same_cookies, format_ss, require_privileges, run_tracer_cmd, start_client, start_recorder, Ran, TempFile,
    Value,
};

// ---------------------------------------------------------------------------
// c. damaged recordings
// ---------------------------------------------------------------------------

/// One way of damaging a file.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Keep only the first N bytes.
    Truncate(usize),
    /// XOR the byte at this offset with a non-zero value.
    Flip(usize, u8),
}

/// `Damage`s applied together.
#[derive(Clone, Debug)]
struct Variant(Vec<Damage>);

impl Variant {
    fn apply(&self, bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        for d in &self.0 {
            if let Damage::Flip(at, x) = *d {
                out[at] ^= x;
            }
        }
        for d in &self.0 {
            if let Damage::Truncate(n) = *d {
                out.truncate(n);
            }
        }
        out
    }

    fn truncated(&self) -> bool {
        self.0.iter().any(|d| matches!(d, Damage::Truncate(_)))
    }

    /// The lowest offset touched: a truncation at N touches N.
    fn first_offset(&self) -> usize {
        self.0
            .iter()
            .map(|d| match *d {
                Damage::Truncate(n) | Damage::Flip(n, _) => n,
            })
            .min()
            .unwrap_or(usize::MAX)
    }
}

/// About 30 deterministic variants: truncations and flips in the header,
/// truncations and flips among the records (also on record boundaries),
/// and both at once.
fn variants(len: usize, layout: &Layout) -> Vec<Variant> {
    let mut rng = Rng::new(0x7ACE_2C3D);
    let h = layout.header_end;
    let mut v = Vec::new();
    for _ in 0..4 {
        v.push(Variant(vec![Damage::Truncate(rng.range(1, h))]));
    }
    for _ in 0..4 {
        v.push(Variant(vec![Damage::Flip(rng.range(0, h), rng.nonzero_byte())]));
    }
    // The version field and the header length, on purpose.
    v.push(Variant(vec![Damage::Flip(9, 0x80)]));
    v.push(Variant(vec![Damage::Flip(13, 0x01)]));
    // No record at all, then cuts between records.
    v.push(Variant(vec![Damage::Truncate(h)]));
    for _ in 0..2 {
        let (at, _) = layout.records[rng.range(1, layout.records.len())];
        v.push(Variant(vec![Damage::Truncate(at)]));
    }
    for _ in 0..7 {
        v.push(Variant(vec![Damage::Truncate(rng.range(h + 1, len))]));
    }
    for _ in 0..8 {
        v.push(Variant(vec![Damage::Flip(rng.range(h, len), rng.nonzero_byte())]));
    }
    // A record's (block's) length field.
    let (at, _) = layout.records[rng.range(0, layout.records.len())];
    v.push(Variant(vec![Damage::Flip(layout.length_field(at), 0x40)]));
    for _ in 0..2 {
        let flip = rng.range(h, len - 1);
        v.push(Variant(vec![
            Damage::Flip(flip, rng.nonzero_byte()),
            Damage::Truncate(rng.range(flip + 1, len)),
        ]));
    }
    v
}

#[test]
fn damaged_recordings_never_panic() {
    if !require_privileges() {
        return;
    }
    let (server, port, server_addr) = server();
    let file = TempFile::new("damage-orig.trc");
    // Only the client's sockets (--pid): what the recording holds, and so
    // what the damage hits, does not depend on what else runs on the host.
    let (client, rec) = record_leaky_client(&server_addr, &file, 3, 3);
    let truth = close_wait_to(&server_addr);
    drop((client, server));
    check_recorder_finished(&rec, &file);

    let (_, original) = run_report(&file);
    let octx = format!("=== original report:\n{}", dump_port(&original, port));
    let here = leaks_on_port(&original, "summary", port);
    assert_same_cookies(
        &cookies(&here),
        &ss_cookies(&truth),
        &format!("original summary vs ss\n{}\n{octx}", format_ss(&truth)),
    );
    let original_records = original.recording().records;
    // A damaged copy can lose leaks, never invent one.
    let allowed = all_leak_cookies(&original);

    let bytes = file.read();
    let layout = parse_layout(&bytes).unwrap_or_else(|e| panic!("the recording's layout: {e}\n{octx}"));
    assert_eq!(layout.version, FORMAT_VERSION, "format version");
    assert!(layout.records.len() > 3, "too few records to damage: {layout:?}");
    let all = variants(bytes.len(), &layout);
    assert!(all.len() >= 30);

    let damaged = TempFile::new("damaged.trc");
    for (i, variant) in all.iter().enumerate() {
        let copy = variant.apply(&bytes);
        damaged.write(&copy);
        let in_records = variant.first_offset() >= layout.header_end;
        let ctx = format!(
            "variant #{i} {variant:?} of a {}-byte recording (header ends at {}, {} records); bytes {}",
            bytes.len(),
            layout.header_end,
            layout.records.len(),
            hex_around(&bytes, variant.first_offset().min(bytes.len() - 1)),
        );

        let ran = run_tracer_cmd(&["report", "--json", damaged.arg()], CMD_TIMEOUT);
        check_damaged_run(&ran, in_records, &ctx);
        if ran.status.success() {
            let out = ran.output();
            let sums = out.of_type("summary");
            assert_eq!(sums.len(), 1, "one summary\n{}\n{ctx}", ran.describe());
            check_report_shape(&out);
            let info = out.recording();
            assert!(
                !info.damage.is_empty(),
                "damage not reported: {info:?}\n{}\n{ctx}",
                ran.describe()
            );
            assert_eq!(info.files, vec![damaged.arg().to_string()], "recording.files\n{ctx}");
            check_warnings(&ran, &info.damage, &ctx);
            if variant.truncated() {
                assert!(info.ended_early, "a cut file ended early: {info:?}\n{ctx}");
            }
            if in_records {
                assert!(
                    info.records < original_records,
                    "{} records read from a damaged copy of {original_records}\n{ctx}",
                    info.records
                );
            }
            let extra: Vec<u64> = all_leak_cookies(&out).difference(&allowed).copied().collect();
            assert!(
                extra.is_empty(),
                "leaks the intact recording does not have: {extra:?}\n{}\n{ctx}\n{octx}",
                ran.describe()
            );
        }

        let ran = run_tracer_cmd(&["export", "--format", "chrome-trace", damaged.arg()], CMD_TIMEOUT);
        check_damaged_run(&ran, in_records, &ctx);
        if ran.status.success() {
            let doc: Value = serde_json::from_slice(&ran.stdout)
                .unwrap_or_else(|e| panic!("chrome-trace is not JSON: {e}\n{}\n{ctx}", ran.describe()));
            socket_spans(&doc, &ctx);
        }
    }
}

/// Either success or a one-line error; never a crash. Damage after the
/// header is never fatal.
fn check_damaged_run(ran: &Ran, in_records: bool, ctx: &str) {
    assert!(
        ran.status.signal().is_none(),
        "killed by a signal\n{}\n{ctx}",
        ran.describe()
    );
    assert!(!ran.panicked(), "panicked\n{}\n{ctx}", ran.describe());
    if ran.status.success() {
        return;
    }
    assert!(
        !in_records,
        "damage after the header must not be fatal\n{}\n{ctx}",
        ran.describe()
    );
    let lines = ran.stderr_lines();
    assert!(
        lines.len() == 1 && !lines[0].trim().is_empty() && ran.stdout.is_empty(),
        "a failure must be exactly one stderr line and no stdout\n{}\n{ctx}",
        ran.describe()
    );
}

// ---------------------------------------------------------------------------
// d. bad files
// ---------------------------------------------------------------------------

/// The commands that read recordings.
fn readers(path: &str) -> Vec<Vec<String>> {
    let cmds: [&[&str]; 5] = [
        &["report", "--json"],
        &["report"],
        &["export", "--format", "jsonl"],
        &["export", "--format", "chrome-trace"],
        &["export", "--format", "flamegraph"],
    ];
    cmds.iter()
        .map(|c| {
            let mut v: Vec<String> = c.iter().map(|s| s.to_string()).collect();
            v.push(path.to_string());
            v
        })
        .collect()
}

fn assert_all_readers_fail(path: &str, case: &str, must_mention: Option<&str>) {
    for args in readers(path) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ran = run_tracer_cmd(&args, CMD_TIMEOUT);
        let what = format!("{case}: {}", ran.describe());
        assert!(ran.status.signal().is_none() && !ran.panicked(), "crashed on {what}");
        assert!(!ran.status.success(), "accepted {what}");
        let lines = ran.stderr_lines();
        assert!(
            lines.len() == 1 && !lines[0].trim().is_empty(),
            "stderr should be exactly one line for {what}"
        );
        assert!(ran.stdout.is_empty(), "printed on stdout for {what}");
        if let Some(word) = must_mention {
            assert!(
                lines[0].to_lowercase().contains(word),
                "the error should say {word:?} for {what}"
            );
        }
    }
}

#[test]
fn bad_files_are_one_line_errors() {
    // Reading needs no privileges: these run as any user.
    let missing = TempFile::new("missing.trc");
    assert_all_readers_fail(missing.arg(), "a missing file", None);

    let dir = TempFile::new("a-directory");
    std::fs::create_dir(dir.path()).expect("mkdir");
    assert_all_readers_fail(dir.arg(), "a directory", None);

    let empty = TempFile::new("empty.trc");
    empty.write(b"");
    assert_all_readers_fail(empty.arg(), "an empty file", None);

    let random = TempFile::new("random.trc");
    random.write(&Rng::new(4096).bytes(4096));
    assert_all_readers_fail(random.arg(), "4 KiB of random bytes", None);

    let magic_only = TempFile::new("magic-only.trc");
    magic_only.write(tracer_tests::recording::MAGIC);
    assert_all_readers_fail(magic_only.arg(), "the magic number alone", None);

    // A file from a newer tracer may have another header: the version is
    // checked first.
    let newer = TempFile::new("newer-synthetic.trc");
    newer.write(&tracer_tests::recording::header_only(
        FORMAT_VERSION + 1,
        r#"{"from":"the future"}"#,
    ));
    assert_all_readers_fail(newer.arg(), "a newer version's header", Some("newer"));

    // A real recording with a newer version (recording needs root).
    if !require_privileges() {
        return;
    }
    // A process with no socket: a recording without any leak.
    let mut idle = start_client(&["--connect", "127.0.0.1:9", "--wait-stdin-line"]);
    let file = TempFile::new("real.trc");
    let pid = idle.pid().to_string();
    let rec = start_recorder(file.arg(), &["--pid", &pid, "--duration", "1s"]).finish(START_TIMEOUT + EXIT_SLACK);
    check_recorder_finished(&rec, &file);
    idle.kill();

    let (ran, out) = run_report(&file);
    check_warnings(&ran, &[], &out.dump());
    let info = out.recording();
    assert!(!info.ended_early && info.damage.is_empty(), "{info:?}\n{}", out.dump());
    assert!(out.leaks().is_empty(), "nothing leaked\n{}", out.dump());

    // Nothing leaked: no flame graph, and it says so in one line.
    let ran = run_tracer_cmd(&["export", "--format", "flamegraph", file.arg()], CMD_TIMEOUT);
    ran.assert_one_line_error();
    let ran = run_tracer_cmd(&["export", "--format", "folded", file.arg()], CMD_TIMEOUT);
    ran.assert_no_crash();
    if ran.status.success() {
        assert!(
            ran.stdout_text().trim().is_empty(),
            "folded stacks without any leak\n{}",
            ran.describe()
        );
    }

    let newer = TempFile::new("newer-real.trc");
    newer.write(&with_version(&file.read(), FORMAT_VERSION + 1));
    assert_all_readers_fail(newer.arg(), "a real recording with a newer version", Some("newer"));
}
