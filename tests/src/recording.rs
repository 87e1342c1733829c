//! Recordings (issue 4): running `tracer record` ([`Recorder`]) and the
//! one-shot commands `tracer report` / `tracer export` ([`run_tracer_cmd`],
//! [`Ran`]), the summary's `recording` object ([`RecordingInfo`]) and
//! temporary files ([`TempFile`]). Submodules:
//!
//! * [`layout`]: the file layout, as documented ([`Layout`]), and what the
//!   damage tests need: [`crc32`], a deterministic generator ([`Rng`]).
//! * [`synth`]: synthetic recordings written from the documentation alone
//!   (an independent writer), of any size.
//! * [`checks`]: the fixture server and clients the recording tests use,
//!   and the checks they share (the recorder's contract, warnings, the
//!   report's shape, leaks against `ss`).
//! * [`churn`]: a loopback churn in a process of its own, to record.
//! * [`exports`]: checking `tracer export` output.

pub mod checks;
pub mod churn;
pub mod exports;
pub mod layout;
pub mod synth;

pub use layout::{
    crc32, crc32_of, header_only, hex_around, parse_layout, with_version, Layout, Rng, BLOCK_MAGIC, FORMAT_VERSION,
    MAGIC, VERSION_1, VERSION_OFFSET,
};

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
    /// The command's peak resident memory (its VmHWM), in KiB.
    pub peak_rss_kib: u64,
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
    let deadline = Instant::now() + crate::child::slowed(timeout);
    let (status, peak_rss_kib) = loop {
        match reap(&child) {
            Ok(Some(done)) => break done,
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
        peak_rss_kib,
    }
}

/// `child`'s exit status and peak RSS (KiB) once it has exited. wait4
/// gives the resource use of that one child, which neither
/// `std::process::Child` nor `/proc` (gone at exit) can.
fn reap(child: &std::process::Child) -> std::io::Result<Option<(ExitStatus, u64)>> {
    let pid = libc::pid_t::try_from(child.id()).expect("a pid");
    let mut status = 0;
    // SAFETY: plain syscall with valid pointers to locals.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    match unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) } {
        0 => Ok(None),
        p if p == pid => Ok(Some((
            ExitStatus::from_raw(status),
            u64::try_from(usage.ru_maxrss).unwrap_or(0),
        ))),
        _ => Err(std::io::Error::last_os_error()),
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

#[cfg(test)]
mod tests {
    use super::*;

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
