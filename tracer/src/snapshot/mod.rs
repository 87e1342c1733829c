//! The TCP sockets that exist right now, from the kernel's sock_diag
//! netlink interface in every network namespace ([`netns`]), joined
//! with /proc to find who holds them. A leak that predates the tracer is
//! the common case, so this runs at start-up.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, bail, Context as _, Result};
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NlAddr};

pub mod netns;

use self::netns::{EnterError, Namespaces};
use crate::{
    correlate::{Endpoints, SnapshotSocket},
    privileges::{self, Denied},
    procs,
};

/// One socket as sock_diag reports it.
#[derive(Clone, Debug)]
pub struct DiagSocket {
    pub cookie: u64,
    pub state: u8,
    pub endpoints: Endpoints,
    pub inode: u64,
    /// Receive queue: unread bytes, plus one once a FIN has arrived.
    pub recv_queue: u32,
    pub last_ack_age_ms: Option<u32>,
    /// The network namespace it is in (its inode, as in `net:[INODE]`).
    pub netns: u64,
}

/// Every IPv4 and IPv6 TCP socket in one of `states`, in every network
/// namespace.
pub fn dump_tcp(states: StateFlags) -> Result<Vec<DiagSocket>> {
    let mut out = Vec::new();
    for_each_tcp(states, |s| out.push(s))?;
    Ok(out)
}

/// Each IPv4 and IPv6 TCP socket in one of `states`, in every network
/// namespace, as the dumps arrive: nothing is collected that the caller
/// does not keep.
pub fn for_each_tcp(states: StateFlags, each: impl FnMut(DiagSocket)) -> Result<()> {
    for_each_tcp_in(&netns::enumerate(), states, each).map(drop)
}

/// [`for_each_tcp`] in `namespaces`; returns how many of them could not be
/// entered. An error reading the tracer's own namespace is returned;
/// another namespace that cannot be read is skipped (refused ones are
/// warned about, once per run, by [`privileges::denied`]).
pub fn for_each_tcp_in(namespaces: &Namespaces, states: StateFlags, mut each: impl FnMut(DiagSocket)) -> Result<usize> {
    let mut refused = 0;
    for ns in &namespaces.list {
        let socket = match ns.enter(open_diag_socket) {
            Ok(s) => s,
            Err(EnterError::Refused) => {
                refused += 1;
                continue;
            }
            Err(EnterError::Failed(e)) if ns.is_own() => {
                return Err(e).context("opening a sock_diag netlink socket");
            }
            Err(EnterError::Failed(e)) => {
                log::debug!("skipping network namespace {}: {e}", ns.inode);
                continue;
            }
        };
        for family in [AF_INET, AF_INET6] {
            match dump_family(&socket, family, states, ns.inode, &mut each) {
                Ok(()) => {}
                Err(e) if ns.is_own() => return Err(e),
                Err(e) => {
                    // Said once: gatherings run every second.
                    static WARNED: AtomicBool = AtomicBool::new(false);
                    if WARNED.swap(true, Ordering::Relaxed) {
                        log::debug!("cannot read the sockets of network namespace {}: {e:#}", ns.inode);
                    } else {
                        log::warn!("cannot read the sockets of network namespace {}: {e:#}", ns.inode);
                    }
                    break;
                }
            }
        }
    }
    privileges::denied(Denied::Setns, refused);
    Ok(refused)
}

/// A sock_diag socket in the calling thread's network namespace.
fn open_diag_socket() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    Ok(socket)
}

fn dump_family(
    socket: &Socket,
    family: u8,
    states: StateFlags,
    netns: u64,
    each: &mut impl FnMut(DiagSocket),
) -> Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            states,
            socket_id,
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0).context("sending the sock_diag request")?;

    let mut rx = Vec::with_capacity(64 * 1024);
    loop {
        rx.clear();
        let n = socket.recv(&mut rx, 0).context("reading sock_diag")?;
        if n == 0 {
            bail!("sock_diag closed the dump early");
        }
        let mut offset = 0;
        while offset < n {
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[offset..n])
                .map_err(|e| anyhow!("bad sock_diag message: {e}"))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => each(convert(&r, netns)),
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => bail!("sock_diag error: {e}"),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

fn convert(r: &InetResponse, netns: u64) -> DiagSocket {
    let h = &r.header;
    let id = &h.socket_id;
    // The kernel stores the cookie as two host-order u32 halves.
    let lo = u32::from_ne_bytes(id.cookie[..4].try_into().expect("4 bytes"));
    let hi = u32::from_ne_bytes(id.cookie[4..].try_into().expect("4 bytes"));
    let last_ack_age_ms = r.nlas.iter().find_map(|n| match n {
        Nla::TcpInfo(i) => Some(i.last_ack_recv),
        _ => None,
    });
    DiagSocket {
        cookie: u64::from(lo) | (u64::from(hi) << 32),
        state: h.state,
        endpoints: Endpoints {
            local: SocketAddr::new(id.source_address, id.source_port),
            remote: SocketAddr::new(id.destination_address, id.destination_port),
        },
        inode: u64::from(h.inode),
        recv_queue: h.recv_queue,
        last_ack_age_ms,
        netns,
    }
}

/// Existing sockets with their holders; with `only_pid`, just that
/// process's sockets.
pub fn take(only_pid: Option<u32>) -> Result<Vec<SnapshotSocket>> {
    // Converted as the dump arrives, keeping only the inodes aside: on a
    // host with 100k+ sockets a second full list would set the agent's peak
    // memory. The dump comes first, right after the hooks are attached,
    // which keeps the window for sockets that change unseen short.
    let mut out = Vec::new();
    let mut inodes = Vec::new();
    // TIME_WAIT entries are kernel-owned remnants, never a process's socket.
    for_each_tcp(StateFlags::all() - StateFlags::TIME_WAIT, |s| {
        inodes.push(s.inode);
        out.push(SnapshotSocket {
            cookie: s.cookie,
            state: s.state,
            endpoints: s.endpoints,
            holder: None,
            last_ack_age_ns: s.last_ack_age_ms.map(|ms| u64::from(ms) * 1_000_000),
        });
    })?;
    let holders = procs::socket_holders(only_pid);
    let mut comms = std::collections::HashMap::new();
    for (sock, inode) in out.iter_mut().zip(&inodes) {
        sock.holder = holders.get(inode).and_then(|h| h.first()).map(|h| {
            (
                h.pid,
                *comms.entry(h.pid).or_insert_with(|| procs::comm_of(h.pid)),
                h.fd,
            )
        });
    }
    if only_pid.is_some() {
        out.retain(|s| s.holder.is_some());
    }
    Ok(out)
}

/// A socket's cookie as the kernel gives it to its holder (`SO_COOKIE`):
/// what sock_diag and the eBPF side call it. For tests of both.
#[cfg(test)]
pub fn so_cookie(s: &std::net::TcpStream) -> u64 {
    use std::os::fd::AsRawFd as _;
    let mut c: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `c`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut c as *mut u64).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    c
}
