//! Child processes for the runner: spawned so they die with it, their
//! output read by threads ("taps"), stopped with a signal and reaped with
//! `wait4` (for their resource usage), and sampled from /proc.

use std::collections::VecDeque;
use std::ffi::c_int;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Lines of a stream's non-event output kept for error messages.
const TAIL: usize = 30;

/// Where a child's stdout goes.
pub enum Out {
    Null,
    File(std::fs::File),
    /// Read by a tap; lines starting with the prefix are counted as events
    /// and otherwise ignored (they may come by the million).
    Tap(Option<&'static [u8]>),
}

/// How the child is told to go away if the runner dies.
#[derive(Clone, Copy)]
pub enum OnParentDeath {
    Kill,
    Terminate,
}

pub struct Proc {
    pub name: String,
    child: Child,
    pub pid: i32,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<Tap>,
    pub stderr: Tap,
    reaped: bool,
}

/// How a child ended.
pub struct Exit {
    /// Raw wait status.
    pub status: c_int,
    pub rusage: libc::rusage,
}

impl Exit {
    pub fn success(&self) -> bool {
        libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == 0
    }

    pub fn describe(&self) -> String {
        if libc::WIFEXITED(self.status) {
            format!("exit code {}", libc::WEXITSTATUS(self.status))
        } else if libc::WIFSIGNALED(self.status) {
            format!("signal {}", libc::WTERMSIG(self.status))
        } else {
            format!("wait status {:#x}", self.status)
        }
    }

