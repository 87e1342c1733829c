//! Loopback TCP load generator for the tracer benchmark.
//!
//! ```text
//! loadgen server [--threads T] [--addrs N] [--port P] [--duration SECS]
//! loadgen client --port P [--mode MODE] [--duration SECS] [--threads T] [--addrs N]
//!                [--leak-percent P] [--leak-max M] [--open N] [--sync]
//! loadgen run    [client options but --port and --sync] [--server-threads T]
//! ```
//!
//! The server listens on 127.0.0.1, 127.0.0.2, … (`--addrs` addresses; one
//! SO_REUSEPORT listener per address and thread, never a routable address),
//! accepts, reads what the client sent, and closes. The client spreads its
//! connections over those addresses so that TIME_WAIT does not exhaust the
//! ephemeral ports of one destination. `run` starts the server as a child
//! process (client and server are always separate processes) and runs the
//! client. Only 127.0.0.0/8 is ever used.
//!
//! Modes (client):
//! - `churn`: connect, write 8 bytes, close. Ten TCP state changes per
//!   connection, counting both ends.
//! - `churn-leak`: the same, but `--leak-percent` of the connections are not
//!   closed by the client: the server closes them, so they sit in CLOSE_WAIT
//!   in the client. At most `--leak-max` are kept; beyond, the oldest is
//!   closed (a late close).
//! - `many-sockets`: first open `--open` (default 100000) idle connections,
//!   kept open to the end, then churn. They are held, both ends, by
//!   `loadgen hold` helper processes (internal), each with as many as its
//!   RLIMIT_NOFILE allows: the limit is raised as far as permitted, and a
//!   machine without CAP_SYS_RESOURCE (a container) needs about one helper
//!   per 10 000 connections.
//!
//! Protocol for a harness (stderr, one line each): the server prints
//! `READY port=P addrs=N threads=T` once it listens; the client prints
//! `READY mode=...` once its preparation (the idle connections) is done.
//! With `--sync` the client then waits for a line on stdin before it starts,
//! and after printing its result waits for stdin to close before it exits
//! and closes its idle and leaked connections. The result is one JSON line
//! on stdout:
//! `{"mode":"churn","connections":N,"seconds":F,"conn_per_sec":F,"errors":N,...}`.
//! The client always stops by itself after `--duration` (default 5 s).

use std::collections::VecDeque;
use std::ffi::c_int;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "usage:
  loadgen server [--threads T] [--addrs N] [--port P] [--duration SECS]
  loadgen client --port P [--mode churn|churn-leak|many-sockets] [--duration SECS] [--threads T]
                 [--addrs N] [--leak-percent P] [--leak-max M] [--open N] [--sync]
  loadgen run    [client options but --port and --sync] [--server-threads T]
defaults: --threads 2, --addrs 64, --duration 5 (client), --leak-percent 1, --leak-max 10000,
          --open 100000 with many-sockets, --port 0 (server: the kernel picks)";

/// Listen backlog; the kernel caps it at net.core.somaxconn.
const BACKLOG: c_int = 4096;
/// What each churn connection writes.
const PAYLOAD: [u8; 8] = *b"loadgen\n";
/// epoll data tag for listening sockets (connections carry their bare fd).
const LISTENER: u64 = 1 << 32;
/// Most destination addresses: 127.0.0.1 to 127.0.255.254.
const MAX_ADDRS: usize = 254 * 256;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("server") => Opts::parse(&args[1..], Role::Server).and_then(|o| server(&o)),
        Some("client") => Opts::parse(&args[1..], Role::Client).and_then(|o| client(&o).map(|_| ())),
        Some("run") => Opts::parse(&args[1..], Role::Run).and_then(|o| run(&o)),
        Some("hold") => hold(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(Error::Usage("expected a command: server, client or run".into())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Usage(msg)) => {
            eprintln!("loadgen: {msg}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Error::Io(what, e)) => {
            eprintln!("loadgen: {what}: {e}");
            ExitCode::FAILURE
        }
    }
}

enum Error {
    Usage(String),
    Io(String, io::Error),
}

type Result<T> = std::result::Result<T, Error>;

trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Io(what(), e))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Server,
    Client,
    Run,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Churn,
    ChurnLeak,
    ManySockets,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Churn => "churn",
            Mode::ChurnLeak => "churn-leak",
            Mode::ManySockets => "many-sockets",
        }
    }
}

