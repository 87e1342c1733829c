//! The tracer's JSON Lines, read from its output file while it writes them
//! (a file, not a pipe: the tracer must never wait on the soak), and boiled
//! down as they come to what the soak reports: status lines, the leaks of
//! the soak's leaking processes, loss lines, the start and the summary.
//! Leak lines carry whole stacks and come by the thousand: only a few facts
//! of each are kept.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde_json::Value;

/// The function of `loadgen leak` that connects (bench/src/bin/loadgen/
/// leak.rs): a stack naming it is the leaker's real stack.
pub const LEAKER_CONNECT_FN: &str = "open_leaking_socket";

/// One status line.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Status {
    pub uptime_s: f64,
    pub events: Option<u64>,
    pub sockets_tracked: Option<u64>,
    pub leaks_now: Option<u64>,
    pub ringbuf_drops: Option<u64>,
    /// Distinct stacks the agent holds, and its bound: only from a tracer
    /// whose status line has them.
    pub stacks_held: Option<u64>,
    pub stacks_cap: Option<u64>,
}

/// What one `leak` line said about a leaking process's socket.
#[derive(Clone, Debug)]
pub struct LeakSeen {
    /// `open_stack` has frames and `open_stack_error` is null.
    pub has_stack: bool,
    /// One of those frames is the leaker's connect function.
    pub names_connect: bool,
    pub stack_error: Option<String>,
    pub close_wait_ms: Option<u64>,
}

pub struct Output {
    file: File,
    /// The end of the file may be half a line: kept until its newline.
    partial: Vec<u8>,
    /// `remote` of the leaking processes' sockets (the soak's reply server).
    leak_remote: String,
    pub start: Option<Value>,
    pub statuses: Vec<Status>,
    /// `leak` lines to `leak_remote`, by pid.
    pub leaks: HashMap<u32, Vec<LeakSeen>>,
    /// `leak` lines of anything else on the host (the churn leaks nothing).
    pub other_leaks: u64,
    /// `late_close` lines of the leaking processes: their leak ended when
    /// they exited, as planned.
    pub leaker_late_closes: u64,
    pub loss_lines: u64,
    pub summary: Option<Value>,
    pub bad_lines: u64,
    pub first_bad_line: Option<String>,
}

impl Output {
    pub fn open(path: &Path, leak_remote: String) -> io::Result<Output> {
        Ok(Output {
            file: File::open(path)?,
            partial: Vec::new(),
            leak_remote,
            start: None,
            statuses: Vec::new(),
            leaks: HashMap::new(),
            other_leaks: 0,
            leaker_late_closes: 0,
            loss_lines: 0,
            summary: None,
            bad_lines: 0,
            first_bad_line: None,
        })
    }

    /// Reads whatever the tracer wrote since the last call.
    pub fn poll(&mut self) -> io::Result<()> {
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = self.file.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            let mut rest = &chunk[..n];
            while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                let line = if self.partial.is_empty() {
                    self.take_line(&rest[..nl]);
                    None
                } else {
                    self.partial.extend_from_slice(&rest[..nl]);
                    Some(std::mem::take(&mut self.partial))
                };
                if let Some(line) = line {
                    self.take_line(&line);
                }
                rest = &rest[nl + 1..];
            }
            self.partial.extend_from_slice(rest);
        }
    }

    /// Leaks seen so far of the leaking processes (lines, not processes).
    pub fn leaker_leak_lines(&self) -> usize {
        self.leaks.values().map(Vec::len).sum()
    }

    fn take_line(&mut self, line: &[u8]) {
        let v: Value = match serde_json::from_slice(line) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                self.bad_lines += 1;
                if self.first_bad_line.is_none() {
                    let text = String::from_utf8_lossy(line);
                    self.first_bad_line = Some(text.chars().take(200).collect());
                }
                return;
            }
        };
        let to_leaker = v["remote"].as_str() == Some(self.leak_remote.as_str());
        match v["type"].as_str() {
            Some("start") => self.start = Some(v),
            Some("status") => self.statuses.push(status(&v)),
            Some("loss") => self.loss_lines += 1,
            Some("summary") => self.summary = Some(v),
            Some("leak") if to_leaker => {
                let pid = v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
                self.leaks.entry(pid).or_default().push(leak(&v));
            }
            Some("leak") => self.other_leaks += 1,
            Some("late_close") if to_leaker => self.leaker_late_closes += 1,
            _ => {}
        }
    }
}