    /// CPU time, user plus system, of the child itself (not its children).
    pub fn cpu_seconds(&self) -> f64 {
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(self.rusage.ru_utime) + tv(self.rusage.ru_stime)
    }
}

impl Proc {
    /// Starts `cmd` with stdin piped (when `stdin`), stdout as asked and
    /// stderr tapped.
    pub fn spawn(name: &str, mut cmd: Command, stdin: bool, out: Out, death: OnParentDeath) -> Result<Proc> {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stderr(Stdio::piped());
        let prefix = match out {
            Out::Null => {
                cmd.stdout(Stdio::null());
                None
            }
            Out::File(f) => {
                cmd.stdout(f);
                None
            }
            Out::Tap(prefix) => {
                cmd.stdout(Stdio::piped());
                Some(prefix)
            }
        };
        let sig = match death {
            OnParentDeath::Kill => libc::SIGKILL,
            OnParentDeath::Terminate => libc::SIGTERM,
        };
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid) between
        // fork and exec. PR_SET_PDEATHSIG follows the forking thread: every
        // child is spawned from the runner's main thread.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, sig) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(io::Error::other("the runner exited"));
                }
                Ok(())
            });
        }
        let shown = show(&cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {name}: {shown}"))?;
        let stdout = match prefix {
            Some(prefix) => Some(Tap::new(child.stdout.take().expect("piped"), prefix)),
            None => None,
        };
        let stderr = Tap::new(child.stderr.take().expect("piped"), None);
        Ok(Proc {
            name: name.to_owned(),
            pid: child.id() as i32,
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            reaped: false,
        })
    }

    /// Polls `ready` until it says yes; fails if the child exits first or
    /// the time is up. The error carries the end of the child's stderr.
    pub fn wait_until(&mut self, what: &str, timeout: Duration, mut ready: impl FnMut(&Proc) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready(self) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().context("waiting for a child")? {
                self.reaped = true;
                // Let the taps catch up with what it wrote last.
                thread::sleep(Duration::from_millis(50));
                bail!("{} exited ({status}) before {what}{}", self.name, self.stderr_tail());
            }
            if Instant::now() >= deadline {
                bail!("{}: no {what} after {:?}{}", self.name, timeout, self.stderr_tail());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The first stderr line (not yet consumed) starting with `prefix`.
    pub fn stderr_line(&self, prefix: &str) -> Option<String> {
        self.stderr.find(|l| l.starts_with(prefix))
    }

    pub fn stdout_line(&self, prefix: &str) -> Option<String> {
        self.stdout.as_ref().and_then(|t| t.find(|l| l.starts_with(prefix)))
    }

    pub fn write_stdin(&mut self, text: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin is not piped")?;
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .with_context(|| format!("writing to {}", self.name))
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn signal(&self, sig: c_int) {
        if !self.reaped {
            // SAFETY: our unreaped child, so the pid cannot have been reused.
            unsafe {
                libc::kill(self.pid, sig);
            }
        }
    }

    /// Waits (after `sig`, if any) up to `timeout`, then kills. Returns how
    /// it ended; an error if it had to be killed.
    pub fn stop(&mut self, sig: Option<c_int>, timeout: Duration) -> Result<Exit> {
        match sig {
            Some(sig) => self.stop_with(&[(sig, timeout)]).map(|(exit, _)| exit),
            None => self.stop_with(&[(0, timeout)]).map(|(exit, _)| exit),
        }
    }

    /// Sends each signal in turn (0: none) and waits for the child up to
    /// its timeout; kills it when they are all used up (an error). Returns
    /// how it ended and which step ended it.
    pub fn stop_with(&mut self, steps: &[(c_int, Duration)]) -> Result<(Exit, usize)> {
        if self.reaped {
            bail!("{} had already exited", self.name);
        }
        for (i, (sig, timeout)) in steps.iter().enumerate() {
            if *sig != 0 {
                self.signal(*sig);
            }
            let deadline = Instant::now() + *timeout;
            loop {
                if let Some(exit) = self.wait4(libc::WNOHANG)? {
                    self.join_taps();
                    return Ok((exit, i));
                }
                if Instant::now() >= deadline {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        self.signal(libc::SIGKILL);
        let _ = self.wait4(0);
        let waited: Duration = steps.iter().map(|(_, t)| *t).sum();
        bail!(
            "{} did not exit within {:?} and was killed{}",
            self.name,
            waited,
            self.stderr_tail()
        );
    }

    fn wait4(&mut self, flags: c_int) -> Result<Option<Exit>> {
        let mut status: c_int = 0;
        // SAFETY: a zeroed rusage is valid; wait4 fills both out-parameters.
        let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: as above; the pid is our child.
            let r = unsafe { libc::wait4(self.pid, &mut status, flags, &mut rusage) };
            if r == self.pid {
                self.reaped = true;
                return Ok(Some(Exit { status, rusage }));
            }
            if r == 0 {
                return Ok(None);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e).with_context(|| format!("waiting for {}", self.name));
            }
        }
    }

    /// The taps end when the child's end of the pipes closes.
    fn join_taps(&mut self) {
        self.stderr.join(Duration::from_secs(2));
        if let Some(t) = self.stdout.as_mut() {
            t.join(Duration::from_secs(5));
        }
    }

    /// The last lines of stderr, formatted for an error message.
    pub fn stderr_tail(&self) -> String {
        let tail = self.stderr.tail();
        let tail = &tail[tail.len().saturating_sub(8)..];
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its stderr ends with: {}", tail.join(" | "))
        }
    }

    /// CPU seconds (user + system, all threads) and peak RSS (KiB) so far.
    pub fn sample(&self) -> Sample {
        sample(self.pid)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.reaped {
            self.signal(libc::SIGKILL);
            let _ = self.wait4(0);
        }
    }
}

/// Reads a stream line by line on its own thread: counts event lines, and
/// passes the others on (for readiness checks and error messages).
pub struct Tap {
    lines: Mutex<mpsc::Receiver<String>>,
    state: Arc<TapState>,
    handle: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct TapState {
    events: AtomicU64,
    bytes: AtomicU64,
    lost: AtomicU64,
    tail: Mutex<VecDeque<String>>,
}

impl Tap {
    fn new(stream: impl Read + Send + 'static, event_prefix: Option<&'static [u8]>) -> Tap {
        let state = Arc::new(TapState::default());
        let (tx, rx) = mpsc::channel();
        let st = state.clone();
        let handle = thread::spawn(move || {
            let mut reader = BufReader::with_capacity(1 << 16, stream);
            let mut buf = Vec::with_capacity(256);
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        st.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                if event_prefix.is_some_and(|p| buf.starts_with(p)) {
                    st.events.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                if let Some(n) = lost_count(&line) {
                    st.lost.fetch_add(n, Ordering::Relaxed);
                }
                {
                    let mut tail = st.tail.lock().expect("tap lock");
                    if tail.len() == TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        Tap {
            lines: Mutex::new(rx),
            state,
            handle: Some(handle),
        }
    }

    /// Consumes the lines received so far up to the first one matching.
    pub fn find(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        let rx = self.lines.lock().expect("tap lock");
        rx.try_iter().find(|l| pred(l))
    }

    pub fn events(&self) -> u64 {
        self.state.events.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.state.bytes.load(Ordering::Relaxed)
    }

    /// Sum of the "lost N" counts the stream reported.
    pub fn lost(&self) -> u64 {
        self.state.lost.load(Ordering::Relaxed)
    }

    pub fn tail(&self) -> Vec<String> {
        self.state.tail.lock().expect("tap lock").iter().cloned().collect()
    }

    fn join(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.handle.as_ref().is_some_and(|h| !h.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
            let _ = self.handle.take().map(JoinHandle::join);
        }
    }
}

/// The number in a loss report: bpftrace's "Lost 123 events", bcc's
/// "Possibly lost 123 samples".
pub fn lost_count(line: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w.eq_ignore_ascii_case("lost") {
            return words.next().and_then(|n| n.parse().ok());
        }
    }
    None
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub cpu_seconds: Option<f64>,
    pub peak_rss_kib: Option<u64>,
}

pub fn sample(pid: i32) -> Sample {
    let cpu_seconds = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| cpu_from_stat(&s));
    let peak_rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| hwm_from_status(&s));
    Sample {
        cpu_seconds,
        peak_rss_kib,
    }
}

/// utime + stime (fields 14 and 15) of /proc/PID/stat, in seconds. The
/// command name (field 2) may hold spaces and parentheses: count from the
/// last ')'.
pub fn cpu_from_stat(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some((utime + stime) as f64 / hz)
}

/// VmHWM (peak resident set) of /proc/PID/status, in KiB.
pub fn hwm_from_status(status: &str) -> Option<u64> {
    status_kib(status, "VmHWM:")
}

/// VmRSS (resident set now) of /proc/PID/status, in KiB.
pub fn rss_from_status(status: &str) -> Option<u64> {
    status_kib(status, "VmRSS:")
}

/// The resident set of a process now, in KiB; None once it is gone.
pub fn rss_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| rss_from_status(&s))
}

fn status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Turns on the kernel's run-time accounting of eBPF programs
/// (BPF_ENABLE_STATS): it stays on while the returned fd is open, and so
/// goes off by itself when we exit, whatever happens. It costs two clock
/// reads per program run, for every configuration alike.
pub fn enable_bpf_stats() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr, enable_stats.type = BPF_STATS_RUN_TIME (0).
    let attr = [0u64; 2];
    // SAFETY: the attr buffer is valid for the size passed; a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr) as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as c_int) })
}

/// Time the kernel spent running a process's eBPF programs (the ones it
/// holds fds to), as accounted while stats are enabled.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BpfTime {
    pub seconds: f64,
    pub runs: u64,
    pub programs: usize,
}