#[derive(Clone, Debug)]
struct Opts {
    mode: Mode,
    port: u16,
    addrs: usize,
    threads: usize,
    server_threads: usize,
    duration: Option<Duration>,
    leak_percent: f64,
    leak_max: usize,
    open: usize,
    sync: bool,
}

impl Opts {
    fn parse(args: &[String], role: Role) -> Result<Opts> {
        let mut o = Opts {
            mode: Mode::Churn,
            port: 0,
            addrs: 64,
            threads: 2,
            server_threads: 2,
            duration: None,
            leak_percent: 1.0,
            leak_max: 10_000,
            open: 0,
            sync: false,
        };
        let mut open_given = false;
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let allowed = match flag.as_str() {
                "--threads" | "--addrs" | "--duration" => true,
                "--port" => role != Role::Run,
                "--open" => role != Role::Server,
                "--mode" | "--leak-percent" | "--leak-max" => role != Role::Server,
                "--sync" => role == Role::Client,
                "--server-threads" => role == Role::Run,
                _ => false,
            };
            if !allowed {
                return Err(Error::Usage(format!("unknown option {flag}")));
            }
            if flag == "--sync" {
                o.sync = true;
                continue;
            }
            let value = it.next().ok_or_else(|| Error::Usage(format!("{flag} needs a value")))?;
            let bad = || Error::Usage(format!("bad value for {flag}: {value}"));
            match flag.as_str() {
                "--threads" => o.threads = value.parse().map_err(|_| bad())?,
                "--server-threads" => o.server_threads = value.parse().map_err(|_| bad())?,
                "--addrs" => o.addrs = value.parse().map_err(|_| bad())?,
                "--port" => o.port = value.parse().map_err(|_| bad())?,
                "--leak-max" => o.leak_max = value.parse().map_err(|_| bad())?,
                "--open" => {
                    o.open = value.parse().map_err(|_| bad())?;
                    open_given = true;
                }
                "--duration" => {
                    let secs: f64 = value.parse().map_err(|_| bad())?;
                    if !(secs.is_finite() && secs > 0.0) {
                        return Err(bad());
                    }
                    o.duration = Some(Duration::from_secs_f64(secs));
                }
                "--leak-percent" => {
                    o.leak_percent = value.parse().map_err(|_| bad())?;
                    if !(0.0..=100.0).contains(&o.leak_percent) {
                        return Err(bad());
                    }
                }
                "--mode" => {
                    o.mode = match value.as_str() {
                        "churn" => Mode::Churn,
                        "churn-leak" => Mode::ChurnLeak,
                        "many-sockets" => Mode::ManySockets,
                        _ => return Err(bad()),
                    }
                }
                _ => unreachable!("checked above"),
            }
        }
        if o.mode == Mode::ManySockets && !open_given {
            o.open = 100_000;
        }
        if o.threads == 0 || o.server_threads == 0 {
            return Err(Error::Usage("--threads must be at least 1".into()));
        }
        if o.addrs == 0 || o.addrs > MAX_ADDRS {
            return Err(Error::Usage(format!("--addrs must be between 1 and {MAX_ADDRS}")));
        }
        if role != Role::Server {
            if o.duration.is_none() {
                o.duration = Some(Duration::from_secs(5));
            }
            if role == Role::Client && o.port == 0 {
                return Err(Error::Usage(
                    "client needs --port (the server's READY line names it)".into(),
                ));
            }
        }
        Ok(o)
    }

    fn duration(&self) -> Duration {
        self.duration.unwrap_or(Duration::from_secs(5))
    }
}

/// The i-th destination: 127.0.0.1, …, 127.0.0.254, 127.0.1.1, … (always
/// inside 127.0.0.0/8, never .0 or .255 in the last byte).
fn dest_addr(i: usize) -> Ipv4Addr {
    let i = i % MAX_ADDRS;
    Ipv4Addr::new(127, 0, (i / 254) as u8, (i % 254 + 1) as u8)
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

fn cvt(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

/// Raises RLIMIT_NOFILE towards `need`: the soft limit, and the hard one
/// too when allowed (CAP_SYS_RESOURCE; containers often lack it). Returns
/// the soft limit now in force, which may be less than `need`.
fn raise_nofile(need: usize) -> usize {
    let need = need as libc::rlim_t;
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim: libc::rlimit = mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur >= need {
            return lim.rlim_cur as usize;
        }
        if need > lim.rlim_max {
            // Never above fs.nr_open, which bounds the hard limit.
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
                .unwrap_or(need);
            let want = need.min(nr_open);
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return want as usize;
            }
        }
        let soft = libc::rlimit {
            rlim_cur: need.min(lim.rlim_max),
            rlim_max: lim.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
            return soft.rlim_cur as usize;
        }
        lim.rlim_cur as usize
    }
}

