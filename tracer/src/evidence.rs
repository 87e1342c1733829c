//! Evidence gathered when a leak is reported, from the kernel's own view:
//! how many bytes sit unread (sock_diag's receive queue) and which
//! processes hold the socket now (/proc/PID/fd), after fork or dup.
//!
//! One sock_diag dump per network namespace and one /proc scan per batch
//! of new leaks, never per event; each holder's name is read once per
//! batch. Socket inodes are host-wide, so the /proc scan finds the holders
//! of a socket of any namespace. Runs on a worker thread: nothing here is
//! tied to the caller's. A leak found without holders while the kernel
//! refused some processes' fds (a tracer without CAP_SYS_PTRACE) is warned
//! about, once per run, naming the capability; so is a namespace that
//! could not be entered.

use std::collections::{HashMap, HashSet};

use netlink_packet_sock_diag::inet::StateFlags;
use serde::{Deserialize, Serialize};

use tracer_common::is_address_id;

use crate::correlate::Endpoints;
use crate::privileges::{self, Denied};
use crate::procs;
use crate::snapshot::{self, netns, DiagSocket};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderOut {
    pub pid: u32,
    pub comm: String,
    pub fd: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// Bytes received and never read, FIN excluded, now.
    pub unread_now: Option<u32>,
    pub holders: Vec<HolderOut>,
    /// False when sock_diag no longer lists the socket in CLOSE_WAIT.
    pub found: bool,
    /// The network namespace the socket was found in (its inode, as in
    /// `net:[INODE]`). None in recordings made before it was read.
    #[serde(default)]
    pub netns: Option<u64>,
    /// The socket's cookie, where the tracer knows it by another id (its
    /// address, on kernels before 5.12: see [`Wanted`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<u64>,
}

/// The sockets whose evidence is wanted, by the id the tracer knows them
/// by. That is their cookie, except on kernels before 5.12, where a socket
/// the kernel side first saw before anything asked for its cookie is known
/// by its address (`tracer_common::is_address_id`), which sock_diag does
/// not show: those are found by their endpoints, and their evidence says
/// their cookie.
#[derive(Debug, Default)]
pub struct Wanted {
    ids: HashSet<u64>,
    by_endpoints: HashMap<Endpoints, u64>,
}

