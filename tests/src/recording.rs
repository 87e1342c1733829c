//! Recordings (issue 4): running `tracer record` ([`Recorder`]) and the
//! one-shot commands `tracer report` / `tracer export` ([`run_tracer_cmd`],
//! [`Ran`]), the summary's `recording` object ([`RecordingInfo`]),
//! temporary files ([`TempFile`]), and what the damage tests need: the file
//! layout ([`Layout`]), a deterministic generator ([`Rng`]) and [`crc32`].
//!
//! The file format, as documented: magic `TRACERCW`, the format version
//! (u32 LE, bytes 8..12), the header length (u32 LE), the header JSON, its
//! CRC32, then records `len:u32 kind:u16 reserved:u16 crc:u32 payload`.

use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::child::Child;
use crate::paths::tracer_bin;
use crate::tracer::TracerOutput;

/// The file's first 8 bytes.
pub const MAGIC: &[u8; 8] = b"TRACERCW";
/// The format version this tracer writes.
pub const FORMAT_VERSION: u32 = 1;
/// Where the version field is.
pub const VERSION_OFFSET: usize = 8;

// ---------------------------------------------------------------------------
// Temporary files
// ---------------------------------------------------------------------------

/// A unique path under [`std::env::temp_dir`], removed (file or directory)
/// on drop. With `TRACER_TEST_KEEP=1` in the environment, the files of a
/// failing test are kept for inspection and their paths printed. Nothing
/// is created.
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// `tracer-test-<pid>-<n>-<nanos>-<name>`: unique across the tests of
    /// one process and across processes.
    pub fn new(name: &str) -> TempFile {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("tracer-test-{}-{n}-{nanos}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        TempFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a command-line argument.
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("temp_dir is valid UTF-8")
    }

    pub fn write(&self, bytes: &[u8]) {
        std::fs::write(&self.path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", self.path.display()));
    }

    pub fn read(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap_or_else(|e| panic!("reading {}: {e}", self.path.display()))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let keep = std::env::var_os("TRACER_TEST_KEEP").is_some_and(|v| v == "1");
        if keep && std::thread::panicking() && self.path.exists() {
            eprintln!("kept {} (the test failed)", self.path.display());
            return;
        }
        if std::fs::remove_file(&self.path).is_err() {
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------
// One-shot commands: report, export
// ---------------------------------------------------------------------------

/// A finished `tracer ...` command: exit status and everything it printed.
pub struct Ran {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Runs `tracer ARGS...` to completion with stdin closed and
/// `RUST_BACKTRACE=1` (so that a panic cannot hide). Panics if it takes
/// longer than `timeout` (the process is killed).
pub fn run_tracer_cmd(args: &[&str], timeout: Duration) -> Ran {
    let what = format!("tracer {}", args.join(" "));
    let mut child = Command::new(tracer_bin())
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot spawn: {e}"));
    let read_all = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = read_all(Box::new(child.stdout.take().expect("piped")));
    let err = read_all(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
                panic!("{what}: still running after {timeout:?}; killed\n--- stderr:\n{stderr}");
            }
        }
    };
    Ran {
        what,
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned(),
    }
}

impl Ran {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }

    /// The command, its status, stdout (cut to a few KiB) and stderr, for
    /// assertion messages.
    pub fn describe(&self) -> String {
        const MAX: usize = 6000;
        let text = self.stdout_text();
        let shown = if text.len() > MAX {
            let mut end = MAX;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}\n[... {} more bytes]", &text[..end], text.len() - end)
        } else {
            text
        };
        format!(
            "{} ({})\n--- stdout:\n{shown}\n--- stderr:\n{}",
            self.what, self.status, self.stderr
        )
    }

    pub fn assert_success(&self) {
        assert!(self.status.success(), "command failed\n{}", self.describe());
    }

    /// A panic message or a backtrace on stderr.
    pub fn panicked(&self) -> bool {
        let lower = self.stderr.to_lowercase();
        lower.contains("panicked") || lower.contains("stack backtrace") || lower.contains("rust_backtrace")
    }

    /// Asserts the command ended by itself (no signal, e.g. an abort or a
    /// crash) and did not panic.
    pub fn assert_no_crash(&self) {
        assert!(
            self.status.signal().is_none() && self.status.code().is_some(),
            "killed by a signal\n{}",
            self.describe()
        );
        assert!(!self.panicked(), "panicked\n{}", self.describe());
    }

    /// Asserts the contract for bad input: a non-zero exit (not a signal),
    /// exactly one non-empty line on stderr, no panic, and nothing on
    /// stdout.
    pub fn assert_one_line_error(&self) {
        self.assert_no_crash();
        assert!(!self.status.success(), "should have failed\n{}", self.describe());
        let lines = self.stderr_lines();
        assert!(
            lines.len() == 1 && !lines[0].trim().is_empty(),
            "stderr should be exactly one non-empty line, got {}\n{}",
            lines.len(),
            self.describe()
        );
        assert!(
            self.stdout.is_empty(),
            "a failed command printed on stdout\n{}",
            self.describe()
        );
    }

    /// Every stdout line as a JSON object with a string `"type"`, or why not.
    pub fn json_lines(&self) -> Result<Vec<Value>, String> {
        let text = std::str::from_utf8(&self.stdout).map_err(|e| format!("stdout is not UTF-8: {e}"))?;
        text.lines()
            .map(|line| match serde_json::from_str::<Value>(line) {
                Ok(v) if v.is_object() && v.get("type").is_some_and(Value::is_string) => Ok(v),
                _ => Err(format!("not a JSON object with a \"type\": {line:?}")),
            })
            .collect()
    }

    /// `report --json` output as a [`TracerOutput`]; panics (with the
    /// output) on a line that is not a JSON object with a `"type"`.
    pub fn output(&self) -> TracerOutput {
        let objects = self.json_lines().unwrap_or_else(|e| panic!("{e}\n{}", self.describe()));
        TracerOutput {
            objects,
            status: self.status,
            stderr: self.stderr.clone(),
        }
    }
}

// ---------------------------------------------------------------------------
// tracer record
// ---------------------------------------------------------------------------

/// A running `tracer record -o FILE ...`.
pub struct Recorder {
    child: Child,
    file: String,
}

/// Spawns `tracer record -o FILE ARGS...`.
pub fn start_recorder(file: &str, args: &[&str]) -> Recorder {
    let mut cmd = Command::new(tracer_bin());
    cmd.arg("record").arg("-o").arg(file).args(args);
    Recorder {
        child: Child::spawn(&format!("tracer record -o {file} {}", args.join(" ")), cmd),
        file: file.to_string(),
    }
}

/// What a finished recorder printed.
pub struct RecordOutput {
    pub status: ExitStatus,
    pub stdout_lines: Vec<String>,
    pub stderr: String,
}

impl RecordOutput {
    pub fn dump(&self) -> String {
        format!(
            "tracer record: {}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.status,
            self.stdout_lines.join("\n"),
            self.stderr
        )
    }
}

impl Recorder {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits for `tracer: recording to FILE` on stderr: the programs are
    /// attached.
    pub fn wait_recording(&mut self, timeout: Duration) {
        let want = format!("tracer: recording to {}", self.file);
        self.child.wait_stderr_line(|l| l.starts_with(&want), timeout);
    }

    /// Waits for the recorder to exit on its own (`--duration`, `--pid`).
    pub fn finish(mut self, timeout: Duration) -> RecordOutput {
        let Some(status) = self.child.wait_finished(timeout) else {
            let desc = self.child.describe();
            self.child.kill();
            panic!("tracer record did not exit within {timeout:?}\n{desc}");
        };
        RecordOutput {
            status,
            stdout_lines: self.child.lines_seen().to_vec(),
            stderr: self.child.stderr_text(),
        }
    }

    /// SIGKILLs the recorder and returns what it printed.
    pub fn kill(mut self) -> RecordOutput {
        self.child.kill();
        let status = self
            .child
            .wait_finished(Duration::from_secs(5))
            .expect("killed and reaped");
        RecordOutput {
            status,
            stdout_lines: self.child.lines_seen().to_vec(),
            stderr: self.child.stderr_text(),
        }
    }
}

// ---------------------------------------------------------------------------
// The summary's "recording" object
// ---------------------------------------------------------------------------

/// `summary.recording` of `tracer report --json`.
#[derive(Clone, Debug)]
pub struct RecordingInfo {
    pub files: Vec<String>,
    pub records: u64,
    pub damage: Vec<String>,
    pub ended_early: bool,
}

impl RecordingInfo {
    /// Parses `summary["recording"]`, checking every field's type.
    pub fn from_summary(summary: &Value) -> Result<RecordingInfo, String> {
        let r = summary
            .get("recording")
            .filter(|r| r.is_object())
            .ok_or_else(|| format!("summary has no \"recording\" object: {summary}"))?;
        let strings = |name: &str| -> Result<Vec<String>, String> {
            r.get(name)
                .and_then(Value::as_array)
                .ok_or_else(|| format!("recording.{name} is not an array: {r}"))?
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("recording.{name} holds a non-string: {r}"))
                })
                .collect()
        };
        Ok(RecordingInfo {
            files: strings("files")?,
            records: r
                .get("records")
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("recording.records is not an unsigned integer: {r}"))?,
            damage: strings("damage")?,
            ended_early: r
                .get("ended_early")
                .and_then(Value::as_bool)
                .ok_or_else(|| format!("recording.ended_early is not a bool: {r}"))?,
        })
    }
}

