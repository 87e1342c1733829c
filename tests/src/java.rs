//! The JVM fixture (`tests/java/`) and the real-JVM runs of
//! tests/tests/java.rs.
//!
//! * [`require_jdk`]: `java` and `javac` (17 or newer), or skip (locally) /
//!   fail (CI).
//! * [`classes`]: the fixture compiled with `javac -g`, once per test
//!   process, into a temporary directory removed at exit.
//! * [`marked_line`]: the source line of a `// MARKER` comment in
//!   `MetaClient.java` (line numbers are never hard-coded).
//! * [`start_server`] / [`start_client`]: `MetaServer` (HTTP 404 with a
//!   26-byte body, then close) and `MetaClient` (leaks every error
//!   connection), each a separate JVM, killed when dropped.
//! * [`trace_live`]: `tracer live --json --pid <client>` around the client;
//!   [`record_and_report`]: `tracer record` around it, then `tracer report
//!   --json` once the JVM is gone. Both return a [`JavaRun`]: the tracer's
//!   output and `ss`'s view of the client's CLOSE_WAIT sockets.
//! * [`JFrame`]: a frame of `open_stack` with the Java fields (`kind`,
//!   `reason`), and [`format_frames`] for failure messages.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::child::Child;
use crate::recording::{run_tracer_cmd, start_recorder, RecordOutput, TempFile};
use crate::ss::{format_ss, ss_sockets, wait_for_ss, SsSocket};
use crate::tracer::{run_tracer, TracerOutput};

pub use crate::java_frames::{describe_leak, format_frames, open_stack, split_java_symbol, JFrame, JAVA_KINDS};

/// The oldest JDK the fixture and the tracer's JVM support are tested with.
pub const MIN_JDK: u32 = 17;
/// `--leak-after` of every traced run.
pub const LEAK_AFTER: &str = "1s";
/// The server's 404 body (MetaServer.BODY).
pub const BODY_BYTES: u64 = 26;

/// Start-up of a JVM to its first line. `-Xcomp` compiles every method
/// before its first run: measured ~8 s to `READY` on an idle 2-core VM, so
/// this leaves room for a loaded one.
const JVM_START_TIMEOUT: Duration = Duration::from_secs(180);
/// From `go` to `done`: with `-Xcomp` the first request compiles the whole
/// HTTP stack (measured ~6 s idle).
const REQUESTS_TIMEOUT: Duration = Duration::from_secs(180);
/// Loading and attaching the eBPF programs.
const TRACER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// For ss to show the client's sockets in CLOSE_WAIT after `done` (the
/// server sends its FIN ~100 ms after the headers).
const CLOSE_WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Once ss shows every socket in CLOSE_WAIT: `--leak-after`, the tracer's
/// tick, and the evidence gathered a moment after a leak is found.
const LEAK_MARGIN: Duration = Duration::from_secs(5);
/// For a tracer (or recorder) to print its summary and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// For a JVM to exit after SIGTERM before it is SIGKILLed.
const JVM_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// `tracer report`.
const REPORT_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// The JDK
// ---------------------------------------------------------------------------

/// The `java` and `javac` the tests run.
#[derive(Clone, Debug)]
pub struct Jdk {
    pub java: PathBuf,
    pub javac: PathBuf,
    /// What `javac -version` printed, e.g. `javac 17.0.15`.
    pub version: String,
}

/// The JDK, or why not. Returns `Some` when `java` and `javac` (17 or
/// newer) are found. Otherwise panics when the `CI` environment variable is
/// set (in CI these tests must fail, never skip), or prints a skip notice
/// and returns `None` so the test can return early.
pub fn require_jdk() -> Option<&'static Jdk> {
    static JDK: OnceLock<Result<Jdk, String>> = OnceLock::new();
    let why = match JDK.get_or_init(find_jdk) {
        Ok(jdk) => return Some(jdk),
        Err(why) => why,
    };
    let test = crate::privileges::current_test_name();
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!(
            "{test} needs a JDK ({MIN_JDK}+): {why}; CI is set: refusing to skip. \
             Install it with `cargo xtask setup` (Debian: openjdk-17-jdk-headless)."
        );
    }
    eprintln!("skipping: {test} needs a JDK ({MIN_JDK}+): {why} (`cargo xtask setup` installs it)");
    None
}

