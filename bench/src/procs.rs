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

/// CPU time of a whole process so far (every thread, exited ones included),
/// from its CPU-time clock (`clock_getcpuclockid`): to the nanosecond,
/// where /proc/PID/stat counts in clock ticks (10 ms). None once it is gone.
pub fn cpu_clock_seconds(pid: i32) -> Option<f64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock is a valid out-parameter.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-parameter.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
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

/// One eBPF program and what the kernel accounted for it (while stats are
/// enabled): `run_time_ns` over `run_cnt` runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProgRun {
    pub id: u64,
    /// Its function's name from the program's BTF (whole, as `bpftool prog`
    /// shows it); else the kernel's 15-character `name`; else `prog_<id>`.
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// The eBPF programs a process holds fds to, once each, by program id; None
/// when it holds none (or is gone).
pub fn bpf_programs(pid: i32) -> Option<Vec<ProgRun>> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?;
    let mut progs: Vec<ProgRun> = Vec::new();
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        // A program may be held by several fds.
        if let Some((id, ns, runs)) = prog_stats(&info).filter(|(id, ..)| progs.iter().all(|p| p.id != *id)) {
            progs.push(ProgRun {
                id,
                name: String::new(),
                run_time_ns: ns,
                run_cnt: runs,
            });
        }
    }
    for p in &mut progs {
        p.name = prog_name(p.id).unwrap_or_else(|| format!("prog_{}", p.id));
    }
    progs.sort_by_key(|p| p.id);
    (!progs.is_empty()).then_some(progs)
}

/// What each program ran between two readings of [`bpf_programs`] (by id;
/// a program only in `after` counts from zero).
pub fn prog_delta(before: &[ProgRun], after: &[ProgRun]) -> Vec<ProgRun> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.id == a.id);
            ProgRun {
                run_time_ns: a.run_time_ns.saturating_sub(b.map_or(0, |b| b.run_time_ns)),
                run_cnt: a.run_cnt.saturating_sub(b.map_or(0, |b| b.run_cnt)),
                ..a.clone()
            }
        })
        .collect()
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

// The bpf(2) commands used below, from include/uapi/linux/bpf.h.
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
// Offsets in struct bpf_prog_info (stable: the struct only grows).
const PROG_INFO_LEN: usize = 232;
const PROG_INFO_NAME: usize = 64;
const PROG_INFO_BTF_ID: usize = 128;
const PROG_INFO_FUNC_INFO_REC_SIZE: usize = 132;
const PROG_INFO_FUNC_INFO: usize = 136;
const PROG_INFO_NR_FUNC_INFO: usize = 144;

fn bpf(cmd: libc::c_long, attr: &mut [u64]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, writable union bpf_attr of the size passed;
    // any pointers in it (set by the callers) point to live buffers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An fd of the program or BTF object with this id (needs CAP_SYS_ADMIN).
fn fd_by_id(cmd: libc::c_long, id: u32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // attr: { u32 id; u32 next_id; u32 open_flags; }
    let mut attr = [u64::from(id), 0];
    let fd = bpf(cmd, &mut attr)?;
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as c_int) })
}