impl TracerOutput {
    /// `summary.recording`, parsed (panics with the output if malformed).
    pub fn recording(&self) -> RecordingInfo {
        RecordingInfo::from_summary(self.summary()).unwrap_or_else(|e| panic!("{e}\n{}", self.dump()))
    }
}

// ---------------------------------------------------------------------------
// The file layout, and damaging it
// ---------------------------------------------------------------------------

/// Where the parts of a recording are, from the lengths alone (no CRC is
/// checked: the tests damage files, the tracer judges them).
#[derive(Clone, Debug)]
pub struct Layout {
    pub version: u32,
    /// The header JSON.
    pub header: Value,
    /// Offset of the first record (after the header's CRC).
    pub header_end: usize,
    /// `(offset, total length)` of every record, header included.
    pub records: Vec<(usize, usize)>,
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Parses the layout of an intact recording: magic, version, header,
/// and records that tile the rest of the file exactly.
pub fn parse_layout(bytes: &[u8]) -> Result<Layout, String> {
    if bytes.get(..8) != Some(&MAGIC[..]) {
        return Err("no TRACERCW magic".to_string());
    }
    let version = le_u32(bytes, VERSION_OFFSET).ok_or("cut in the version")?;
    let header_len = le_u32(bytes, 12).ok_or("cut in the header length")? as usize;
    let json = bytes.get(16..16 + header_len).ok_or("cut in the header")?;
    let header: Value = serde_json::from_slice(json).map_err(|e| format!("header is not JSON: {e}"))?;
    let header_end = 16 + header_len + 4;
    if bytes.len() < header_end {
        return Err("cut in the header CRC".to_string());
    }
    let mut records = Vec::new();
    let mut at = header_end;
    while at < bytes.len() {
        let len = le_u32(bytes, at).ok_or_else(|| format!("record at {at}: cut in its length"))? as usize;
        let total = 12 + len;
        if at + total > bytes.len() {
            return Err(format!(
                "record at {at} ({total} bytes) runs past the end ({})",
                bytes.len()
            ));
        }
        records.push((at, total));
        at += total;
    }
    Ok(Layout {
        version,
        header,
        header_end,
        records,
    })
}

/// `bytes` with the format version field set to `version`.
pub fn with_version(bytes: &[u8], version: u32) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[VERSION_OFFSET..VERSION_OFFSET + 4].copy_from_slice(&version.to_le_bytes());
    out
}

