//! Harness for the `tracer` integration tests.
//!
//! * [`require_privileges`]: root check (skip locally, fail in CI).
//! * [`Child`]: a child process that is killed when dropped, with
//!   line-by-line access to its stdout (with timeouts).
//! * [`spawn_server`] / [`spawn_client`]: the `tcp-fixture` program.
//! * [`run_tracer`] / [`Tracer`] / [`TracerOutput`]: `tracer live --json`.
//! * [`ss_sockets`] / [`SsMonitor`]: ground truth from the kernel via `ss`.
//! * [`assert_same_cookies`]: set comparison that shows both differences.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use serde_json::Value;

// ---------------------------------------------------------------------------
// Privileges and paths
// ---------------------------------------------------------------------------

fn current_test_name() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("this test")
        .to_string()
}

/// Returns true when running as root. Otherwise panics when the `CI`
/// environment variable is set (in CI these tests must fail, never skip), or
/// prints a skip notice and returns false so the test can return early.
pub fn require_privileges() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let test = current_test_name();
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!(
            "{test} needs root to load eBPF programs, and CI is set: refusing to skip. \
             Run the tests as root (e.g. `cargo xtask test`)."
        );
    }
    eprintln!("skipping: {test} needs root to load eBPF programs (run as root or via `cargo xtask test`)");
    false
}

/// `target/<profile>/` of the running test binary (`target/<profile>/deps/x`).
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent directory");
    // Integration and unit test binaries live in target/<profile>/deps.
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// The `tracer` binary: `$TRACER_BIN`, else `target/<profile>/tracer` next
/// to the test binary's `deps/` directory.
pub fn tracer_bin() -> PathBuf {
    let path = match std::env::var_os("TRACER_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => target_profile_dir().join("tracer"),
    };
    assert!(
        path.is_file(),
        "tracer binary not found at {}: build it first: cargo build -p tracer, \
         or run `cargo xtask test` (or point TRACER_BIN at it)",
        path.display()
    );
    path
}

/// The `tcp-fixture` binary of this package. Cargo exposes
/// `CARGO_BIN_EXE_tcp-fixture` to integration tests (at compile time, and at
/// run time under `cargo test`); this library is compiled without it, so it
/// reads the run-time variable and falls back to `target/<profile>/`.
pub fn fixture_bin() -> PathBuf {
    let path = match std::env::var_os("CARGO_BIN_EXE_tcp-fixture") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => target_profile_dir().join("tcp-fixture"),
    };
    assert!(
        path.is_file(),
        "tcp-fixture binary not found at {}: build it first: cargo build -p tracer-tests",
        path.display()
    );
    path
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

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
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// Waits for stderr to reach EOF (after the process exited).
    fn join_stderr(&mut self, timeout: Duration) {
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

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

/// One `SOCK <local> <remote> <fd>` line of the fixture client. Addresses
/// are normalised with [`normalize_addr`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SockLine {
    pub local: String,
    pub remote: String,
    pub fd: i32,
}

impl SockLine {
    pub fn parse(line: &str) -> Option<SockLine> {
        let mut it = line.split_whitespace();
        if it.next()? != "SOCK" {
            return None;
        }
        let local = normalize_addr(it.next()?);
        let remote = normalize_addr(it.next()?);
        let fd = it.next()?.parse().ok()?;
        if it.next().is_some() {
            return None;
        }
        Some(SockLine { local, remote, fd })
    }
}

/// Starts `tcp-fixture server --listen LISTEN ARGS...` and waits for its
/// `READY <port>` line.
pub fn spawn_server(listen: &str, args: &[&str]) -> (Child, u16) {
    let mut cmd = Command::new(fixture_bin());
    cmd.arg("server").arg("--listen").arg(listen).args(args);
    let mut child = Child::spawn(&format!("fixture server {listen} {args:?}"), cmd);
    let line = child.wait_line(|l| l.starts_with("READY "), Duration::from_secs(10));
    let port = line["READY ".len()..]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad READY line from fixture server: {line:?}"));
    (child, port)
}

/// Starts `tcp-fixture client ARGS...` without waiting for anything (use
/// with `--wait-stdin-line`, then [`wait_client_done`]).
pub fn start_client(args: &[&str]) -> Child {
    let mut cmd = Command::new(fixture_bin());
    cmd.arg("client").args(args);
    Child::spawn(&format!("fixture client {args:?}"), cmd)
}

