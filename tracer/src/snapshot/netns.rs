//! Network namespaces: every one on the host, and a way to make a socket
//! inside each.
//!
//! sock_diag answers only for the namespace of the socket it is asked on,
//! and a socket stays in the namespace it was created in. So a short-lived
//! thread enters the namespace (`setns` affects only the calling thread),
//! makes the socket and hands it back; the caller uses it from wherever it
//! runs. Socket inodes and cookies are host-wide, so nothing else about a
//! socket depends on its namespace.
//!
//! The namespaces are those of every process (`/proc/PID/ns/net`) and
//! those bind-mounted in `/run/netns` (`ip netns add`), deduplicated by the
//! namespace file's (dev, inode); the tracer's own comes first. Each is
//! opened as it is found: the open file keeps it alive, so one whose last
//! process exits meanwhile is still read, never half-entered. Not found: a
//! namespace that only a thread (not its process's main thread) is in, or
//! that only an fd holds, without a bind mount.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::sync::OnceLock;

/// One network namespace.
#[derive(Debug)]
pub struct Namespace {
    /// The namespace file's inode: `net:[INODE]` in `ls -l /proc/PID/ns/net`.
    pub inode: u64,
    /// An open namespace file; None for the tracer's own.
    file: Option<File>,
}

/// The network namespaces found, the tracer's own first.
#[derive(Debug, Default)]
pub struct Namespaces {
    pub list: Vec<Namespace>,
    /// Processes whose `/proc/PID/ns/net` the kernel refused (another
    /// user's, without CAP_SYS_PTRACE): their namespace, if not one of
    /// `list`, is missing. Kernel threads are not counted.
    pub unreadable: usize,
}

/// Why a namespace could not be used.
#[derive(Debug)]
pub enum EnterError {
    /// `setns` refused (EPERM: no CAP_SYS_ADMIN).
    Refused,
    /// Anything else: entering it, or what was to be done inside.
    Failed(io::Error),
}

impl Namespace {
    /// Whether this is the tracer's own namespace.
    pub fn is_own(&self) -> bool {
        self.file.is_none()
    }

    /// Runs `make` inside this namespace and returns what it made: right
    /// here for the tracer's own, else on a thread of its own that enters
    /// the namespace and ends with `make` (so no other code ever runs in a
    /// namespace it did not expect).
    pub fn enter<T: Send>(&self, make: impl FnOnce() -> io::Result<T> + Send) -> Result<T, EnterError> {
        let Some(file) = &self.file else {
            return make().map_err(EnterError::Failed);
        };
        let fd = file.as_raw_fd();
        std::thread::scope(|s| {
            let worker = std::thread::Builder::new()
                .name("tracer-netns".into())
                .spawn_scoped(s, move || {
                    // SAFETY: plain syscall on an fd `file` keeps open
                    // until the scope ends; it changes this thread only.
                    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                        let e = io::Error::last_os_error();
                        return Err(match e.raw_os_error() {
                            Some(libc::EPERM) => EnterError::Refused,
                            _ => EnterError::Failed(e),
                        });
                    }
                    make().map_err(EnterError::Failed)
                })
                .map_err(EnterError::Failed)?;
            worker
                .join()
                .unwrap_or_else(|_| Err(EnterError::Failed(io::Error::other("the namespace thread panicked"))))
        })
    }
}

/// The namespace file's identity.
type Key = (u64, u64);

fn key(path: &str) -> io::Result<Key> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// The tracer's own network namespace's inode, None if it cannot be read.
pub fn own() -> Option<u64> {
    own_key().map(|k| k.1)
}

/// Read once: the tracer never changes its own namespace (only its
/// short-lived [`Namespace::enter`] threads do).
fn own_key() -> Option<Key> {
    static OWN: OnceLock<Option<Key>> = OnceLock::new();
    *OWN.get_or_init(|| key("/proc/self/ns/net").ok())
}

/// Every network namespace on the host, the tracer's own first. Costs a
/// `stat` per process and an `open` per namespace.
pub fn enumerate() -> Namespaces {
    let own = own_key();
    let mut out = Namespaces::default();
    out.list.push(Namespace {
        inode: own.map_or(0, |k| k.1),
        file: None,
    });
    let mut seen: HashSet<Key> = own.into_iter().collect();
    let mut consider = |path: &str, pid: Option<u32>| match key(path) {
        Ok(k) if seen.contains(&k) => {}
        // Every namespace file is on the one nsfs: anything else (an
        // unmounted file left in /run/netns) is not a namespace.
        Ok(k) if own.is_some_and(|o| o.0 != k.0) => {}
        Ok(k) => match File::open(path) {
            Ok(file) => {
                seen.insert(k);
                out.list.push(Namespace {
                    inode: k.1,
                    file: Some(file),
                });
            }
            Err(e) => out.unreadable += usize::from(refused(&e, pid)),
        },
        // Gone (a process that exited): nothing of it to read.
        Err(e) => out.unreadable += usize::from(refused(&e, pid)),
    };
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            consider(&format!("/proc/{pid}/ns/net"), Some(pid));
        }
    }
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for entry in dir.flatten() {
            if let Some(path) = entry.path().to_str() {
                consider(path, None);
            }
        }
    }
    out
}