/// A file with only a header: magic, `version`, the header JSON and its
/// CRC32.
pub fn header_only(version: u32, header_json: &str) -> Vec<u8> {
    let json = header_json.as_bytes();
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&u32::try_from(json.len()).expect("small header").to_le_bytes());
    out.extend_from_slice(json);
    out.extend_from_slice(&crc32(json).to_le_bytes());
    out
}

/// CRC-32 (IEEE 802.3, the zlib one).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A small deterministic generator (xorshift64*), so that damage is the
/// same on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        assert!(hi > lo, "empty range {lo}..{hi}");
        lo + (self.next_u64() % (hi - lo) as u64) as usize
    }

    /// A byte that is not zero (an XOR with it changes something).
    pub fn nonzero_byte(&mut self) -> u8 {
        (self.next_u64() % 255) as u8 + 1
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Hex dump of `bytes[at - 8 .. at + 8]`, for messages about damage.
pub fn hex_around(bytes: &[u8], at: usize) -> String {
    let lo = at.saturating_sub(8);
    let hi = (at + 8).min(bytes.len());
    let mut out = format!("@{lo}:");
    for b in &bytes[lo..hi] {
        let _ = write!(out, " {b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            let x = a.range(10, 20);
            assert_eq!(x, b.range(10, 20));
            assert!((10..20).contains(&x));
            assert_ne!(a.nonzero_byte(), 0);
            b.nonzero_byte();
        }
    }

    #[test]
    fn layout_of_a_synthetic_file() {
        let mut file = header_only(FORMAT_VERSION, r#"{"a":1}"#);
        let header_end = file.len();
        // Two records: 3 and 0 payload bytes.
        for payload in [&b"xyz"[..], &b""[..]] {
            file.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
            file.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
            file.extend_from_slice(payload);
        }
        let l = parse_layout(&file).unwrap();
        assert_eq!(l.version, FORMAT_VERSION);
        assert_eq!(l.header["a"], 1);
        assert_eq!(l.header_end, header_end);
        assert_eq!(l.records, vec![(header_end, 15), (header_end + 15, 12)]);
        assert_eq!(parse_layout(&with_version(&file, 2)).unwrap().version, 2);
        assert!(parse_layout(&file[..file.len() - 1]).is_err());
        assert!(parse_layout(b"TRACERCX").is_err());
    }

    #[test]
    fn recording_info() {
        let s = serde_json::json!({"recording": {"files": ["a"], "records": 3, "damage": ["x"], "ended_early": true}});
        let r = RecordingInfo::from_summary(&s).unwrap();
        assert_eq!(
            (r.files, r.records, r.damage, r.ended_early),
            (vec!["a".to_string()], 3, vec!["x".to_string()], true)
        );
        assert!(RecordingInfo::from_summary(&serde_json::json!({})).is_err());
        let bad = serde_json::json!({"recording": {"files": ["a"], "records": 3, "damage": [1], "ended_early": true}});
        assert!(RecordingInfo::from_summary(&bad).is_err());
    }
}