/// Spawns a copy of ourselves that dies with us (PR_SET_PDEATHSIG), with
/// stdin piped (closing it asks `hold` to exit) and stderr piped.
fn spawn_self(args: &[String]) -> io::Result<std::process::Child> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Reads a child's stderr until a line starting with `prefix`; returns the
/// rest of that line and the reader (for the lines after). Other lines are
/// passed on to our stderr.
fn wait_ready(
    stderr: std::process::ChildStderr,
    prefix: &str,
) -> io::Result<(String, std::io::Lines<BufReader<std::process::ChildStderr>>)> {
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(rest) = line.strip_prefix(prefix) {
            return Ok((rest.to_owned(), lines));
        }
        eprintln!("{line}");
    }
    Err(io::Error::other("it exited before it was ready"))
}

// ---------------------------------------------------------------- server

fn server(o: &Opts) -> Result<()> {
    // Listeners, and slack for the connections in flight.
    let need = o.addrs * o.threads + 1024;
    let limit = raise_nofile(need + 15_360);
    if limit < need {
        return Err(Error::Io(
            format!("{} listeners", o.addrs * o.threads),
            io::Error::other(format!("RLIMIT_NOFILE is {limit}; use fewer --addrs")),
        ));
    }
    let (port, listeners) = bind_listeners(o)?;
    eprintln!("READY port={port} addrs={} threads={}", o.addrs, o.threads);
    let workers: Vec<_> = listeners
        .into_iter()
        .map(|set| thread::spawn(move || serve(set)))
        .collect();
    if let Some(d) = o.duration {
        thread::sleep(d);
        return Ok(());
    }
    for w in workers {
        match w.join() {
            Ok(r) => r.context(|| "serving".into())?,
            Err(_) => return Err(Error::Io("serving".into(), io::Error::other("worker panicked"))),
        }
    }
    Ok(())
}

/// One listener per destination address and thread, all on one port
/// (SO_REUSEPORT spreads each address's connections over the threads).
/// With `--port 0` the kernel picks the port of the first listener; the
/// others may find it taken on their address, then all is retried.
fn bind_listeners(o: &Opts) -> Result<(u16, Vec<Vec<OwnedFd>>)> {
    let mut last_err = None;
    for _attempt in 0..20 {
        let mut port = o.port;
        let mut sets: Vec<Vec<OwnedFd>> = (0..o.threads).map(|_| Vec::with_capacity(o.addrs)).collect();
        let mut failed = None;
        'bind: for a in 0..o.addrs {
            for set in sets.iter_mut() {
                match listen_on(SocketAddrV4::new(dest_addr(a), port)) {
                    Ok((fd, bound)) => {
                        port = bound;
                        set.push(fd);
                    }
                    Err(e) => {
                        failed = Some((dest_addr(a), e));
                        break 'bind;
                    }
                }
            }
        }
        match failed {
            None => return Ok((port, sets)),
            Some((addr, e)) => {
                let retry = o.port == 0 && e.kind() == io::ErrorKind::AddrInUse;
                let err = Error::Io(format!("listening on {addr}:{port}"), e);
                if !retry {
                    return Err(err);
                }
                last_err = Some(err);
            }
        }
    }
    Err(last_err.expect("at least one attempt"))
}