/// Waits for the client's `DONE <pid>` line and its `count` `SOCK` lines.
pub fn wait_client_done(child: &mut Child, count: usize) -> Vec<SockLine> {
    let timeout = Duration::from_secs(20);
    let done = child.wait_line(|l| l.starts_with("DONE "), timeout);
    let pid: u32 = done["DONE ".len()..]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad DONE line: {done:?}"));
    assert_eq!(pid, child.pid(), "DONE pid is not the child's pid");
    let mut socks = Vec::with_capacity(count);
    while socks.len() < count {
        let line = child.wait_line(|l| l.starts_with("SOCK "), timeout);
        socks.push(SockLine::parse(&line).unwrap_or_else(|| panic!("bad SOCK line from client: {line:?}")));
    }
    socks
}

/// Starts `tcp-fixture client ARGS...` and waits until it has opened its
/// connections (`DONE`), returning the child and its `SOCK` lines. The
/// number of sockets is taken from `--count` (default 1).
pub fn spawn_client(args: &[&str]) -> (Child, Vec<SockLine>) {
    let count = args
        .iter()
        .position(|a| *a == "--count")
        .map(|i| {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .expect("--count needs a number")
        })
        .unwrap_or(1);
    let mut child = start_client(args);
    let socks = wait_client_done(&mut child, count);
    (child, socks)
}

// ---------------------------------------------------------------------------
// Tracer
// ---------------------------------------------------------------------------

/// A running `tracer live --json ...`.
pub struct Tracer {
    child: Child,
}

/// Spawns `tracer live --json ARGS...` with stdout and stderr piped.
pub fn run_tracer(args: &[&str]) -> Tracer {
    let mut cmd = Command::new(tracer_bin());
    cmd.arg("live").arg("--json").args(args);
    Tracer {
        child: Child::spawn(&format!("tracer live --json {}", args.join(" ")), cmd),
    }
}

fn parse_json_line(line: &str) -> Option<Value> {
    serde_json::from_str::<Value>(line).ok().filter(Value::is_object)
}

fn is_type(v: &Value, ty: &str) -> bool {
    v.get("type").and_then(Value::as_str) == Some(ty)
}

impl Tracer {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits for the `{"type":"start",...}` line and returns it.
    pub fn wait_started(&mut self, timeout: Duration) -> Value {
        self.wait_json("start", timeout)
    }

    /// Waits for the next JSON line of type `ty` and returns it.
    pub fn wait_json(&mut self, ty: &str, timeout: Duration) -> Value {
        let line = self
            .child
            .wait_line(|l| parse_json_line(l).is_some_and(|v| is_type(&v, ty)), timeout);
        parse_json_line(&line).expect("matched above")
    }

    /// Is the tracer still running?
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Waits for the tracer to exit on its own (it must have been given
    /// `--duration` or `--pid`), then parses every stdout line as JSON.
    /// Panics (with stdout and stderr) on timeout or on a non-JSON line.
    pub fn finish(mut self, timeout: Duration) -> TracerOutput {
        let Some(status) = self.child.wait_finished(timeout) else {
            let desc = self.child.describe();
            self.child.kill();
            panic!("tracer did not exit within {timeout:?}\n{desc}");
        };
        let stderr = self.child.stderr_text();
        let mut objects = Vec::with_capacity(self.child.seen.len());
        for line in self.child.seen.clone() {
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if v.is_object() && v.get("type").is_some_and(Value::is_string) => objects.push(v),
                _ => panic!(
                    "tracer printed a stdout line that is not a JSON object with a \"type\": \
                     {line:?}\n{}",
                    self.child.describe()
                ),
            }
        }
        TracerOutput {
            objects,
            status,
            stderr,
        }
    }
}

/// Everything a finished tracer printed.
#[derive(Debug)]
pub struct TracerOutput {
    pub objects: Vec<Value>,
    pub status: ExitStatus,
    pub stderr: String,
}

impl TracerOutput {
    /// All objects of the given `type`, in output order.
    pub fn of_type(&self, ty: &str) -> Vec<&Value> {
        self.objects.iter().filter(|v| is_type(v, ty)).collect()
    }