fn status(v: &Value) -> Status {
    let n = |k: &str| v.get(k).and_then(Value::as_u64);
    Status {
        uptime_s: n("uptime_ms").unwrap_or(0) as f64 / 1000.0,
        events: n("events"),
        sockets_tracked: n("sockets_tracked"),
        leaks_now: n("leaks_now"),
        ringbuf_drops: n("ringbuf_drops"),
        stacks_held: n("stacks_held"),
        stacks_cap: n("stacks_cap"),
    }
}

/// The open stack of a leak object: see docs/json.md (or LeakOut in
/// tracer/src/findings.rs): `open_stack` is an array of frames, each with a
/// `symbol` (null when unnamed), and `open_stack_error` says why there is
/// none.
fn leak(v: &Value) -> LeakSeen {
    let frames = v["open_stack"].as_array().map(Vec::as_slice).unwrap_or_default();
    let stack_error = v["open_stack_error"].as_str().map(str::to_owned);
    LeakSeen {
        has_stack: !frames.is_empty() && stack_error.is_none(),
        names_connect: frames
            .iter()
            .any(|f| f["symbol"].as_str().is_some_and(|s| s.contains(LEAKER_CONNECT_FN))),
        stack_error,
        close_wait_ms: v["close_wait_ms"].as_u64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_lines_as_they_are_written() {
        let path = std::env::temp_dir().join(format!("soak-output-{}.jsonl", std::process::id()));
        let mut w = File::create(&path).unwrap();
        let mut out = Output::open(&path, "127.0.0.1:9".into()).unwrap();
        write!(w, r#"{{"type":"start","hooks":[]}}"#).unwrap();
        w.write_all(b"\n").unwrap();
        // Half a status line: the rest comes with the next write.
        write!(w, r#"{{"type":"status","uptime_ms":5000,"sockets_tracked":7,"#).unwrap();
        w.flush().unwrap();
        out.poll().unwrap();
        assert!(out.start.is_some());
        assert!(out.statuses.is_empty(), "half a line is kept back");
        writeln!(w, r#""ringbuf_drops":0,"stacks_held":3,"stacks_cap":100}}"#).unwrap();
        let leak = |pid: u32, remote: &str, stack: &str, err: &str| {
            format!(
                r#"{{"type":"leak","pid":{pid},"remote":"{remote}","close_wait_ms":1100,"open_stack":{stack},"open_stack_error":{err}}}"#
            )
        };
        let frames = r#"[{"symbol":"loadgen::leak::open_leaking_socket"},{"symbol":null}]"#;
        writeln!(w, "{}", leak(10, "127.0.0.1:9", frames, "null")).unwrap();
        writeln!(
            w,
            "{}",
            leak(11, "127.0.0.1:9", "[]", r#""sampled out (--stack-rate)""#)
        )
        .unwrap();
        writeln!(w, "{}", leak(12, "127.0.0.1:8", frames, "null")).unwrap();
        writeln!(w, r#"{{"type":"late_close","pid":10,"remote":"127.0.0.1:9"}}"#).unwrap();
        writeln!(w, "not json").unwrap();
        writeln!(w, r#"{{"type":"summary","stats":{{}}}}"#).unwrap();
        w.flush().unwrap();
        out.poll().unwrap();
        let _ = std::fs::remove_file(&path);

        assert_eq!(out.statuses.len(), 1);
        let s = &out.statuses[0];
        assert_eq!(
            (s.uptime_s, s.sockets_tracked, s.stacks_held, s.stacks_cap),
            (5.0, Some(7), Some(3), Some(100))
        );
        assert_eq!(out.leaks.len(), 2);
        let ok = &out.leaks[&10][0];
        assert!(ok.has_stack && ok.names_connect && ok.stack_error.is_none());
        assert_eq!(ok.close_wait_ms, Some(1100));
        let sampled = &out.leaks[&11][0];
        assert!(!sampled.has_stack && !sampled.names_connect);
        assert_eq!(sampled.stack_error.as_deref(), Some("sampled out (--stack-rate)"));
        assert_eq!(out.other_leaks, 1);
        assert_eq!(out.leaker_late_closes, 1);
        assert_eq!(out.bad_lines, 1);
        assert!(out.summary.is_some());
    }

    #[test]
    fn status_without_stack_fields() {
        let v: Value = serde_json::from_str(r#"{"type":"status","uptime_ms":10,"events":3}"#).unwrap();
        let s = status(&v);
        assert_eq!((s.events, s.stacks_held, s.stacks_cap), (Some(3), None, None));
    }
}
