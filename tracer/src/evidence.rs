//! Evidence gathered when a leak is reported, from the kernel's own view:
//! how many bytes sit unread (sock_diag's receive queue) and which
//! processes hold the socket now (/proc/PID/fd), after fork or dup.
//!
//! One sock_diag dump and one /proc scan per batch of new leaks, never per
//! event.

use std::collections::{HashMap, HashSet};

use netlink_packet_sock_diag::inet::StateFlags;
use serde::{Deserialize, Serialize};

use crate::{procs, snapshot};

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
}

/// Evidence for each of `cookies` (CLOSE_WAIT sockets).
pub fn gather(cookies: &HashSet<u64>) -> HashMap<u64, Evidence> {
    let mut out = HashMap::new();
    if cookies.is_empty() {
        return out;
    }
    let sockets = match snapshot::dump_tcp(StateFlags::CLOSE_WAIT) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("cannot read sockets for leak evidence: {e:#}");
            return out;
        }
    };
    let wanted: Vec<_> = sockets.into_iter().filter(|s| cookies.contains(&s.cookie)).collect();
    if wanted.is_empty() {
        return out;
    }
    let holders = procs::socket_holders(None);
    for s in wanted {
        let hs = holders
            .get(&s.inode)
            .map(|v| {
                v.iter()
                    .map(|h| HolderOut {
                        pid: h.pid,
                        comm: procs::info(h.pid).map(|i| i.comm).unwrap_or_default(),
                        fd: h.fd,
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.insert(
            s.cookie,
            Evidence {
                // In CLOSE_WAIT the FIN occupies one sequence number.
                unread_now: Some(s.recv_queue.saturating_sub(1)),
                holders: hs,
                found: true,
            },
        );
    }
    out
}