    /// Compact dump of the whole output, for assertion messages.
    pub fn dump(&self) -> String {
        let mut out = format!("tracer exit status: {}\n--- stdout:\n", self.status);
        for o in &self.objects {
            let _ = writeln!(out, "  {o}");
        }
        let _ = write!(out, "--- stderr:\n{}", self.stderr);
        out
    }

    /// Asserts that the tracer exited with status 0.
    pub fn assert_success(&self) {
        assert!(self.status.success(), "tracer failed\n{}", self.dump());
    }

    /// The one `start` object.
    pub fn start(&self) -> &Value {
        let starts = self.of_type("start");
        assert_eq!(starts.len(), 1, "expected exactly one start object\n{}", self.dump());
        starts[0]
    }

    /// The one `summary` object.
    pub fn summary(&self) -> &Value {
        let sums = self.of_type("summary");
        assert_eq!(sums.len(), 1, "expected exactly one summary object\n{}", self.dump());
        sums[0]
    }

    /// `summary["leaks"]`.
    pub fn leaks(&self) -> &[Value] {
        self.summary()
            .get("leaks")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("summary has no \"leaks\" array\n{}", self.dump()))
    }

    /// `summary["leaks"]`, each checked against the contract and parsed.
    pub fn summary_leaks(&self) -> Vec<Leak> {
        self.leaks().iter().map(Leak::from_json).collect()
    }

    /// All `leak` (or other leak-shaped, e.g. `late_close`) events.
    pub fn leak_events(&self, ty: &str) -> Vec<Leak> {
        self.of_type(ty).into_iter().map(Leak::from_json).collect()
    }
}

/// A leak object (summary entry, `leak` or `late_close` event), with every
/// field of the contract checked for presence and type.
#[derive(Clone, Debug)]
pub struct Leak {
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    /// Normalised with [`normalize_addr`] (the raw value is in `json`).
    pub local: String,
    pub remote: String,
    pub cookie: u64,
    pub close_wait_ms: u64,
    pub close_wait_estimated: bool,
    pub fd: Option<i32>,
    /// Only on `late_close` events.
    pub closed_after_ms: Option<u64>,
    pub json: Value,
}

impl Leak {
    pub fn from_json(v: &Value) -> Leak {
        let field = |name: &str| {
            v.get(name)
                .unwrap_or_else(|| panic!("leak object has no {name:?}: {v}"))
        };
        let uint = |name: &str| {
            field(name)
                .as_u64()
                .unwrap_or_else(|| panic!("leak {name:?} is not an unsigned integer: {v}"))
        };
        let string = |name: &str| {
            field(name)
                .as_str()
                .unwrap_or_else(|| panic!("leak {name:?} is not a string: {v}"))
                .to_string()
        };
        let fd = match field("fd") {
            Value::Null => None,
            f => Some(
                f.as_u64()
                    .and_then(|n| i32::try_from(n).ok())
                    .unwrap_or_else(|| panic!("leak \"fd\" is neither null nor an fd: {v}")),
            ),
        };
        Leak {
            pid: u32::try_from(uint("pid")).unwrap_or_else(|_| panic!("leak pid too big: {v}")),
            comm: string("comm"),
            cmdline: string("cmdline"),
            local: normalize_addr(&string("local")),
            remote: normalize_addr(&string("remote")),
            cookie: uint("cookie"),
            close_wait_ms: uint("close_wait_ms"),
            close_wait_estimated: field("close_wait_estimated")
                .as_bool()
                .unwrap_or_else(|| panic!("leak \"close_wait_estimated\" is not a bool: {v}")),
            fd,
            closed_after_ms: v.get("closed_after_ms").and_then(Value::as_u64),
            json: v.clone(),
        }
    }

    /// The raw (un-normalised) `local` / `remote` strings.
    pub fn raw_local(&self) -> &str {
        self.json["local"].as_str().unwrap_or_default()
    }