fn listen_on(addr: SocketAddrV4) -> io::Result<(OwnedFd, u16)> {
    // SAFETY: plain socket calls on an fd we own; the structs outlive the calls.
    unsafe {
        let fd = cvt(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let fd = OwnedFd::from_raw_fd(fd);
        let one: c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            cvt(libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&one as *const c_int).cast(),
                mem::size_of::<c_int>() as libc::socklen_t,
            ))?;
        }
        let sa = sockaddr(addr);
        cvt(libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ))?;
        cvt(libc::listen(fd.as_raw_fd(), BACKLOG))?;
        let mut bound: libc::sockaddr_in = mem::zeroed();
        let mut len = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        cvt(libc::getsockname(
            fd.as_raw_fd(),
            (&mut bound as *mut libc::sockaddr_in).cast(),
            &mut len,
        ))?;
        Ok((fd, u16::from_be(bound.sin_port)))
    }
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// One server thread: an epoll loop over its listeners and the connections
/// still waiting for data. A connection is closed as soon as a read returns
/// anything (data, end of file or an error); idle ones stay open until their
/// client closes them.
fn serve(listeners: Vec<OwnedFd>) -> io::Result<()> {
    // SAFETY: epoll and socket calls on fds this thread owns; buffers are
    // local and outlive each call.
    unsafe {
        let ep = OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?);
        for l in &listeners {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: LISTENER | l.as_raw_fd() as u64,
            };
            cvt(libc::epoll_ctl(
                ep.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                l.as_raw_fd(),
                &mut ev,
            ))?;
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
        let mut warned_emfile = false;
        loop {
            let n = libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), events.len() as c_int, -1);
            if n < 0 {
                let e = errno();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in &events[..n as usize] {
                let data = ev.u64;
                let fd = (data & 0xffff_ffff) as RawFd;
                if data & LISTENER == 0 {
                    // Readable (or hung up): whatever the read says, done.
                    read_and_close(fd);
                    continue;
                }
                loop {
                    let c = libc::accept4(
                        fd,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    );
                    if c < 0 {
                        let e = errno();
                        match e.raw_os_error() {
                            Some(libc::EINTR | libc::ECONNABORTED) => continue,
                            Some(libc::EMFILE | libc::ENFILE) if !warned_emfile => {
                                warned_emfile = true;
                                eprintln!("loadgen server: accept: {e} (raise the fd limit)");
                            }
                            _ => {}
                        }
                        break;
                    }
                    // The client usually wrote before we got here: read now
                    // and spare the epoll round trip.
                    if read_and_close(c) {
                        continue;
                    }
                    let mut cev = libc::epoll_event {
                        events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                        u64: c as u64,
                    };
                    if libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, c, &mut cev) < 0 {
                        libc::close(c);
                    }
                }
            }
        }
    }
}

/// Reads once; closes unless there was nothing to read yet. Returns whether
/// the fd was closed.
///
/// # Safety
/// `fd` must be an open connection owned by the caller.
unsafe fn read_and_close(fd: RawFd) -> bool {
    let mut buf = [0u8; 512];
    // SAFETY: buf is valid for its length; the caller owns fd.
    let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 && errno().kind() == io::ErrorKind::WouldBlock {
        return false;
    }
    // SAFETY: as above; closing also removes it from the epoll set.
    unsafe { libc::close(fd) };
    true
}

// ---------------------------------------------------------------- client

/// What one run measured.
struct Report {
    mode: Mode,
    connections: u64,
    seconds: f64,
    errors: u64,
    threads: usize,
    leaked_open: usize,
    idle_open: usize,
}

impl Report {
    fn json(&self) -> String {
        let rate = if self.seconds > 0.0 {
            self.connections as f64 / self.seconds
        } else {
            0.0
        };
        format!(
            "{{\"mode\":\"{}\",\"connections\":{},\"seconds\":{:.3},\"conn_per_sec\":{:.1},\"errors\":{},\"threads\":{},\"leaked_open\":{},\"idle_open\":{}}}",
            self.mode.name(),
            self.connections,
            self.seconds,
            rate,
            self.errors,
            self.threads,
            self.leaked_open,
            self.idle_open
        )
    }
}

/// Everything a churn thread leaves behind: its counts and the connections
/// it must keep open until the end.
struct ThreadResult {
    connections: u64,
    errors: u64,
    first_error: Option<io::Error>,
    leaked: VecDeque<TcpStream>,
}

