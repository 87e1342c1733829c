//! The bounded socket table.
//!
//! Two kinds of entry. A full [`Socket`] for every socket that has had an
//! event (or was in CLOSE_WAIT at start-up). A compact [`Quiet`] one for a
//! socket the start-up snapshot found in any other state: until its first
//! event, all that matters about it is who holds it. A busy host has
//! hundreds of thousands of those, and a full record each would make the
//! start-up snapshot the agent's largest use of memory.

use std::collections::{hash_map::Entry, HashMap};

use foldhash::fast::RandomState;
use tracer_common::Header;

use super::{Comm, CorrelatorStats, Socket};

/// Socket cookies are kernel-assigned, not chosen by whoever sends us data,
/// so a fast non-cryptographic hash is safe here; this table is touched by
/// every event.
type Map<V> = HashMap<u64, V, RandomState>;

/// A socket known only from the start-up snapshot, in a state other than
/// CLOSE_WAIT.
#[derive(Clone, Copy)]
struct Quiet {
    /// The snapshot's time: events older than this only add ownership.
    ns: u64,
    holder: Option<(u32, Comm, i32)>,
    state: u8,
}

impl Quiet {
    fn promote(self, cookie: u64) -> Socket {
        let mut sock = Socket::new(cookie, 0);
        sock.apply_snapshot(self.state, self.ns, self.holder);
        sock
    }
}

pub(super) struct Table {
    max_sockets: usize,
    pub(super) sockets: Map<Socket>,
    quiet: Map<Quiet>,
    /// `skaddr` -> cookie for live sockets, for fd events whose cookie the
    /// kernel had not generated yet.
    by_skaddr: Map<u64>,
}

impl Table {
    pub(super) fn new(max_sockets: usize) -> Self {
        Table {
            max_sockets,
            sockets: Map::default(),
            quiet: Map::default(),
            by_skaddr: Map::default(),
        }
    }

    /// Pids holding sockets known only from the snapshot.
    pub(super) fn quiet_holders(&self) -> impl Iterator<Item = u32> + '_ {
        self.quiet.values().filter_map(|q| q.holder.map(|h| h.0))
    }

    /// Sockets tracked, of both kinds.
    pub(super) fn len(&self) -> usize {
        self.sockets.len() + self.quiet.len()
    }

    /// Room for `n` more snapshot sockets, allocated once instead of by
    /// doubling (a doubling holds the old and the new table at once).
    pub(super) fn reserve_quiet(&mut self, n: usize) {
        self.quiet.reserve(n.min(self.max_sockets.saturating_sub(self.len())));
    }

    /// Whether the socket has a full record.
    pub(super) fn has_full_record(&self, cookie: u64) -> bool {
        self.sockets.contains_key(&cookie)
    }

    /// Records a snapshot socket that is not in CLOSE_WAIT and has no full
    /// record.
    pub(super) fn insert_quiet(
        &mut self,
        cookie: u64,
        state: u8,
        holder: Option<(u32, Comm, i32)>,
        ns: u64,
        stats: &mut CorrelatorStats,
    ) {
        let tracked = self.len();
        match self.quiet.entry(cookie) {
            Entry::Occupied(mut o) => {
                o.insert(Quiet { ns, holder, state });
            }
            Entry::Vacant(v) => {
                if admit(tracked, self.max_sockets, stats) {
                    v.insert(Quiet { ns, holder, state });
                }
            }
        }
    }

    /// The socket's full record, created on first sight (or promoted from a
    /// quiet one); None when the table is full (counted in `stats`).
    pub(super) fn entry(&mut self, cookie: u64, skaddr: u64, stats: &mut CorrelatorStats) -> Option<&mut Socket> {
        let tracked = self.len();
        let sock = match self.sockets.entry(cookie) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                let sock = match self.quiet.remove(&cookie) {
                    Some(q) => q.promote(cookie),
                    None if admit(tracked, self.max_sockets, stats) => Socket::new(cookie, 0),
                    None => return None,
                };
                v.insert(sock)
            }
        };
        if skaddr != 0 && sock.skaddr != skaddr {
            sock.skaddr = skaddr;
            self.by_skaddr.insert(skaddr, cookie);
        }
        Some(sock)
    }

    /// Finds the socket an fd event names, creating it if we have never seen
    /// it (it predates us and the snapshot missed it).
    pub(super) fn fd_socket(&mut self, h: &Header, stats: &mut CorrelatorStats) -> Option<&mut Socket> {
        let cookie = if h.cookie != 0 {
            h.cookie
        } else {
            *self.by_skaddr.get(&h.skaddr)?
        };
        self.entry(cookie, h.skaddr, stats)
    }

    pub(super) fn remove(&mut self, cookie: u64) {
        self.quiet.remove(&cookie);
        if let Some(sock) = self.sockets.remove(&cookie) {
            if self.by_skaddr.get(&sock.skaddr) == Some(&cookie) {
                self.by_skaddr.remove(&sock.skaddr);
            }
        }
    }
}

/// A socket seen for the first time: tracked if there is room, and counted
/// either way (seen, or untracked because the table is full).
fn admit(tracked: usize, max_sockets: usize, stats: &mut CorrelatorStats) -> bool {
    if tracked >= max_sockets {
        stats.untracked_table_full += 1;
        return false;
    }
    stats.sockets_seen += 1;
    true
}