    pub fn raw_remote(&self) -> &str {
        self.json["remote"].as_str().unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------
// ss
// ---------------------------------------------------------------------------

/// Normalises `ADDR:PORT` the way tracer prints it: IPv4 `1.2.3.4:80`, IPv6
/// (including IPv4-mapped) in brackets, RFC 5952 form: `[::1]:80`,
/// `[::ffff:127.0.0.1]:80`. `ss` already prints this form; parsing and
/// re-printing makes both sides canonical. Unparseable input (e.g. `*:*`,
/// scoped `%iface` addresses) is returned unchanged.
pub fn normalize_addr(s: &str) -> String {
    s.parse::<SocketAddr>()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| s.to_string())
}

/// `(comm, pid, fd)` of a process holding a socket, from ss's `users:`.
pub type SsUser = (String, u32, i32);

/// One socket as reported by `ss -tanpeH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SsSocket {
    /// As ss prints it, e.g. `CLOSE-WAIT`. When a single state is selected
    /// ss omits the column and this is the (upper-cased) filter.
    pub state: String,
    pub recv_q: u64,
    pub send_q: u64,
    /// Normalised with [`normalize_addr`].
    pub local: String,
    pub remote: String,
    /// The socket cookie (`sk:<hex>`), the same number as
    /// `bpf_get_socket_cookie()`.
    pub cookie: u64,
    pub inode: Option<u64>,
    /// `(comm, pid, fd)` of every process holding the socket; empty when
    /// nobody holds it (e.g. still in an accept queue).
    pub users: Vec<SsUser>,
    /// The line as printed by ss.
    pub line: String,
}

impl SsSocket {
    pub fn has_pid(&self, pid: u32) -> bool {
        self.users.iter().any(|(_, p, _)| *p == pid)
    }

    /// The fd under which `pid` holds this socket.
    pub fn fd_of(&self, pid: u32) -> Option<i32> {
        self.users.iter().find(|(_, p, _)| *p == pid).map(|(_, _, fd)| *fd)
    }
}

/// Parses `users:(("comm",pid=1,fd=3),("x",pid=2,fd=4))`, starting right
/// after `users:(`. Returns the entries and the rest of the input after the
/// closing `)`. Command names may contain spaces, commas or parentheses, so
/// the name is delimited by `",pid=`.
fn parse_users(mut s: &str) -> Result<(Vec<SsUser>, &str), String> {
    let mut users = Vec::new();
    loop {
        s = s.trim_start_matches(',');
        if let Some(rest) = s.strip_prefix(')') {
            return Ok((users, rest));
        }
        let body = s
            .strip_prefix("(\"")
            .ok_or_else(|| format!("expected (\" in users at {s:?}"))?;
        let name_end = body
            .find("\",pid=")
            .ok_or_else(|| format!("no \",pid= in users at {s:?}"))?;
        let comm = body[..name_end].to_string();
        let rest = &body[name_end + "\",pid=".len()..];
        let close = rest
            .find(')')
            .ok_or_else(|| format!("unterminated users entry at {s:?}"))?;
        let mut pid = None;
        let mut fd = None;
        for kv in rest[..close].split(',').enumerate() {
            match kv {
                (0, v) => pid = v.parse::<u32>().ok(),
                (_, v) => {
                    if let Some(f) = v.strip_prefix("fd=") {
                        fd = f.parse::<i32>().ok();
                    }
                }
            }
        }
        let pid = pid.ok_or_else(|| format!("bad pid in users at {s:?}"))?;
        let fd = fd.ok_or_else(|| format!("bad fd in users at {s:?}"))?;
        users.push((comm, pid, fd));
        s = &rest[close + 1..];
    }
}