/// `name` in `$JAVA_HOME/bin`, else on `PATH`.
fn find_tool(name: &str) -> Option<PathBuf> {
    let java_home = std::env::var_os("JAVA_HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join("bin"));
    let path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    java_home
        .into_iter()
        .chain(path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The major version in `javac -version` output: `javac 17.0.15` -> 17,
/// `javac 1.8.0_392` -> 8, `javac 21` -> 21.
pub fn parse_javac_version(text: &str) -> Option<u32> {
    let version = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("javac "))?
        .split_whitespace()
        .next()?;
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    match parts.next()?.parse().ok()? {
        1 => parts.next()?.parse().ok(),
        major => Some(major),
    }
}

fn find_jdk() -> Result<Jdk, String> {
    let java = find_tool("java").ok_or("`java` not found in $JAVA_HOME/bin or on PATH")?;
    let javac = find_tool("javac").ok_or("`javac` not found in $JAVA_HOME/bin or on PATH")?;
    let out = Command::new(&javac)
        .arg("-version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {} -version: {e}", javac.display()))?;
    // On stdout since JDK 9, on stderr before.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!(
            "{} -version failed ({}): {}",
            javac.display(),
            out.status,
            text.trim()
        ));
    }
    let major = parse_javac_version(&text)
        .ok_or_else(|| format!("cannot read the version in `{} -version`: {text:?}", javac.display()))?;
    if major < MIN_JDK {
        return Err(format!(
            "{} is {}, need {MIN_JDK} or newer",
            javac.display(),
            text.trim()
        ));
    }
    Ok(Jdk {
        java,
        javac,
        version: text.trim().to_string(),
    })
}

// ---------------------------------------------------------------------------
// The fixture's sources and classes
// ---------------------------------------------------------------------------

/// `tests/java/`.
pub fn java_sources_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("java")
}

/// `tests/java/MetaClient.java`.
pub fn client_source() -> PathBuf {
    java_sources_dir().join("MetaClient.java")
}

static CLASSES: OnceLock<Result<PathBuf, String>> = OnceLock::new();

extern "C" fn remove_classes() {
    if let Some(Ok(dir)) = CLASSES.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The fixture compiled with `javac -g` (line numbers and local variables
/// in the class files), once per test process, into a temporary directory
/// that is removed when the process exits. Panics with javac's output if
/// it fails (every caller, not only the first).
pub fn classes(jdk: &Jdk) -> &'static Path {
    let compiled = CLASSES.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tracer-test-java-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        // SAFETY: registers a plain `extern "C" fn` that only reads a
        // static; nothing else is required of atexit's argument.
        unsafe { libc::atexit(remove_classes) };
        let src = java_sources_dir();
        let sources = ["MetaServer.java", "MetaClient.java"].map(|f| src.join(f));
        let t = Instant::now();
        let out = Command::new(&jdk.javac)
            .arg("-g")
            .arg("-d")
            .arg(&dir)
            .args(&sources)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", jdk.javac.display()))?;
        if !out.status.success() {
            return Err(format!(
                "javac -g failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        eprintln!(
            "java fixture: compiled with {} in {:.1}s into {}",
            jdk.version,
            t.elapsed().as_secs_f64(),
            dir.display()
        );
        Ok(dir)
    });
    match compiled {
        Ok(dir) => dir,
        Err(e) => panic!("compiling the Java fixture: {e}"),
    }
}

/// The 1-based line of `MetaClient.java` carrying the comment `// MARKER`
/// (e.g. `CONNECT-LINE`). Panics unless exactly one line does.
pub fn marked_line(marker: &str) -> u64 {
    let path = client_source();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let tag = format!("// {marker}");
    let lines: Vec<u64> = text
        .lines()
        .zip(1..)
        .filter(|(l, _)| l.trim_end().ends_with(&tag))
        .map(|(_, n)| n)
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{} must have exactly one line marked `{tag}`, found {lines:?}",
        path.display()
    );
    lines[0]
}

// ---------------------------------------------------------------------------
// The JVMs
// ---------------------------------------------------------------------------