/// BPF_OBJ_GET_INFO_BY_FD into `info` (8-byte aligned).
fn obj_info(fd: &std::os::fd::OwnedFd, info: &mut [u64]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // attr: { u32 bpf_fd; u32 info_len; u64 info; }
    let len = std::mem::size_of_val(info) as u64;
    let mut attr = [fd.as_raw_fd() as u32 as u64 | len << 32, info.as_mut_ptr() as u64];
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// A program's name as `bpftool prog` gives it: the name of its main
/// function in the program's BTF (the kernel's own `name` is cut at 15
/// characters, and `sys_enter_close_range` would read `sys_enter_close`),
/// falling back on that `name`.
pub fn prog_name(id: u64) -> Option<String> {
    let fd = fd_by_id(BPF_PROG_GET_FD_BY_ID, u32::try_from(id).ok()?).ok()?;
    let mut info = [0u64; PROG_INFO_LEN / 8];
    // The first func_info record is the main function's (instruction 0).
    let mut func = [0u32; 2];
    {
        let bytes = as_bytes_mut(&mut info);
        bytes[PROG_INFO_FUNC_INFO_REC_SIZE..][..4].copy_from_slice(&8u32.to_ne_bytes());
        bytes[PROG_INFO_FUNC_INFO..][..8].copy_from_slice(&(func.as_mut_ptr() as u64).to_ne_bytes());
        bytes[PROG_INFO_NR_FUNC_INFO..][..4].copy_from_slice(&1u32.to_ne_bytes());
    }
    obj_info(&fd, &mut info).ok()?;
    let bytes = as_bytes_mut(&mut info);
    let short = {
        let raw = &bytes[PROG_INFO_NAME..PROG_INFO_NAME + 16];
        let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
        String::from_utf8_lossy(&raw[..end]).into_owned()
    };
    let btf_id = u32_at(bytes, PROG_INFO_BTF_ID)?;
    let nr_func_info = u32_at(bytes, PROG_INFO_NR_FUNC_INFO)?;
    let full = (btf_id != 0 && nr_func_info > 0)
        .then(|| btf_of(btf_id))
        .flatten()
        .and_then(|btf| btf_type_name(&btf, func[1]));
    match full {
        Some(name) if !name.is_empty() => Some(name),
        _ => (!short.is_empty()).then_some(short),
    }
}

fn as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64s are plain bytes; the length is the same memory's.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}

/// The raw BTF of a BTF object (header, types, strings).
fn btf_of(btf_id: u32) -> Option<Vec<u8>> {
    let fd = fd_by_id(BPF_BTF_GET_FD_BY_ID, btf_id).ok()?;
    // struct bpf_btf_info: { u64 btf; u32 btf_size; u32 id; u64 name;
    // u32 name_len; u32 kernel_btf; }: first its size, then the data.
    let mut info = [0u64; 4];
    obj_info(&fd, &mut info).ok()?;
    let size = (info[1] & 0xffff_ffff) as usize;
    if size == 0 || size > 64 << 20 {
        return None;
    }
    let mut data = vec![0u64; size.div_ceil(8)];
    let mut info = [data.as_mut_ptr() as u64, size as u64, 0, 0];
    obj_info(&fd, &mut info).ok()?;
    let mut bytes = as_bytes_mut(&mut data).to_vec();
    bytes.truncate(size);
    Some(bytes)
}

/// The name of BTF type `id` (1-based) in raw BTF: walks the type section,
/// whose records have a kind-dependent length.
pub fn btf_type_name(btf: &[u8], id: u32) -> Option<String> {
    if btf.get(0..2)? != 0xeb9f_u16.to_le_bytes() || id == 0 {
        return None;
    }
    let hdr_len = u32_at(btf, 4)? as usize;
    let (type_off, type_len) = (u32_at(btf, 8)? as usize, u32_at(btf, 12)? as usize);
    let (str_off, str_len) = (u32_at(btf, 16)? as usize, u32_at(btf, 20)? as usize);
    let types = btf.get(hdr_len + type_off..hdr_len + type_off + type_len)?;
    let strings = btf.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
    let mut at = 0;
    let mut n = 1;
    while at + 12 <= types.len() {
        let name_off = u32_at(types, at)? as usize;
        let info = u32_at(types, at + 4)?;
        if n == id {
            let s = strings.get(name_off..)?;
            let end = s.iter().position(|b| *b == 0)?;
            return Some(String::from_utf8_lossy(&s[..end]).into_owned());
        }
        let vlen = (info & 0xffff) as usize;
        let extra = match (info >> 24) & 0x1f {
            // INT, VAR, DECL_TAG: one u32.
            1 | 14 | 17 => 4,
            // ARRAY: struct btf_array.
            3 => 12,
            // STRUCT, UNION (members), DATASEC (var_secinfo), ENUM64.
            4 | 5 | 15 | 19 => 12 * vlen,
            // ENUM (btf_enum), FUNC_PROTO (btf_param).
            6 | 13 => 8 * vlen,
            // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT,
            // TYPE_TAG: nothing more.
            2 | 7..=12 | 16 | 18 => 0,
            _ => return None,
        };
        at += 12 + extra;
        n += 1;
    }
    None
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
    fn btf_names() {
        // Strings: "", "int", "ctx", "inet_sock_set_state".
        let strings = b"\0int\0ctx\0inet_sock_set_state\0";
        let mut types = Vec::new();
        let mut ty = |name_off: u32, kind: u32, vlen: u32, size_or_type: u32, extra: &[u32]| {
            for w in [name_off, kind << 24 | vlen, size_or_type].iter().chain(extra) {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        ty(1, 1, 0, 4, &[32]); // 1: INT int
        ty(0, 2, 0, 1, &[]); // 2: PTR -> int
        ty(0, 13, 1, 1, &[5, 2]); // 3: FUNC_PROTO int (ctx: int *)
        ty(9, 12, 0, 3, &[]); // 4: FUNC inet_sock_set_state
        let mut btf = Vec::new();
        for w in [
            0xeb9f_u16 as u32 | 1 << 16,
            24,
            0,
            types.len() as u32,
            types.len() as u32,
        ] {
            btf.extend_from_slice(&w.to_le_bytes());
        }
        btf.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        btf.extend_from_slice(&types);
        btf.extend_from_slice(strings);
        assert_eq!(btf_type_name(&btf, 4).as_deref(), Some("inet_sock_set_state"));
        assert_eq!(btf_type_name(&btf, 1).as_deref(), Some("int"));
        assert_eq!(btf_type_name(&btf, 3).as_deref(), Some(""));
        assert_eq!(btf_type_name(&btf, 5), None);
        assert_eq!(btf_type_name(&btf, 0), None);
        assert_eq!(btf_type_name(&btf[..20], 1), None);
    }

    #[test]
    fn deltas_by_program() {
        let p = |id, name: &str, ns, cnt| ProgRun {
            id,
            name: name.into(),
            run_time_ns: ns,
            run_cnt: cnt,
        };
        let before = [p(1, "a", 100, 10), p(2, "b", 50, 5)];
        let after = [p(1, "a", 400, 40), p(2, "b", 50, 5), p(3, "c", 7, 1)];
        assert_eq!(
            prog_delta(&before, &after),
            vec![p(1, "a", 300, 30), p(2, "b", 0, 0), p(3, "c", 7, 1)]
        );
    }

    #[test]
    fn cpu_clock() {
        let pid = std::process::id() as i32;
        let a = cpu_clock_seconds(pid).expect("our own clock");
        let mut x = 0u64;
        for i in 0..10_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        let b = cpu_clock_seconds(pid).expect("our own clock");
        assert!(b > a, "{a} then {b}");
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