/// Whether the kernel refused a process's namespace file to us (as opposed
/// to a process that exited); kernel threads, all in the first namespace,
/// do not count.
fn refused(e: &io::Error, pid: Option<u32>) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied && !pid.is_some_and(crate::procs::is_kernel_thread_pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_comes_first_and_each_once() {
        let ns = enumerate();
        assert!(ns.list[0].is_own());
        assert_eq!(Some(ns.list[0].inode), own());
        let inodes: HashSet<u64> = ns.list.iter().map(|n| n.inode).collect();
        assert_eq!(inodes.len(), ns.list.len(), "{ns:?}");
        assert!(ns.list[1..].iter().all(|n| !n.is_own()));
        // /proc/self/ns/net is `net:[INODE]`.
        let link = std::fs::read_link("/proc/self/ns/net").expect("our own namespace link");
        assert_eq!(link.to_str(), Some(format!("net:[{}]", ns.list[0].inode).as_str()));
    }

    /// Root, or (outside CI) a skip notice: entering a namespace needs
    /// CAP_SYS_ADMIN. Under CI a missing privilege fails.
    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none_or(|v| v.is_empty()),
            "needs root (setns, unshare), and CI is set: refusing to skip"
        );
        eprintln!("skipping: needs root (setns, unshare)");
        false
    }

    /// Brings `lo` up in the calling thread's network namespace.
    fn lo_up() {
        // SAFETY: plain ioctls on a socket of ours, with a zeroed ifreq
        // naming "lo".
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (i, b) in b"lo".iter().enumerate() {
                ifr.ifr_name[i] = *b as libc::c_char;
            }
            assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr), 0, "SIOCGIFFLAGS");
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut ifr), 0, "SIOCSIFFLAGS");
            libc::close(fd);
        }
    }

    /// A socket in CLOSE_WAIT in a namespace of its own (a thread's, made
    /// with unshare) is read there, with 5 bytes unread and that
    /// namespace's inode; the tracer's own namespace does not list it.
    #[test]
    fn sockets_are_read_inside_another_namespace() {
        use std::io::Write as _;
        use std::net::{Shutdown, TcpListener, TcpStream};

        use netlink_packet_sock_diag::inet::StateFlags;

        if !root() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            // SAFETY: changes this thread's namespace only.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            lo_up();
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
            let (mut server, _) = listener.accept().expect("accept");
            server.write_all(b"hello").expect("write");
            server.shutdown(Shutdown::Write).expect("FIN");
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let inode = key("/proc/thread-self/ns/net").expect("our namespace").1;
            tx.send((tid, inode, crate::snapshot::so_cookie(&client)))
                .expect("send");
            let _ = wait.recv();
            drop((client, server));
        });
        let (tid, inode, c) = rx.recv().expect("the thread made its socket");
        assert_ne!(Some(inode), own());
        let path = format!("/proc/self/task/{tid}/ns/net");
        let ns = Namespaces {
            list: vec![
                Namespace {
                    inode: own().expect("own"),
                    file: None,
                },
                Namespace {
                    inode,
                    file: Some(File::open(&path).expect("the thread's namespace")),
                },
            ],
            unreadable: 0,
        };
        let mut found = None;
        for _ in 0..100 {
            super::super::for_each_tcp_in(&ns, StateFlags::CLOSE_WAIT, |s| {
                if s.cookie == c {
                    found = Some(s);
                }
            })
            .expect("dump");
            if found.is_some() {
                break;
            }
            // The FIN may not have been processed yet.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let s = found.expect("found in its namespace");
        assert_eq!((s.netns, s.recv_queue), (inode, 6), "{s:?}");
        let own_only = Namespaces {
            list: ns.list.into_iter().take(1).collect(),
            unreadable: 0,
        };
        let mut in_own = false;
        super::super::for_each_tcp_in(&own_only, StateFlags::all(), |s| in_own |= s.cookie == c).expect("dump");
        assert!(!in_own, "sock_diag of our own namespace lists another's socket");
        drop(done);
        holder.join().expect("holder thread");
    }

    #[test]
    fn the_own_namespace_runs_inline() {
        let ns = enumerate();
        let here = std::thread::current().id();
        let there = ns.list[0]
            .enter(|| Ok(std::thread::current().id()))
            .expect("own namespace");
        assert_eq!(here, there);
    }
}
