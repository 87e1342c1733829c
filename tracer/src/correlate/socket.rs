//! What the correlator knows about one socket, and what it concludes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tracer_common::{event::AF_INET6, StateEvent, COMM_LEN};

/// A process name as the kernel stores it: fixed size, no allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm(pub [u8; COMM_LEN]);

/// Recorded as the text it stands for.
impl serde::Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Comm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Comm::from_str(&s))
    }
}

impl Comm {
    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        String::from_utf8_lossy(&self.0[..end])
    }

    pub fn from_str(s: &str) -> Self {
        let mut c = [0u8; COMM_LEN];
        let n = s.len().min(COMM_LEN - 1);
        c[..n].copy_from_slice(&s.as_bytes()[..n]);
        Comm(c)
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// How the owner was learned. Only process-context evidence counts: a state
/// change's current task is never taken as the owner, except for connect
/// (CLOSE -> SYN_SENT runs inside the owner's connect()).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerSource {
    Connect,
    Accept,
    /// First seen when a process closed one of its fds to it.
    Close,
    /// Held it (in /proc/PID/fd) when the tracer started.
    Snapshot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: Comm,
    pub source: OwnerSource,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Endpoints {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl Endpoints {
    pub fn from_event(ev: &StateEvent) -> Self {
        let ip = |raw: &[u8; 16]| -> IpAddr {
            if ev.family == AF_INET6 {
                IpAddr::V6(Ipv6Addr::from(*raw))
            } else {
                IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
            }
        };
        Endpoints {
            local: SocketAddr::new(ip(&ev.saddr), ev.sport),
            remote: SocketAddr::new(ip(&ev.daddr), ev.dport),
        }
    }
}

/// When the socket entered CLOSE_WAIT. `estimated` when it was already
/// there at start-up: then the time comes from the kernel's
/// last-ACK-received age, which the FIN's arrival is at least as old as
/// unless the peer sent more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Since {
    pub ns: u64,
    pub estimated: bool,
}

/// Where a task was when it touched the socket: ids into the kernel's
/// stack map (negative: not captured, see `tracer_common::NO_STACK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StackRef {
    pub pid: u32,
    pub ustack: i32,
    pub kstack: i32,
}

impl StackRef {
    pub fn of(h: &tracer_common::Header) -> Self {
        StackRef {
            pid: h.tgid,
            ustack: h.ustack,
            kstack: h.kstack,
        }
    }
}

/// A `close()`/`close_range()` of one of the socket's fds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseCall {
    pub pid: u32,
    pub tid: u32,
    pub fd: i32,
    pub ns: u64,
    pub stack: StackRef,
}

#[derive(Clone, Debug)]
pub struct Socket {
    pub cookie: u64,
    pub skaddr: u64,
    pub endpoints: Option<Endpoints>,
    pub state: u8,
    /// Time of the newest state information (event or snapshot).
    pub state_ns: u64,
    pub owner: Option<Owner>,
    pub fd: Option<i32>,
    pub close_wait: Option<Since>,
    pub last_close: Option<CloseCall>,
    /// Where the owner opened it (connect or accept).
    pub open_stack: Option<StackRef>,
    /// Bytes received and never read when the FIN arrived.
    pub unread_at_fin: Option<u32>,
    pub leak_reported: bool,
}

impl Socket {
    pub fn new(cookie: u64, skaddr: u64) -> Self {
        Socket {
            cookie,
            skaddr,
            endpoints: None,
            state: 0,
            state_ns: 0,
            owner: None,
            fd: None,
            close_wait: None,
            last_close: None,
            open_stack: None,
            unread_at_fin: None,
            leak_reported: false,
        }
    }

    /// What the start-up snapshot knew at `ns`: the state then, and the
    /// process holding the socket, as its owner unless a better one is
    /// known already.
    pub fn apply_snapshot(&mut self, state: u8, ns: u64, holder: Option<(u32, Comm, i32)>) {
        self.state = state;
        self.state_ns = ns;
        if let Some((pid, comm, fd)) = holder {
            self.owner.get_or_insert(Owner {
                pid,
                comm,
                source: OwnerSource::Snapshot,
            });
            self.fd = Some(fd);
        }
    }
}

/// Everything a sink needs to show one leaked socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeakReport {
    pub cookie: u64,
    pub owner: Option<Owner>,
    pub fd: Option<i32>,
    pub endpoints: Option<Endpoints>,
    pub since: Since,
    /// How long it has been in CLOSE_WAIT at the time of the report.
    pub close_wait_ns: u64,
    /// The owner (or another process) closed an fd to it, yet the socket is
    /// still in CLOSE_WAIT: someone else still holds it.
    pub last_close: Option<CloseCall>,
    pub open_stack: Option<StackRef>,
    pub unread_at_fin: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// In CLOSE_WAIT for longer than the threshold, not closed.
    Leak(LeakReport),
    /// A socket already reported as leaked finally left CLOSE_WAIT.
    LateClose {
        leak: LeakReport,
        closed_after_ns: u64,
        /// Went straight to CLOSE (RST sent on close with unread data, or
        /// received) instead of through LAST_ACK.
        aborted: bool,
    },
}
