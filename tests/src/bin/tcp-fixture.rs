//! TCP fixture driven by the `tracer` integration tests.
//!
//! It produces sockets in CLOSE_WAIT on purpose, in well-defined processes,
//! so that the tests can compare what `tracer` reports with what the kernel
//! (via `ss`) says.
//!
//! ```text
//! tcp-fixture server --listen ADDR:PORT [--reply BYTES] [--close-after-reply | --never-close]
//! tcp-fixture client --connect ADDR:PORT [--count N] [--mode leak|close|close-now]
//!                    [--read] [--fork-holder [--close-after-fork]] [--hold-secs S]
//!                    [--wait-stdin-line]
//! ```
//!
//! Server: prints `READY <port>` once listening, then accepts forever. Each
//! accepted connection gets BYTES bytes, then is closed (default; the peer
//! sees a FIN and, if it never closes, stays in CLOSE_WAIT) or, with
//! `--never-close`, kept open forever without being read (a peer that closes
//! leaves the server's socket in CLOSE_WAIT).
//!
//! Client: opens N connections one after the other.
//! * `leak`: keeps every socket open; with `--read` it first reads until EOF,
//!   so the peer's FIN has arrived when `DONE` is printed. Without `--read`
//!   it reads nothing at all: the server's reply and its FIN stay in the
//!   receive queue (`ss` Recv-Q = reply + 1 once the FIN is in, which may be
//!   a moment after `DONE`).
//! * `close`: reads until EOF (the FIN), then closes the socket.
//! * `close-now`: closes the socket right after connecting, without reading.
//!
//! `--close-mode after-fin|never|now` is accepted as a synonym of
//! `--mode close|leak|close-now`.
//!
//! `--fork-holder`: once all N are open (and read, with `--read`), fork. The
//! child inherits every socket still open, prints nothing, has its stdio on
//! /dev/null, and sleeps until it is killed; it gets SIGKILL when the client
//! dies (`PR_SET_PDEATHSIG`). With `--close-after-fork` the client then
//! closes all its sockets, so they stay open (in CLOSE_WAIT) only because
//! the child still holds them.
//!
//! Then it prints `HOLDER <child pid>` (with `--fork-holder` only),
//! `DONE <pid>` and one `SOCK <local> <remote> <fd>` line per connection, in
//! one write, then waits until stdin reaches EOF or `--hold-secs` (default
//! 3600) have passed, and exits (which closes any leaked socket). With
//! `--wait-stdin-line` it waits for one line on stdin before connecting.
//!
//! Stacks: sockets are opened and closed with raw libc calls from named,
//! never-inlined functions, `open_connection` -> `connect_socket` ->
//! `connect(2)` and `close_client_socket` -> `close_fd` -> `close(2)`. The
//! glibc syscall wrappers keep no frame pointer, so a frame-pointer walk
//! from inside the syscall skips their immediate caller (`connect_socket`,
//! `close_fd`) and shows the function above it: `open_connection` and
//! `close_client_socket` are the names a stack trace reliably contains.

use std::hint::black_box;
use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

const USAGE: &str = "usage:
  tcp-fixture server --listen ADDR:PORT [--reply BYTES] [--close-after-reply | --never-close]
  tcp-fixture client --connect ADDR:PORT [--count N] [--mode leak|close|close-now]
                     [--close-mode never|after-fin|now] [--read] [--fork-holder [--close-after-fork]]
                     [--hold-secs S] [--wait-stdin-line]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("server") => parse_server(&args[1..]).and_then(run_server),
        Some("client") => parse_client(&args[1..]).and_then(run_client),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(format!("expected a subcommand\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp-fixture: {e}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------
// Argument parsing
// ---------------------------------------------------------------------------

struct ServerOpts {
    listen: SocketAddr,
    reply: usize,
    never_close: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Keep every socket open.
    Leak,
    /// Read until EOF (FIN arrived), then close.
    Close,
    /// Close right after connecting.
    CloseNow,
}

struct ClientOpts {
    connect: SocketAddr,
    count: usize,
    mode: Mode,
    read: bool,
    fork_holder: bool,
    close_after_fork: bool,
    hold: Duration,
    wait_stdin_line: bool,
}

fn value<'a>(it: &mut impl Iterator<Item = &'a String>, flag: &str) -> Result<&'a str, String> {
    it.next()
        .map(String::as_str)
        .ok_or_else(|| format!("{flag} needs a value"))
}