impl Wanted {
    pub fn add(&mut self, id: u64, endpoints: Option<Endpoints>) {
        self.ids.insert(id);
        if let (true, Some(e)) = (is_address_id(id), endpoints) {
            self.by_endpoints.insert(e, id);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The id `s` is wanted under, if it is.
    fn id_of(&self, s: &DiagSocket) -> Option<u64> {
        if self.ids.contains(&s.cookie) {
            return Some(s.cookie);
        }
        self.by_endpoints.get(&s.endpoints).copied()
    }
}

/// Evidence for each of the `wanted` sockets (in CLOSE_WAIT), by the id
/// they were wanted under.
pub fn gather(want: &Wanted) -> HashMap<u64, Evidence> {
    let mut out = HashMap::new();
    if want.is_empty() {
        return out;
    }
    // Every namespace's CLOSE_WAIT sockets, only the wanted ones kept.
    let namespaces = netns::enumerate();
    let mut wanted = Vec::new();
    let dumped = snapshot::for_each_tcp_in(&namespaces, StateFlags::CLOSE_WAIT, |s| {
        if let Some(id) = want.id_of(&s) {
            wanted.push((id, s));
        }
    });
    let refused = match dumped {
        Ok(n) => n,
        Err(e) => {
            log::warn!("cannot read sockets for leak evidence: {e:#}");
            return out;
        }
    };
    if wanted.len() < want.ids.len() && refused == 0 {
        // Sockets not found in any namespace entered, while some
        // processes' namespaces could not be told: those may be where
        // they are. (A namespace refused says so itself.)
        privileges::denied(Denied::NetnsLinks, namespaces.unreadable);
    }
    if wanted.is_empty() {
        return out;
    }
    let scan = procs::scan_holders(None);
    // A process holding many leaked sockets is named once.
    let mut comms: HashMap<u32, String> = HashMap::new();
    let mut unheld = 0;
    for (id, s) in wanted {
        let hs: Vec<HolderOut> = scan
            .by_inode
            .get(&s.inode)
            .map(|v| {
                v.iter()
                    .map(|h| HolderOut {
                        pid: h.pid,
                        comm: comms
                            .entry(h.pid)
                            .or_insert_with(|| procs::comm(h.pid).unwrap_or_default())
                            .clone(),
                        fd: h.fd,
                    })
                    .collect()
            })
            .unwrap_or_default();
        unheld += usize::from(hs.is_empty());
        out.insert(
            id,
            Evidence {
                // In CLOSE_WAIT the FIN occupies one sequence number.
                unread_now: Some(s.recv_queue.saturating_sub(1)),
                holders: hs,
                found: true,
                netns: Some(s.netns),
                cookie: (id != s.cookie).then_some(s.cookie),
            },
        );
    }
    if unheld > 0 {
        // Leaks without holders, while some processes' fds were refused:
        // those are likely who holds them.
        privileges::denied(Denied::Fds, scan.refused);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::fd::AsRawFd as _;

    use super::*;

    /// A socket of this process in CLOSE_WAIT, held twice (dup), with 5
    /// bytes unread: gathered on a worker thread, as live.rs does, with
    /// no privilege (sock_diag and one's own /proc/PID/fd need none).
    #[test]
    fn gathers_unread_bytes_and_holders_on_a_worker_thread() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        server.write_all(b"hello").expect("write");
        server.shutdown(Shutdown::Write).expect("FIN");
        let dup = client.try_clone().expect("dup");
        let c = crate::snapshot::so_cookie(&client);
        let me = std::process::id();
        let mut found = None;
        for _ in 0..100 {
            let mut want = Wanted::default();
            want.add(c, None);
            let mut ev = std::thread::spawn(move || gather(&want))
                .join()
                .expect("gather panicked");
            if let Some(e) = ev.remove(&c) {
                found = Some(e);
                break;
            }
            // The FIN may not have been processed yet.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let e = found.expect("the socket reaches CLOSE_WAIT and is found");
        assert!(e.found);
        assert_eq!(e.unread_now, Some(5));
        assert_eq!(e.netns, netns::own(), "found in our own namespace");
        let comm = procs::comm(me).expect("our own name");
        let mut holders = e.holders.clone();
        holders.sort_by_key(|h| h.fd);
        let mut fds = [client.as_raw_fd(), dup.as_raw_fd()];
        fds.sort();
        let want: Vec<HolderOut> = fds
            .iter()
            .map(|&fd| HolderOut {
                pid: me,
                comm: comm.clone(),
                fd,
            })
            .collect();
        assert_eq!(holders, want);
    }

    /// Evidence records written before the namespace was read still read.
    #[test]
    fn older_evidence_reads_without_a_namespace() {
        let e: Evidence =
            serde_json::from_str(r#"{"unread_now":26,"holders":[{"pid":7,"comm":"leaky","fd":3}],"found":true}"#)
                .expect("reads");
        assert_eq!(e.netns, None);
        assert_eq!(e.unread_now, Some(26));
    }

    /// A socket known by its address (kernels before 5.12) is found by its
    /// endpoints, and its evidence names its cookie.
    #[test]
    fn an_address_id_is_found_by_endpoints_with_its_cookie() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        server.shutdown(Shutdown::Write).expect("FIN");
        let endpoints = Endpoints {
            local: client.local_addr().expect("local"),
            remote: client.peer_addr().expect("peer"),
        };
        let id = 0xffff_8881_2345_6000;
        assert!(is_address_id(id));
        let mut found = None;
        for _ in 0..100 {
            let mut want = Wanted::default();
            want.add(id, Some(endpoints));
            if let Some(e) = gather(&want).remove(&id) {
                found = Some(e);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let e = found.expect("found by its endpoints once in CLOSE_WAIT");
        assert_eq!(e.cookie, Some(crate::snapshot::so_cookie(&client)));
        assert_eq!(e.unread_now, Some(0));
        // A cookie is wanted as itself: no other cookie to name.
        let mut want = Wanted::default();
        let c = crate::snapshot::so_cookie(&client);
        want.add(c, Some(endpoints));
        assert_eq!(gather(&want).remove(&c).map(|e| e.cookie), Some(None));
    }
}