pub fn bpf_run_time(pid: i32) -> Option<BpfTime> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?;
    let mut seen = std::collections::HashSet::new();
    let mut total = BpfTime::default();
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Some((id, ns, runs)) = prog_stats(&info) {
            // A program may be held by several fds.
            if seen.insert(id) {
                total.seconds += ns as f64 / 1e9;
                total.runs += runs;
                total.programs += 1;
            }
        }
    }
    (total.programs > 0).then_some(total)
}

/// (prog_id, run_time_ns, run_cnt) of a program fd's fdinfo.
pub fn prog_stats(fdinfo: &str) -> Option<(u64, u64, u64)> {
    let field = |name: &str| {
        fdinfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    // Links name their program too, but carry no run time.
    Some((field("prog_id:")?, field("run_time_ns:")?, field("run_cnt:")?))
}

/// The command as a shell line, for messages.
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|w| {
            let w = w.to_string_lossy();
            if !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,%".contains(c)) {
                w.into_owned()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_reports() {
        assert_eq!(lost_count("Lost 1234 events"), Some(1234));
        assert_eq!(lost_count("Possibly lost 77 samples"), Some(77));
        assert_eq!(lost_count("tracer: warning: x not attached; lost: state changes"), None);
        assert_eq!(lost_count("nothing here"), None);
    }

    #[test]
    fn proc_stat() {
        // comm with a space and a parenthesis; utime 250, stime 50 ticks.
        let stat = "1234 (a b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 0 0";
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert_eq!(cpu_from_stat(stat), Some(300.0 / hz));
        assert_eq!(cpu_from_stat("garbage"), None);
    }

    #[test]
    fn fdinfo() {
        let prog = "pos:\t0\nflags:\t02000002\nprog_type:\t26\nprog_jited:\t1\nprog_tag:\tabc\nmemlock:\t4096\nprog_id:\t42\nrun_time_ns:\t306354993\nrun_cnt:\t141934\n";
        assert_eq!(prog_stats(prog), Some((42, 306_354_993, 141_934)));
        let link = "pos:\t0\nlink_type:\ttracing\nlink_id:\t7\nprog_tag:\tabc\nprog_id:\t42\n";
        assert_eq!(prog_stats(link), None);
    }

    #[test]
    fn proc_status() {
        let status = "Name:\ttracer\nVmPeak:\t  100 kB\nVmHWM:\t   51234 kB\nVmRSS:\t 40000 kB\n";
        assert_eq!(hwm_from_status(status), Some(51234));
        assert_eq!(rss_from_status(status), Some(40000));
        assert_eq!(hwm_from_status("Name:\tx\n"), None);
        assert_eq!(rss_from_status("Name:\tx\n"), None);
    }

    #[test]
    fn tap_counts_events_and_passes_other_lines() {
        let input: &'static [u8] = b"Attaching 2 probes...\nREADY\nE 1 2\nE 3 4\nLost 5 events\nE 5 6\n";
        let mut tap = Tap::new(input, Some(b"E "));
        tap.join(Duration::from_secs(5));
        assert_eq!(tap.events(), 3);
        assert_eq!(tap.lost(), 5);
        assert_eq!(tap.bytes(), input.len() as u64);
        assert_eq!(tap.find(|l| l == "READY").as_deref(), Some("READY"));
        assert_eq!(tap.tail().len(), 3);
    }
}