fn parse_num<T: std::str::FromStr>(s: &str, flag: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("{flag}: invalid number {s:?}"))
}

fn parse_addr(s: &str, flag: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{flag}: invalid socket address {s:?} (want ADDR:PORT or [V6]:PORT)"))
}

fn parse_server(args: &[String]) -> Result<ServerOpts, String> {
    let mut listen = None;
    let mut reply = 0;
    let mut never_close = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--listen" => listen = Some(parse_addr(value(&mut it, arg)?, arg)?),
            "--reply" => reply = parse_num(value(&mut it, arg)?, arg)?,
            "--close-after-reply" => never_close = false,
            "--never-close" => never_close = true,
            other => return Err(format!("server: unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(ServerOpts {
        listen: listen.ok_or("server: --listen is required")?,
        reply,
        never_close,
    })
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    match s {
        "leak" | "never" => Ok(Mode::Leak),
        "close" | "after-fin" => Ok(Mode::Close),
        "close-now" | "now" => Ok(Mode::CloseNow),
        other => Err(format!("invalid mode {other:?} (want leak|close|close-now)")),
    }
}

fn parse_client(args: &[String]) -> Result<ClientOpts, String> {
    let mut connect = None;
    let mut count = 1;
    let mut mode = Mode::Leak;
    let mut read = false;
    let mut fork_holder = false;
    let mut close_after_fork = false;
    let mut hold = Duration::from_secs(3600);
    let mut wait_stdin_line = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--connect" => connect = Some(parse_addr(value(&mut it, arg)?, arg)?),
            "--count" => count = parse_num(value(&mut it, arg)?, arg)?,
            "--mode" | "--close-mode" => mode = parse_mode(value(&mut it, arg)?)?,
            "--read" => read = true,
            "--fork-holder" => fork_holder = true,
            "--close-after-fork" => close_after_fork = true,
            "--hold-secs" => hold = Duration::from_secs(parse_num(value(&mut it, arg)?, arg)?),
            "--wait-stdin-line" => wait_stdin_line = true,
            other => return Err(format!("client: unknown argument {other:?}\n{USAGE}")),
        }
    }
    if close_after_fork && !fork_holder {
        return Err("client: --close-after-fork needs --fork-holder".to_string());
    }
    Ok(ClientOpts {
        connect: connect.ok_or("client: --connect is required")?,
        count,
        mode,
        read,
        fork_holder,
        close_after_fork,
        hold,
        wait_stdin_line,
    })
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

fn check(ret: libc::c_int, what: &str) -> Result<libc::c_int, String> {
    if ret < 0 {
        Err(format!("{what}: {}", io::Error::last_os_error()))
    } else {
        Ok(ret)
    }
}

/// `addr` as a `sockaddr_in` or `sockaddr_in6` (in a `sockaddr_storage`),
/// with its length, for bind(2) and connect(2).
fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for every
            // sockaddr type; the zeroed bytes are a valid sockaddr_in.
            let sa = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_port = a.port().to_be();
            sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sa = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = a.port().to_be();
            sa.sin6_addr.s6_addr = a.ip().octets();
            sa.sin6_flowinfo = a.flowinfo();
            sa.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Creates a listening socket. IPv6 sockets get `IPV6_V6ONLY` off so that a
/// listener on `[::]` also accepts IPv4 (IPv4-mapped) connections whatever
/// `net.ipv6.bindv6only` says.
#[inline(never)]
fn listen_socket(addr: SocketAddr) -> Result<TcpListener, String> {
    let domain = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = check(
        unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) },
        "socket",
    )?;
    // SAFETY: `fd` is a fresh socket we own; the listener closes it on drop
    // (also on the error paths below, since it's created first).
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let zero: libc::c_int = 0;
    let setopt = |level, name, val: &libc::c_int, what| {
        // SAFETY: `val` points to a live c_int of the given size.
        check(
            unsafe {
                libc::setsockopt(
                    fd,
                    level,
                    name,
                    (val as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            },
            what,
        )
    };
    setopt(libc::SOL_SOCKET, libc::SO_REUSEADDR, &one, "SO_REUSEADDR")?;
    if addr.is_ipv6() {
        setopt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &zero, "IPV6_V6ONLY")?;
    }
    let (sa, len) = sockaddr_of(&addr);
    // SAFETY: `sa` is an initialised sockaddr of length `len`.
    check(
        unsafe { libc::bind(fd, (&sa as *const libc::sockaddr_storage).cast(), len) },
        "bind",
    )?;
    // SAFETY: plain listen(2) on our socket.
    check(unsafe { libc::listen(fd, 1024) }, "listen")?;
    Ok(listener)
}

