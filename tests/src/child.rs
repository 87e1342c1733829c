//! [`Child`]: a child process that is killed when dropped, with line-by-line
//! access to its stdout (with timeouts) and its collected stderr.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A child process with piped stdin/stdout/stderr. Killed (SIGKILL) and
/// reaped on drop, so a panicking test leaves nothing behind.
pub struct Child {
    name: String,
    child: std::process::Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stdout_closed: bool,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
    status: Option<ExitStatus>,
    /// Children of this process to kill with it (see [`Child::kill_on_drop`]).
    descendants: Vec<u32>,
}

impl Child {
    /// Spawns `cmd` with all three standard streams piped. `name` is used in
    /// panic messages.
    pub fn spawn(name: &str, mut cmd: Command) -> Child {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: failed to spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout piped");
        let stderr_pipe = child.stderr.take().expect("stderr piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let stderr_thread = std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr_pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => sink
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&String::from_utf8_lossy(&buf)),
                }
            }
        });
        Child {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            lines,
            stdout_closed: false,
            seen: Vec::new(),
            stderr,
            stderr_thread: Some(stderr_thread),
            status: None,
            descendants: Vec::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stdout line received so far (including those returned by
    /// [`Child::wait_line`]).
    pub fn lines_seen(&self) -> &[String] {
        &self.seen
    }

    /// Stderr collected so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Describes the child for panic messages: lines seen, stderr, status.
    pub fn describe(&mut self) -> String {
        let status = match self.try_status() {
            Some(s) => format!("exited: {s}"),
            None => "still running".to_string(),
        };
        let mut out = format!("{} (pid {}, {status})\n", self.name, self.pid());
        let _ = writeln!(out, "--- stdout lines seen ({}):", self.seen.len());
        for l in &self.seen {
            let _ = writeln!(out, "  {l}");
        }
        let _ = writeln!(out, "--- stderr:\n{}", self.stderr_text());
        out
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits until a line of stderr matches `pred` and returns it. Panics
    /// with everything seen so far on timeout or if the process exits first.
    pub fn wait_stderr_line(&mut self, mut pred: impl FnMut(&str) -> bool, timeout: Duration) -> String {
        let timeout = slowed(timeout);
        let deadline = Instant::now() + timeout;
        let mut exited_at = None;
        loop {
            if let Some(line) = self.stderr_text().lines().find(|l| pred(l)) {
                return line.to_string();
            }
            let now = Instant::now();
            // After an exit, give the stderr reader a moment to catch up.
            if exited_at.is_none() && !self.is_running() {
                exited_at = Some(now);
            }
            let why = if exited_at.is_some_and(|t| now.duration_since(t) > Duration::from_millis(300)) {
                Some("the process exited".to_string())
            } else if now >= deadline {
                Some(format!("timed out after {timeout:?}"))
            } else {
                None
            };
            if let Some(why) = why {
                let desc = self.describe();
                panic!("{}: {why} waiting for a matching stderr line\n{desc}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Receives the next stdout line, up to `deadline`. `Err(true)` on
    /// timeout, `Err(false)` when stdout is closed.
    fn next_line(&mut self, deadline: Instant) -> Result<String, bool> {
        if self.stdout_closed {
            return Err(false);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                Ok(line)
            }
            Err(RecvTimeoutError::Timeout) => Err(true),
            Err(RecvTimeoutError::Disconnected) => {
                self.stdout_closed = true;
                Err(false)
            }
        }
    }

    /// Waits for the next stdout line matching `pred` and returns it. Panics
    /// with everything seen so far on timeout or if stdout closes first.
    pub fn wait_line(&mut self, mut pred: impl FnMut(&str) -> bool, timeout: Duration) -> String {
        let timeout = slowed(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_line(deadline) {
                Ok(line) if pred(&line) => return line,
                Ok(_) => {}
                Err(timed_out) => {
                    // Give a dying process a moment so the status is shown.
                    if !timed_out {
                        let _ = self.wait_exit(Duration::from_millis(500));
                    }
                    let why = if timed_out {
                        format!("timed out after {timeout:?}")
                    } else {
                        "stdout closed".to_string()
                    };
                    let desc = self.describe();
                    panic!("{}: {why} waiting for a matching stdout line\n{desc}", self.name);
                }
            }
        }
    }

    /// Collects the remaining stdout lines until EOF (or `timeout`).
    pub fn drain_stdout(&mut self, timeout: Duration) {
        let timeout = slowed(timeout);
        let deadline = Instant::now() + timeout;
        while self.next_line(deadline).is_ok() {}
    }

    /// Writes one line to the child's stdin.
    pub fn send_line(&mut self, line: &str) {
        let name = self.name.clone();
        let stdin = self
            .stdin
            .as_mut()
            .unwrap_or_else(|| panic!("{name}: stdin already closed"));
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{name}: writing to stdin: {e}"));
    }

    /// Closes the child's stdin (the fixture client exits on EOF).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let timeout = slowed(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the process to exit, then collects the rest
    /// of stdout (see [`Child::lines_seen`]) and stderr
    /// ([`Child::stderr_text`]). `None` if it is still running.
    pub fn wait_finished(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = self.wait_exit(timeout)?;
        self.drain_stdout(Duration::from_secs(5));
        self.join_stderr(Duration::from_secs(5));
        Some(status)
    }

    /// Is the process still running?
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// SIGKILLs the process (if still running) and reaps it.
    pub fn kill(&mut self) {
        if self.try_status().is_none() {
            self.kill_descendants();
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.descendants.clear();
    }

    /// Also SIGKILL `pid`, a child of this process (e.g. the fixture
    /// client's `--fork-holder` child), when this one is killed or dropped.
    pub fn kill_on_drop(&mut self, pid: u32) {
        if !self.descendants.contains(&pid) {
            self.descendants.push(pid);
        }
    }

    /// Kills the registered children. Only while this process runs: its
    /// children cannot be reaped (nor their pids reused) before it reaps
    /// them, so a pid whose parent is this process is still that child.
    /// Once this process is gone its children are someone else's to reap
    /// (the fixture's holder dies with its parent anyway).
    fn kill_descendants(&mut self) {
        for pid in std::mem::take(&mut self.descendants) {
            if crate::procfs::parent_pid(pid) == Some(self.pid()) {
                if let Ok(pid) = libc::pid_t::try_from(pid) {
                    // SAFETY: kill(2) with plain values; `pid` is our
                    // child's child (checked above).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }

    /// Waits for stderr to reach EOF (after the process exited).
    fn join_stderr(&mut self, timeout: Duration) {
        let timeout = slowed(timeout);
        let deadline = Instant::now() + timeout;
        if let Some(h) = self.stderr_thread.take() {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stdin = None;
        self.kill();
    }
}

/// `timeout` stretched by `TRACER_TEST_SLOWDOWN` (a factor, default 1):
/// under software emulation (`cargo xtask test --kernel`) every program
/// runs several times slower, the tracer's start-up (BTF, verifier) most.
/// What a test waits for stays the same; only how long it waits changes.
pub fn slowed(timeout: Duration) -> Duration {
    static FACTOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let f = *FACTOR.get_or_init(|| {
        std::env::var("TRACER_TEST_SLOWDOWN")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&f| f >= 1)
            .unwrap_or(1)
    });
    timeout * f
}