/// Parses one line of `ss -tanpeH [state X]` output. `default_state` is
/// used when ss left the state column out (single-state filter).
pub fn parse_ss_line(line: &str, default_state: &str) -> Result<SsSocket, String> {
    let err = |what: &str| format!("{what} in ss line {line:?}");
    let mut rest = line.trim();
    let next_token = |rest: &mut &str| -> Option<String> {
        let t = rest.trim_start();
        if t.is_empty() {
            return None;
        }
        let end = t.find(char::is_whitespace).unwrap_or(t.len());
        let tok = t[..end].to_string();
        *rest = &t[end..];
        Some(tok)
    };
    let first = next_token(&mut rest).ok_or_else(|| err("empty line"))?;
    let (state, recv_q) = match first.parse::<u64>() {
        Ok(n) => (default_state.to_uppercase(), n),
        Err(_) => {
            let q = next_token(&mut rest).ok_or_else(|| err("no Recv-Q"))?;
            (first, q.parse().map_err(|_| err("bad Recv-Q"))?)
        }
    };
    let send_q = next_token(&mut rest)
        .ok_or_else(|| err("no Send-Q"))?
        .parse()
        .map_err(|_| err("bad Send-Q"))?;
    let local = normalize_addr(&next_token(&mut rest).ok_or_else(|| err("no local address"))?);
    let remote = normalize_addr(&next_token(&mut rest).ok_or_else(|| err("no peer address"))?);

    let mut users = Vec::new();
    let mut cookie = None;
    let mut inode = None;
    let mut rest = rest.trim_start();
    while !rest.is_empty() {
        if let Some(u) = rest.strip_prefix("users:(") {
            let (parsed, after) = parse_users(u).map_err(|e| err(&e))?;
            users = parsed;
            rest = after.trim_start();
            continue;
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let tok = &rest[..end];
        if let Some(hex) = tok.strip_prefix("sk:") {
            cookie = Some(u64::from_str_radix(hex, 16).map_err(|_| err("bad sk: cookie"))?);
        } else if let Some(ino) = tok.strip_prefix("ino:") {
            inode = Some(ino.parse().map_err(|_| err("bad ino:"))?);
        }
        rest = rest[end..].trim_start();
    }
    Ok(SsSocket {
        state,
        recv_q,
        send_q,
        local,
        remote,
        cookie: cookie.ok_or_else(|| err("no sk: cookie (ss needs -e)"))?,
        inode,
        users,
        line: line.to_string(),
    })
}

/// Parses the whole output of `ss -tanpeH state <state>`.
pub fn parse_ss_output(text: &str, default_state: &str) -> Result<Vec<SsSocket>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_ss_line(l, default_state))
        .collect()
}

