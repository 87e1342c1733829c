//! `loadgen server`: one SO_REUSEPORT listener per destination address and
//! thread, each thread an epoll loop that accepts, reads what the client
//! sent, and closes.

use std::ffi::c_int;
use std::io;
use std::mem;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::thread;

use crate::opts::Opts;
use crate::sys::{cvt, dest_addr, errno, raise_nofile};
use crate::{Context, Error, Result};

/// Listen backlog; the kernel caps it at net.core.somaxconn.
const BACKLOG: c_int = 4096;
/// epoll data tag for listening sockets (connections carry their bare fd).
const LISTENER: u64 = 1 << 32;

pub fn server(o: &Opts) -> Result<()> {
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