/// Writes the reply to an accepted connection. Errors (the peer may already
/// be gone) are reported but not fatal.
#[inline(never)]
fn send_reply(stream: &mut TcpStream, reply: &[u8]) {
    if reply.is_empty() {
        return;
    }
    if let Err(e) = stream.write_all(reply) {
        eprintln!("tcp-fixture server: write to {:?}: {e}", stream.peer_addr());
    }
}

/// Closes an accepted connection (sends FIN: the peer goes to CLOSE_WAIT).
#[inline(never)]
fn close_connection(stream: TcpStream) {
    drop(stream);
}

fn run_server(opts: ServerOpts) -> Result<(), String> {
    let listener = listen_socket(opts.listen)?;
    let port = listener.local_addr().map_err(|e| format!("getsockname: {e}"))?.port();
    {
        let mut out = io::stdout().lock();
        writeln!(out, "READY {port}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("stdout: {e}"))?;
    }
    let reply = vec![b'x'; opts.reply];
    let mut kept = Vec::new();
    loop {
        match listener.accept() {
            Ok((mut stream, _peer)) => {
                send_reply(&mut stream, &reply);
                if opts.never_close {
                    kept.push(stream);
                } else {
                    close_connection(stream);
                }
            }
            Err(e) => {
                eprintln!("tcp-fixture server: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

/// Connects one socket: socket(2), then [`connect_socket`]. A
/// `[::ffff:a.b.c.d]` address makes an AF_INET6 socket talking IPv4
/// (IPv4-mapped).
///
/// Never inlined, and it keeps its own frame around the call: this is the
/// function a frame-pointer stack walk from inside connect(2) (the socket's
/// CLOSE -> SYN_SENT) must show. See the module docs.
#[inline(never)]
fn open_connection(addr: SocketAddr) -> io::Result<OwnedFd> {
    let domain = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    connect_socket(black_box(owned.as_raw_fd()), black_box(&addr))?;
    Ok(black_box(owned))
}

/// connect(2) through glibc's wrapper, called from [`open_connection`].
/// Checking the result after the call keeps it from being a tail call.
#[inline(never)]
fn connect_socket(fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
    let (sa, len) = sockaddr_of(addr);
    // SAFETY: `sa` is an initialised sockaddr of length `len`; `fd` is an
    // open socket.
    let ret = unsafe { libc::connect(fd, (&sa as *const libc::sockaddr_storage).cast(), len) };
    if black_box(ret) < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads (and discards) until the peer's FIN, i.e. until read returns 0.
#[inline(never)]
fn read_until_eof(stream: &mut TcpStream) -> io::Result<u64> {
    let mut buf = [0u8; 4096];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Closes a client socket (the well-behaved path) with [`close_fd`]: like
/// [`open_connection`], the name a stack walk from inside close(2) shows.
#[inline(never)]
fn close_client_socket(stream: TcpStream) -> io::Result<()> {
    let fd = stream.into_raw_fd();
    let result = close_fd(black_box(fd));
    black_box(result)
}

/// close(2) through glibc's wrapper, called from [`close_client_socket`].
#[inline(never)]
fn close_fd(fd: RawFd) -> io::Result<()> {
    // SAFETY: the caller gave up ownership of `fd`; it is closed once.
    let ret = unsafe { libc::close(fd) };
    if black_box(ret) < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Keeps a client socket open forever (the leak).
#[inline(never)]
fn leak_socket(kept: &mut Vec<TcpStream>, stream: TcpStream) {
    kept.push(stream);
}

/// The `--fork-holder` child: holds the inherited sockets until it is
/// killed, or its parent (the client) dies. Runs in the child of a fork of a
/// multi-threaded process, so it only makes raw async-signal-safe calls, and
/// it never returns into the client's code.
fn hold_forever(parent: libc::pid_t) -> ! {
    // SAFETY: prctl, getppid, open, dup2, close, pause and _exit are
    // async-signal-safe syscall wrappers taking plain values; the path is
    // NUL-terminated.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 || libc::getppid() != parent {
            // Cannot follow the parent, or it is already gone.
            libc::_exit(1);
        }
        // Let go of the client's stdio pipes, so that their readers see EOF
        // when the client exits, while this process lives on until killed.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        for std_fd in 0..3 {
            if null >= 0 {
                libc::dup2(null, std_fd);
            } else {
                libc::close(std_fd);
            }
        }
        if null > 2 {
            libc::close(null);
        }
        loop {
            libc::pause();
        }
    }
}

/// Forks the `--fork-holder` child and returns its pid (in the client).
fn fork_holder() -> Result<libc::pid_t, String> {
    // SAFETY: plain getpid(2).
    let parent = unsafe { libc::getpid() };
    // Nothing buffered must be written twice.
    io::stdout().flush().map_err(|e| format!("stdout: {e}"))?;
    // SAFETY: fork(2); the child only runs `hold_forever`, which makes
    // async-signal-safe calls only.
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", io::Error::last_os_error())),
        0 => hold_forever(parent),
        child => Ok(child),
    }
}

struct SockInfo {
    local: SocketAddr,
    remote: SocketAddr,
    fd: i32,
}

fn run_client(opts: ClientOpts) -> Result<(), String> {
    // One thread owns stdin: it reports the optional start line, then EOF.
    let (tx, rx) = mpsc::channel::<StdinEvent>();
    std::thread::spawn(move || {
        let stdin = io::stdin();
        let mut lock = stdin.lock();
        let mut line = String::new();
        loop {
            line.clear();
            match lock.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(StdinEvent::Eof);
                    return;
                }
                Ok(_) => {
                    if tx.send(StdinEvent::Line).is_err() {
                        return;
                    }
                }
            }
        }
    });

    if opts.wait_stdin_line {
        match rx.recv() {
            Ok(StdinEvent::Line) => {}
            Ok(StdinEvent::Eof) | Err(_) => {
                eprintln!("tcp-fixture client: stdin closed before the start line; exiting");
                return Ok(());
            }
        }
    }

    let mut kept = Vec::new();
    let mut infos = Vec::with_capacity(opts.count);
    for i in 0..opts.count {
        let fd = open_connection(opts.connect).map_err(|e| format!("connect #{i} to {}: {e}", opts.connect))?;
        let mut stream = TcpStream::from(fd);
        let info = SockInfo {
            local: stream.local_addr().map_err(|e| format!("getsockname: {e}"))?,
            remote: stream.peer_addr().map_err(|e| format!("getpeername: {e}"))?,
            fd: stream.as_raw_fd(),
        };
        let close = |stream, i| close_client_socket(stream).map_err(|e| format!("close #{i}: {e}"));
        match opts.mode {
            Mode::Leak => {
                if opts.read {
                    read_until_eof(&mut stream).map_err(|e| format!("read #{i} from {}: {e}", info.remote))?;
                }
                leak_socket(&mut kept, stream);
            }
            Mode::Close => {
                read_until_eof(&mut stream).map_err(|e| format!("read #{i} from {}: {e}", info.remote))?;
                close(stream, i)?;
            }
            Mode::CloseNow => close(stream, i)?,
        }
        infos.push(info);
    }

    let holder = if opts.fork_holder { Some(fork_holder()?) } else { None };
    if opts.close_after_fork {
        for (i, stream) in kept.drain(..).enumerate() {
            close_client_socket(stream).map_err(|e| format!("close #{i} after fork: {e}"))?;
        }
    }

    {
        let mut out = io::stdout().lock();
        let mut text = String::new();
        if let Some(pid) = holder {
            text.push_str(&format!("HOLDER {pid}\n"));
        }
        text.push_str(&format!("DONE {}\n", std::process::id()));
        for s in &infos {
            text.push_str(&format!("SOCK {} {} {}\n", s.local, s.remote, s.fd));
        }
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| format!("stdout: {e}"))?;
    }

    // Hold until stdin EOF or the timeout, whichever comes first.
    let deadline = std::time::Instant::now() + opts.hold;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        match rx.recv_timeout(left) {
            Ok(StdinEvent::Line) => continue,
            Ok(StdinEvent::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => break,
        }
    }
    drop(kept);
    Ok(())
}

enum StdinEvent {
    Line,
    Eof,
}