fn client(o: &Opts) -> Result<Report> {
    let limit = raise_nofile(o.leak_max + o.threads * 64 + 1024);
    let leak_max = o.leak_max.min(limit.saturating_sub(o.threads * 64 + 1024));
    if o.mode == Mode::ChurnLeak && leak_max < o.leak_max {
        eprintln!("loadgen client: RLIMIT_NOFILE is {limit}: keeping at most {leak_max} leaked connections");
    }
    let (holders, idle) = open_idle(o)?;
    eprintln!(
        "READY mode={} idle={} threads={}{}",
        o.mode.name(),
        idle,
        o.threads,
        if o.sync { " (waiting for a line on stdin)" } else { "" }
    );
    let mut stdin = BufReader::new(io::stdin());
    if o.sync {
        let mut line = String::new();
        if stdin.read_line(&mut line).context(|| "reading stdin".into())? == 0 {
            return Err(Error::Io(
                "waiting for the start line".into(),
                io::Error::other("stdin closed"),
            ));
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(o.threads + 1));
    let per_thread_leaks = if o.mode == Mode::ChurnLeak {
        leak_max.div_ceil(o.threads)
    } else {
        0
    };
    let workers: Vec<_> = (0..o.threads)
        .map(|t| {
            let (stop, start) = (stop.clone(), start.clone());
            let (port, addrs, threads) = (o.port, o.addrs, o.threads);
            let leak_percent = if o.mode == Mode::ChurnLeak { o.leak_percent } else { 0.0 };
            thread::spawn(move || {
                start.wait();
                churn(t, threads, port, addrs, leak_percent, per_thread_leaks, &stop)
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    thread::sleep(o.duration());
    stop.store(true, Ordering::Relaxed);
    let mut results = Vec::new();
    for w in workers {
        results.push(
            w.join()
                .map_err(|_| Error::Io("churn".into(), io::Error::other("thread panicked")))?,
        );
    }
    let seconds = began.elapsed().as_secs_f64();

    let report = Report {
        mode: o.mode,
        connections: results.iter().map(|r| r.connections).sum(),
        seconds,
        errors: results.iter().map(|r| r.errors).sum(),
        threads: o.threads,
        leaked_open: results.iter().map(|r| r.leaked.len()).sum(),
        idle_open: idle,
    };
    if let Some(e) = results.iter().find_map(|r| r.first_error.as_ref()) {
        eprintln!("loadgen client: {} connection errors, the first: {e}", report.errors);
    }
    let mut out = io::stdout().lock();
    writeln!(out, "{}", report.json())
        .and_then(|()| out.flush())
        .context(|| "writing the result".into())?;
    drop(out);
    if o.sync {
        // Keep the idle and leaked connections until the harness is done
        // (it stops the tracer first, so their teardown is not measured).
        let mut sink = Vec::new();
        let _ = stdin.read_to_end(&mut sink);
    }
    drop(results);
    close_idle(holders);
    Ok(report)
}

/// Opens `--open` idle connections (many-sockets). They are held by
/// `loadgen hold` helper processes, both ends in the same helper, so that
/// neither the server nor this client spends file descriptors on them: as
/// many helpers as RLIMIT_NOFILE requires (one when it can be raised far
/// enough; on a machine without CAP_SYS_RESOURCE, about one per 10 000).
fn open_idle(o: &Opts) -> Result<(Vec<Child>, usize)> {
    if o.open == 0 {
        return Ok((Vec::new(), 0));
    }
    let started = Instant::now();
    // Helpers inherit the raised limit; each needs two fds per connection.
    let limit = raise_nofile(2 * o.open + 256);
    let per_helper = (limit.saturating_sub(256) / 2).max(1);
    let helpers = o.open.div_ceil(per_helper);
    if helpers > MAX_ADDRS - o.addrs {
        return Err(Error::Usage(format!(
            "--open {} needs {helpers} helper processes at RLIMIT_NOFILE {limit}: too many",
            o.open
        )));
    }
    let mut children = Vec::with_capacity(helpers);
    for h in 0..helpers {
        let count = o.open / helpers + usize::from(h < o.open % helpers);
        // Each helper listens on its own address, from the top of the range
        // down, away from the churn destinations at the bottom.
        let args = [
            "hold".to_owned(),
            "--count".to_owned(),
            count.to_string(),
            "--addr".to_owned(),
            (MAX_ADDRS - 1 - h).to_string(),
        ];
        children.push(spawn_self(&args).context(|| "starting a hold helper".into())?);
    }
    let mut held = 0;
    for child in &mut children {
        let stderr = child.stderr.take().expect("piped");
        let (rest, lines) = wait_ready(stderr, "READY held=").context(|| "starting a hold helper".into())?;
        held += rest.trim().parse::<usize>().unwrap_or(0);
        forward_lines(lines);
    }
    eprintln!(
        "loadgen client: {held} idle connections open after {:.1}s ({helpers} helper process(es))",
        started.elapsed().as_secs_f64()
    );
    Ok((children, held))
}

/// Lets the helpers go (they exit when their stdin closes) and waits, so
/// that the idle connections are gone when we exit.
fn close_idle(children: Vec<Child>) {
    let mut children = children;
    for c in &mut children {
        drop(c.stdin.take());
    }
    for mut c in children {
        let _ = c.wait();
    }
}

fn forward_lines(lines: std::io::Lines<BufReader<std::process::ChildStderr>>) {
    thread::spawn(move || {
        for line in lines.map_while(|l| l.ok()) {
            eprintln!("{line}");
        }
    });
}

// ---------------------------------------------------------------- hold

/// `loadgen hold --count K --addr I`: listens on the I-th address, connects
/// to itself K times and accepts each, then holds both ends until stdin
/// closes (or the parent dies).
fn hold(args: &[String]) -> Result<()> {
    let mut count = None;
    let mut addr = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| Error::Usage(format!("{flag} needs a value")))?;
        let n: usize = value
            .parse()
            .map_err(|_| Error::Usage(format!("bad value for {flag}: {value}")))?;
        match flag.as_str() {
            "--count" => count = Some(n),
            "--addr" => addr = Some(n),
            _ => return Err(Error::Usage(format!("unknown option {flag}"))),
        }
    }
    let (Some(count), Some(addr)) = (count, addr) else {
        return Err(Error::Usage("hold needs --count and --addr".into()));
    };
    let limit = raise_nofile(2 * count + 64);
    if limit < 2 * count + 16 {
        return Err(Error::Io(
            format!("holding {count} connections"),
            io::Error::other(format!("RLIMIT_NOFILE is {limit}")),
        ));
    }
    let listen = SocketAddrV4::new(dest_addr(addr), 0);
    let listener = TcpListener::bind(listen).context(|| format!("listening on {listen}"))?;
    let target = listener.local_addr().context(|| "getsockname".into())?;
    let mut held = Vec::with_capacity(2 * count);
    for _ in 0..count {
        held.push(TcpStream::connect(target).context(|| format!("connecting to {target}"))?);
        held.push(listener.accept().context(|| "accepting".into())?.0);
    }
    drop(listener);
    eprintln!("READY held={count}");
    let mut sink = Vec::new();
    let _ = io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// One churn thread: connect, write 8 bytes, close, until told to stop.
/// Destinations go round robin, each thread starting at its own offset.
fn churn(
    t: usize,
    threads: usize,
    port: u16,
    addrs: usize,
    leak_percent: f64,
    leak_max: usize,
    stop: &AtomicBool,
) -> ThreadResult {
    let mut r = ThreadResult {
        connections: 0,
        errors: 0,
        first_error: None,
        leaked: VecDeque::with_capacity(leak_max.min(1 << 16)),
    };
    let mut next = t % addrs;
    let step = threads.max(1);
    // Leak decisions spread evenly: leak when floor(n * p / 100) moves.
    let mut leak_budget = 0.0f64;
    while !stop.load(Ordering::Relaxed) {
        let dest = SocketAddrV4::new(dest_addr(next), port);
        next = (next + step) % addrs;
        let stream = TcpStream::connect(dest).and_then(|mut s| s.write_all(&PAYLOAD).map(|()| s));
        match stream {
            Ok(s) => {
                r.connections += 1;
                leak_budget += leak_percent / 100.0;
                if leak_budget >= 1.0 && leak_max > 0 {
                    leak_budget -= 1.0;
                    if r.leaked.len() >= leak_max {
                        r.leaked.pop_front();
                    }
                    r.leaked.push_back(s);
                }
            }
            Err(e) => {
                r.errors += 1;
                if r.first_error.is_none() {
                    r.first_error = Some(e);
                }
                // Out of ports or fds: back off instead of spinning.
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    r
}

// ---------------------------------------------------------------- run

/// Server as a child process (killed with us), client in this process.
fn run(o: &Opts) -> Result<()> {
    let args = [
        "server".to_owned(),
        "--threads".to_owned(),
        o.server_threads.to_string(),
        "--addrs".to_owned(),
        o.addrs.to_string(),
    ];
    let mut child = spawn_self(&args).context(|| "starting the server".into())?;
    let stderr = child.stderr.take().expect("piped");
    let result = match wait_ready(stderr, "READY port=") {
        Ok((rest, lines)) => {
            forward_lines(lines);
            match rest.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()) {
                Some(port) => client(&Opts { port, ..o.clone() }).map(|_| ()),
                None => Err(Error::Io(
                    "starting the server".into(),
                    io::Error::other(format!("bad READY line: {rest}")),
                )),
            }
        }
        Err(e) => Err(Error::Io("starting the server".into(), e)),
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}