/// The JVM tests run one at a time: two JVMs (one of them compiling
/// everything with `-Xcomp`) and a tracer per test already fill 2 cores,
/// and a starved tracer would make `--leak-after` timing meaningless.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn sigterm(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with plain values, on a child of ours that has
        // not been reaped (so the pid is still that child).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// Stops a JVM: SIGTERM (so it removes its hsperfdata file), then SIGKILL
/// if it is still running after [`JVM_STOP_TIMEOUT`]. Reaps it.
pub fn stop_jvm(child: &mut Child) {
    if child.is_running() {
        sigterm(child.pid());
        if child.wait_exit(JVM_STOP_TIMEOUT).is_none() {
            eprintln!(
                "{}: still running {JVM_STOP_TIMEOUT:?} after SIGTERM; SIGKILL",
                child.name()
            );
        }
    }
    child.kill();
}

/// A running `MetaServer`.
pub struct JavaServer {
    pub child: Child,
    pub port: u16,
}

impl JavaServer {
    /// `http://127.0.0.1:PORT/...`, what the client asks for.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/latest/meta-data/iam/info", self.port)
    }
}

impl Drop for JavaServer {
    fn drop(&mut self) {
        stop_jvm(&mut self.child);
    }
}

/// Starts `java -cp CLASSES MetaServer` (default flags) and waits for its
/// `PORT <port>` line.
pub fn start_server(jdk: &Jdk) -> JavaServer {
    let mut cmd = Command::new(&jdk.java);
    cmd.arg("-cp").arg(classes(jdk)).arg("MetaServer");
    let mut child = Child::spawn("java MetaServer", cmd);
    let line = child.wait_line(|l| l.starts_with("PORT "), JVM_START_TIMEOUT);
    let port = line["PORT ".len()..]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad PORT line from MetaServer: {line:?}"));
    JavaServer { child, port }
}

/// A running `MetaClient`, held at its stdin line until [`JavaClient::go`].
pub struct JavaClient {
    pub child: Child,
    pub flags: Vec<String>,
    pub count: usize,
    /// From spawn to its `READY` line.
    pub startup: Duration,
}

impl Drop for JavaClient {
    fn drop(&mut self) {
        stop_jvm(&mut self.child);
    }
}

/// Starts `java FLAGS... -cp CLASSES MetaClient URL COUNT` and waits for
/// its `READY <pid>` line (the JVM is up, `main` waits on stdin). The
/// printed pid must be the spawned process's (the launcher did not re-exec
/// itself): that is the pid the tracer is given.
pub fn start_client(jdk: &Jdk, flags: &[&str], url: &str, count: usize) -> JavaClient {
    let mut cmd = Command::new(&jdk.java);
    cmd.args(flags)
        .arg("-cp")
        .arg(classes(jdk))
        .arg("MetaClient")
        .arg(url)
        .arg(count.to_string());
    let t = Instant::now();
    let mut child = Child::spawn(&format!("java {} MetaClient", flags.join(" ")), cmd);
    let line = child.wait_line(|l| l.starts_with("READY "), JVM_START_TIMEOUT);
    let startup = t.elapsed();
    let pid: u32 = line["READY ".len()..]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad READY line from MetaClient: {line:?}"));
    assert_eq!(pid, child.pid(), "MetaClient's own pid is not the spawned process's");
    JavaClient {
        child,
        flags: flags.iter().map(|s| s.to_string()).collect(),
        count,
        startup,
    }
}

impl JavaClient {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Lets the client make its requests and waits for its `done` line;
    /// checks that every request got a 404. Returns how long that took.
    pub fn go(&mut self) -> Duration {
        let t = Instant::now();
        self.child.send_line("go");
        self.child.wait_line(|l| l == "done", REQUESTS_TIMEOUT);
        let took = t.elapsed();
        let statuses: Vec<&String> = self
            .child
            .lines_seen()
            .iter()
            .filter(|l| l.starts_with("STATUS "))
            .collect();
        assert!(
            statuses.len() == self.count && statuses.iter().all(|l| *l == "STATUS 404"),
            "MetaClient should have got {} times 404\n{}",
            self.count,
            self.child.describe()
        );
        took
    }
}