/// Runs `ss -tanpeH state <state_filter>` (e.g. `"close-wait"`) and parses
/// every line. Panics if ss fails or prints something unparseable.
pub fn ss_sockets(state_filter: &str) -> Vec<SsSocket> {
    let out = Command::new("ss")
        .args(["-tanpeH", "state", state_filter])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running ss (iproute2) failed: {e}"));
    assert!(
        out.status.success(),
        "ss -tanpeH state {state_filter} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_ss_output(&String::from_utf8_lossy(&out.stdout), state_filter).unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `ss_sockets(state)` until `pred` holds, returning that snapshot.
/// Panics with the last snapshot on timeout.
pub fn wait_for_ss(
    state: &str,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&[SsSocket]) -> bool,
) -> Vec<SsSocket> {
    let deadline = Instant::now() + timeout;
    loop {
        let snap = ss_sockets(state);
        if pred(&snap) {
            return snap;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for ss to show {what}; last `ss state {state}`:\n{}",
                format_ss(&snap)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// ss lines, one per row, for assertion messages.
pub fn format_ss(sockets: &[SsSocket]) -> String {
    let mut out = String::new();
    for s in sockets {
        let _ = writeln!(out, "  {}", s.line);
    }
    out
}

/// Polls `ss` in the background while the tracer runs and remembers every
/// socket ever seen in the state, by cookie. Used for host-wide checks,
/// where sockets of other processes (or other tests) may be closed at any
/// moment: a reported leak that the kernel never showed in CLOSE_WAIT is a
/// false leak.
pub struct SsMonitor {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<BTreeMap<u64, SsSocket>>>,
}

impl SsMonitor {
    pub fn start(state: &str) -> SsMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let state = state.to_string();
        let handle = std::thread::spawn(move || {
            let mut seen = BTreeMap::new();
            loop {
                let last = flag.load(Ordering::SeqCst);
                for s in ss_sockets(&state) {
                    seen.entry(s.cookie).or_insert(s);
                }
                if last {
                    return seen;
                }
                std::thread::sleep(Duration::from_millis(150));
            }
        });
        SsMonitor {
            stop,
            handle: Some(handle),
        }
    }

    /// Takes one last snapshot and returns every socket seen, by cookie.
    pub fn stop(mut self) -> BTreeMap<u64, SsSocket> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("stopped once")
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for SsMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------

/// Asserts that `reported` and `truth` hold the same cookies (as sets), and
/// that `reported` has no duplicates. On failure shows what is missing
/// (in truth, not reported) and what is extra (reported, not in truth).
pub fn assert_same_cookies(reported: &[u64], truth: &[u64], context: &str) {
    let rep: BTreeSet<u64> = reported.iter().copied().collect();
    let tru: BTreeSet<u64> = truth.iter().copied().collect();
    let mut dups: Vec<u64> = reported.to_vec();
    dups.sort_unstable();
    let dups: BTreeSet<u64> = dups.windows(2).filter(|w| w[0] == w[1]).map(|w| w[0]).collect();
    let missing: Vec<u64> = tru.difference(&rep).copied().collect();
    let extra: Vec<u64> = rep.difference(&tru).copied().collect();
    if missing.is_empty() && extra.is_empty() && dups.is_empty() {
        return;
    }
    panic!(
        "cookie sets differ ({} reported, {} in ground truth)\n  \
         missing (kernel has them, not reported): {missing:?}\n  \
         extra (reported, kernel does not have them): {extra:?}\n  \
         reported more than once: {dups:?}\n{context}",
        rep.len(),
        tru.len()
    );
}

// ---------------------------------------------------------------------------
// Unit tests (no root needed)
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from `ss -tanpeH state close-wait` (iproute2 6.1, Linux 6.18):
    // fixture clients leaking over IPv4, IPv6 and IPv4-mapped IPv6, and a
    // fixture server holding accepted sockets.
    const CLOSE_WAIT: &str = "\
0      0               127.0.0.1:58074          127.0.0.1:36555 users:((\"tcp-fixture\",pid=8300,fd=3)) ino:15205 sk:1 cgroup:/ -->
0      0               127.0.0.1:58100          127.0.0.1:36555 users:((\"tcp-fixture\",pid=8300,fd=4)) ino:15206 sk:2 cgroup:/ -->
1      0      [::ffff:127.0.0.1]:37482 [::ffff:127.0.0.1]:42843 users:((\"tcp-fixture\",pid=8312,fd=3)) ino:15214 sk:4 cgroup:/ -->
1      0                   [::1]:49470              [::1]:42843 users:((\"tcp-fixture\",pid=8310,fd=3)) ino:15210 sk:6 cgroup:/ -->
1      0      [::ffff:127.0.0.1]:33773 [::ffff:127.0.0.1]:54768 users:((\"tcp-fixture\",pid=8313,fd=4)) ino:16254 sk:7 cgroup:/ -->
";

    #[test]
    fn parses_captured_close_wait_lines() {
        let socks = parse_ss_output(CLOSE_WAIT, "close-wait").unwrap();
        assert_eq!(socks.len(), 5);

        let s = &socks[0];
        assert_eq!(s.state, "CLOSE-WAIT");
        assert_eq!((s.recv_q, s.send_q), (0, 0));
        assert_eq!(s.local, "127.0.0.1:58074");
        assert_eq!(s.remote, "127.0.0.1:36555");
        assert_eq!(s.cookie, 1);
        assert_eq!(s.inode, Some(15205));
        assert_eq!(s.users, vec![("tcp-fixture".to_string(), 8300, 3)]);
        assert_eq!(s.fd_of(8300), Some(3));
        assert!(!s.has_pid(1));

        let m = &socks[2];
        assert_eq!(m.recv_q, 1);
        assert_eq!(m.local, "[::ffff:127.0.0.1]:37482");
        assert_eq!(m.remote, "[::ffff:127.0.0.1]:42843");
        assert_eq!(m.cookie, 4);

        let v6 = &socks[3];
        assert_eq!(v6.local, "[::1]:49470");
        assert_eq!(v6.remote, "[::1]:42843");
        assert_eq!(v6.cookie, 6);
        assert_eq!(v6.users, vec![("tcp-fixture".to_string(), 8310, 3)]);
    }

    #[test]
    fn parses_state_column_and_timers() {
        // `ss -tanpeH` without a single-state filter keeps the State column.
        let line = "FIN-WAIT-2 0      0               127.0.0.1:36555          127.0.0.1:58108 timer:(timewait,57sec,0) ino:0 sk:1003                                       ";
        let s = parse_ss_line(line, "all").unwrap();
        assert_eq!(s.state, "FIN-WAIT-2");
        assert_eq!(s.local, "127.0.0.1:36555");
        assert_eq!(s.remote, "127.0.0.1:58108");
        assert_eq!(s.cookie, 0x1003);
        assert_eq!(s.inode, Some(0));
        assert!(s.users.is_empty());

        let line = "CLOSE-WAIT 1      0      [::ffff:127.0.0.1]:33773 [::ffff:127.0.0.1]:54776 users:((\"tcp-fixture\",pid=8313,fd=5)) ino:15217 sk:5 cgroup:/ -->            ";
        let s = parse_ss_line(line, "all").unwrap();
        assert_eq!(s.state, "CLOSE-WAIT");
        assert_eq!(s.recv_q, 1);
        assert_eq!(s.users, vec![("tcp-fixture".to_string(), 8313, 5)]);
    }

    #[test]
    fn parses_unowned_socket_and_big_cookie() {
        // A socket nobody holds (accept queue) has no users:; a non-root
        // owner adds uid:; cookies are 64-bit hex.
        let line =
            "1      0      10.0.0.1:8080   10.0.0.2:41000 uid:1000 ino:0 sk:ffff8f2a4c3b9d80 cgroup:/system.slice -->";
        let s = parse_ss_line(line, "close-wait").unwrap();
        assert!(s.users.is_empty());
        assert_eq!(s.cookie, 0xffff8f2a4c3b9d80);
        assert_eq!(s.local, "10.0.0.1:8080");
    }

    #[test]
    fn parses_multiple_users_and_odd_comm() {
        // A socket shared after fork, with a comm holding spaces, commas and
        // parentheses.
        let line = "0 0 127.0.0.1:1 127.0.0.1:2 users:((\"a b,(c)\",pid=10,fd=7),(\"tcp-fixture\",pid=11,fd=3)) ino:9 sk:2a <->";
        let s = parse_ss_line(line, "close-wait").unwrap();
        assert_eq!(
            s.users,
            vec![("a b,(c)".to_string(), 10, 7), ("tcp-fixture".to_string(), 11, 3)]
        );
        assert_eq!(s.cookie, 42);
        assert_eq!(s.fd_of(11), Some(3));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_ss_line("", "close-wait").is_err());
        assert!(parse_ss_line("State Recv-Q Send-Q", "close-wait").is_err());
        // No -e: no cookie.
        assert!(parse_ss_line("0 0 127.0.0.1:1 127.0.0.1:2", "close-wait").is_err());
        assert!(parse_ss_line(
            "0 0 127.0.0.1:1 127.0.0.1:2 users:((\"x\",pid=zz,fd=3)) sk:1",
            "close-wait"
        )
        .is_err());
    }

    #[test]
    fn normalizes_addresses_like_tracer() {
        assert_eq!(normalize_addr("127.0.0.1:80"), "127.0.0.1:80");
        assert_eq!(normalize_addr("[::1]:80"), "[::1]:80");
        assert_eq!(normalize_addr("[0:0:0:0:0:0:0:1]:80"), "[::1]:80");
        assert_eq!(normalize_addr("[::ffff:127.0.0.1]:80"), "[::ffff:127.0.0.1]:80");
        assert_eq!(normalize_addr("[::ffff:7f00:1]:80"), "[::ffff:127.0.0.1]:80");
        assert_eq!(normalize_addr("*:*"), "*:*");
    }

    #[test]
    fn sock_lines() {
        assert_eq!(
            SockLine::parse("SOCK [::ffff:127.0.0.1]:37482 [::ffff:127.0.0.1]:42843 3"),
            Some(SockLine {
                local: "[::ffff:127.0.0.1]:37482".into(),
                remote: "[::ffff:127.0.0.1]:42843".into(),
                fd: 3
            })
        );
        assert_eq!(SockLine::parse("DONE 12"), None);
        assert_eq!(SockLine::parse("SOCK a b"), None);
    }

    #[test]
    fn cookie_sets() {
        assert_same_cookies(&[3, 1, 2], &[1, 2, 3], "");
        let r = std::panic::catch_unwind(|| assert_same_cookies(&[1, 2, 9], &[1, 2, 3], "ctx"));
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("missing (kernel has them, not reported): [3]"), "{msg}");
        assert!(
            msg.contains("extra (reported, kernel does not have them): [9]"),
            "{msg}"
        );
        assert!(std::panic::catch_unwind(|| assert_same_cookies(&[1, 1], &[1], "")).is_err());
    }

    #[test]
    fn live_ss_parses() {
        // Whatever is on this machine must parse (ss is a hard dependency).
        if Command::new("ss").arg("-V").output().is_err() {
            eprintln!("skipping: ss not installed");
            return;
        }
        for state in ["close-wait", "established", "listening"] {
            let _ = ss_sockets(state);
        }
    }
}