/// ss's CLOSE_WAIT sockets held by `pid`.
pub fn close_wait_of(pid: u32) -> Vec<SsSocket> {
    ss_sockets("close-wait")
        .into_iter()
        .filter(|s| s.has_pid(pid))
        .collect()
}

/// Waits until ss shows `count` sockets of `pid` in CLOSE_WAIT.
fn wait_close_wait(pid: u32, count: usize) {
    wait_for_ss(
        "close-wait",
        CLOSE_WAIT_TIMEOUT,
        &format!("{count} sockets of the Java client (pid {pid}) in CLOSE_WAIT"),
        |snap| snap.iter().filter(|s| s.has_pid(pid)).count() == count,
    );
}

// ---------------------------------------------------------------------------
// Traced runs
// ---------------------------------------------------------------------------

/// How long the parts of a run took (printed, never asserted).
#[derive(Clone, Debug, Default)]
pub struct Timings {
    /// Client JVM spawn to `READY`.
    pub jvm_start: Duration,
    /// `go` to `done`: the requests (with `-Xcomp`, compiling the HTTP
    /// stack on the way).
    pub requests: Duration,
    /// The whole run, from compiling to the tracer's output.
    pub total: Duration,
}

/// A traced run of the client: the tracer's output and the kernel's view.
pub struct JavaRun {
    pub flags: Vec<String>,
    pub count: usize,
    pub client_pid: u32,
    /// `tracer live --json` output, or `tracer report --json` output.
    pub out: TracerOutput,
    /// ss's CLOSE_WAIT sockets of the client, when the tracer stopped (the
    /// JVM still running).
    pub truth: Vec<SsSocket>,
    /// What `tracer record` printed (record runs only).
    pub record: Option<RecordOutput>,
    /// `tracer export FILE --format folded` of the recording, after the
    /// JVM is gone (record runs only).
    pub folded: Option<String>,
    pub timings: Timings,
}

impl JavaRun {
    /// Everything about the run, for failure messages: flags, timings, the
    /// tracer's output, the recorder's, and ss.
    pub fn context(&self) -> String {
        let mut out = format!(
            "=== java {} MetaClient (pid {}), {} requests; JVM start {:.1}s, requests {:.1}s, run {:.1}s\n",
            self.flags.join(" "),
            self.client_pid,
            self.count,
            self.timings.jvm_start.as_secs_f64(),
            self.timings.requests.as_secs_f64(),
            self.timings.total.as_secs_f64(),
        );
        let _ = writeln!(out, "=== tracer:\n{}", self.out.dump());
        if let Some(rec) = &self.record {
            let _ = writeln!(out, "=== recorder:\n{}", rec.dump());
        }
        let _ = write!(
            out,
            "=== ss -tanpeH state close-wait, the client's (when the tracer stopped):\n{}",
            format_ss(&self.truth)
        );
        out
    }

    fn print_timings(&self, what: &str) {
        eprintln!(
            "java {what} [{}]: JVM start {:.1}s, requests {:.1}s, whole run {:.1}s",
            self.flags.join(" "),
            self.timings.jvm_start.as_secs_f64(),
            self.timings.requests.as_secs_f64(),
            self.timings.total.as_secs_f64()
        );
    }
}

/// Runs the client (JVM `flags`, `count` requests) under `tracer live
/// --json --pid <client> --leak-after 1s`: the tracer attaches while the
/// client waits on stdin, the client leaks `count` connections, ss shows
/// them in CLOSE_WAIT, the tracer has [`LEAK_MARGIN`] to report them, then
/// it is stopped with SIGTERM (it prints its summary) and ss is sampled
/// while the JVM still holds the sockets. Both JVMs are stopped before
/// returning.
pub fn trace_live(jdk: &Jdk, flags: &[&str], count: usize) -> JavaRun {
    let t = Instant::now();
    classes(jdk);
    let server = start_server(jdk);
    let mut client = start_client(jdk, flags, &server.url(), count);
    let pid = client.pid();
    let pid_arg = pid.to_string();
    let mut tracer = run_tracer(&["--pid", &pid_arg, "--leak-after", LEAK_AFTER]);
    tracer.wait_started(TRACER_START_TIMEOUT);
    let requests = client.go();
    wait_close_wait(pid, count);
    std::thread::sleep(LEAK_MARGIN);
    assert!(
        tracer.is_running(),
        "the tracer stopped by itself\n{}",
        tracer.child().describe()
    );
    sigterm(tracer.pid());
    let out = tracer.finish(STOP_TIMEOUT);
    let truth = close_wait_of(pid);
    let (flags, jvm_start) = (client.flags.clone(), client.startup);
    drop(client);
    drop(server);
    let run = JavaRun {
        flags,
        count,
        client_pid: pid,
        out,
        truth,
        record: None,
        folded: None,
        timings: Timings {
            jvm_start,
            requests,
            total: t.elapsed(),
        },
    };
    run.print_timings("live");
    run
}

/// Like [`trace_live`], but under `tracer record -o FILE --pid <client>
/// --leak-after 1s`, stopped with SIGTERM; then the JVM is stopped, and
/// once its pid is gone `tracer report FILE --json` runs: [`JavaRun::out`]
/// is the report's output, [`JavaRun::record`] the recorder's.
pub fn record_and_report(jdk: &Jdk, flags: &[&str], count: usize) -> JavaRun {
    let t = Instant::now();
    classes(jdk);
    let file = TempFile::new("java.trc");
    let server = start_server(jdk);
    let mut client = start_client(jdk, flags, &server.url(), count);
    let pid = client.pid();
    let pid_arg = pid.to_string();
    let mut recorder = start_recorder(file.arg(), &["--pid", &pid_arg, "--leak-after", LEAK_AFTER]);
    recorder.wait_recording(TRACER_START_TIMEOUT);
    let requests = client.go();
    wait_close_wait(pid, count);
    std::thread::sleep(LEAK_MARGIN);
    assert!(
        recorder.child().is_running(),
        "the recorder stopped by itself\n{}",
        recorder.child().describe()
    );
    sigterm(recorder.pid());
    let rec = recorder.finish(STOP_TIMEOUT);
    assert!(rec.status.success(), "tracer record failed\n{}", rec.dump());
    let truth = close_wait_of(pid);
    let (flags, jvm_start) = (client.flags.clone(), client.startup);
    // The JVM (its code cache, its /proc entries) is gone before the
    // report: the names it shows come from the recording.
    drop(client);
    drop(server);
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let deadline = Instant::now() + JVM_STOP_TIMEOUT;
    while proc_dir.exists() {
        assert!(
            Instant::now() < deadline,
            "{} still exists after the JVM was reaped",
            proc_dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ran = run_tracer_cmd(&["report", file.arg(), "--json"], REPORT_TIMEOUT);
    ran.assert_no_crash();
    ran.assert_success();
    let folded = run_tracer_cmd(&["export", file.arg(), "--format", "folded"], REPORT_TIMEOUT);
    folded.assert_no_crash();
    folded.assert_success();
    let run = JavaRun {
        flags,
        count,
        client_pid: pid,
        out: ran.output(),
        truth,
        record: Some(rec),
        folded: Some(folded.stdout_text()),
        timings: Timings {
            jvm_start,
            requests,
            total: t.elapsed(),
        },
    };
    run.print_timings("record + report");
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn javac_versions() {
        assert_eq!(parse_javac_version("javac 17.0.15\n"), Some(17));
        assert_eq!(parse_javac_version("javac 21\n"), Some(21));
        assert_eq!(parse_javac_version("javac 1.8.0_392\n"), Some(8));
        assert_eq!(
            parse_javac_version("Picked up JAVA_TOOL_OPTIONS: -Xmx1g\njavac 11.0.2\n"),
            Some(11)
        );
        assert_eq!(parse_javac_version("javac: not found"), None);
    }

    #[test]
    fn the_connect_line_is_marked_once() {
        let line = marked_line("CONNECT-LINE");
        let text = std::fs::read_to_string(client_source()).unwrap();
        let src = text.lines().nth(usize::try_from(line).unwrap() - 1).unwrap();
        assert!(src.contains("getResponseCode()"), "line {line}: {src:?}");
    }
}
