//! The one correlator. Live tracing and (later) recordings feed it the same
//! events; a clock-driven sweep turns "no close arrived" into a verdict,
//! because a leak is the absence of an event.

mod refs;
mod socket;
mod table;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

pub use socket::{CloseCall, Comm, Endpoints, LeakReport, Owner, OwnerSource, Since, Socket, StackRef, Verdict};
use tracer_common::{tcp, FdEvent, StateEvent, RX_QUEUE_UNKNOWN};

use crate::decode::Event;
use table::Table;

/// A socket found by the start-up snapshot (sock_diag + /proc).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SnapshotSocket {
    pub cookie: u64,
    pub state: u8,
    pub endpoints: Endpoints,
    /// First process found holding it, with its fd.
    pub holder: Option<(u32, Comm, i32)>,
    /// Kernel's age of the last ACK received, for CLOSE_WAIT sockets.
    pub last_ack_age_ns: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct CorrelatorStats {
    pub events: u64,
    pub sockets_tracked: usize,
    pub sockets_seen: u64,
    /// New sockets not tracked because the table was full.
    pub untracked_table_full: u64,
    pub leaks_reported: u64,
    pub late_closes: u64,
    pub resets: u64,
}

pub struct Correlator {
    leak_after_ns: u64,
    filter_pid: Option<u32>,
    table: Table,
    /// CLOSE_WAIT sockets not yet reported, ordered by entry time.
    pending: BTreeSet<(u64, u64)>,
    stats: CorrelatorStats,
}

impl Correlator {
    pub fn new(leak_after_ns: u64, filter_pid: Option<u32>, max_sockets: usize) -> Self {
        Correlator {
            leak_after_ns,
            filter_pid,
            table: Table::new(max_sockets),
            pending: BTreeSet::new(),
            stats: CorrelatorStats::default(),
        }
    }

    pub fn stats(&self) -> CorrelatorStats {
        CorrelatorStats {
            sockets_tracked: self.table.len(),
            ..self.stats
        }
    }

    pub fn socket(&self, cookie: u64) -> Option<&Socket> {
        self.table.sockets.get(&cookie)
    }

    pub fn on_event(&mut self, ev: &Event, out: &mut Vec<Verdict>) {
        self.stats.events += 1;
        match ev {
            Event::State(s) => self.on_state(s, out),
            Event::Accept(f) => self.on_accept(f),
            Event::Close(f) => self.on_close(f),
        }
    }

    /// Room for a snapshot of `n` sockets.
    pub fn reserve_snapshot(&mut self, n: usize) {
        self.table.reserve_quiet(n);
    }

    /// A socket that existed before tracing started. Its state is as of
    /// `now_ns`; older events for it only add ownership.
    pub fn on_snapshot(&mut self, snap: &SnapshotSocket, now_ns: u64) {
        if snap.state != tcp::CLOSE_WAIT && !self.table.has_full_record(snap.cookie) {
            // Until its first event only its holder matters (endpoints
            // come with every state change).
            self.table
                .insert_quiet(snap.cookie, snap.state, snap.holder, now_ns, &mut self.stats);
            return;
        }
        let Some(sock) = self.table.entry(snap.cookie, 0, &mut self.stats) else {
            return;
        };
        sock.endpoints = Some(snap.endpoints);
        sock.apply_snapshot(snap.state, now_ns, snap.holder);
        if snap.state == tcp::CLOSE_WAIT && sock.close_wait.is_none() {
            let age = snap.last_ack_age_ns.unwrap_or(0);
            let since = Since {
                ns: now_ns.saturating_sub(age),
                estimated: true,
            };
            sock.close_wait = Some(since);
            self.pending.insert((since.ns, snap.cookie));
        }
    }

    fn on_state(&mut self, ev: &StateEvent, out: &mut Vec<Verdict>) {
        let h = &ev.header;
        let leak_after = self.leak_after_ns;
        let Some(sock) = self.table.entry(h.cookie, h.skaddr, &mut self.stats) else {
            return;
        };
        // Later events carry the full tuple (the port is bound after
        // SYN_SENT), so refresh unless it is all zeros.
        let ep = Endpoints::from_event(ev);
        if ep.local.port() != 0 || sock.endpoints.is_none() {
            sock.endpoints = Some(ep);
        }
        if ev.oldstate == tcp::CLOSE && ev.newstate == tcp::SYN_SENT {
            // connect() runs this transition in the owner's own syscall.
            sock.owner = Some(Owner {
                pid: h.tgid,
                comm: Comm(h.comm),
                source: OwnerSource::Connect,
            });
            sock.open_stack = Some(StackRef::of(h));
        }
        if h.ktime_ns < sock.state_ns {
            // The snapshot is newer than this event; it can only sharpen an
            // estimated CLOSE_WAIT entry time.
            if ev.newstate == tcp::CLOSE_WAIT && sock.state == tcp::CLOSE_WAIT {
                if let Some(since) = sock.close_wait.filter(|s| s.estimated) {
                    self.pending.remove(&(since.ns, h.cookie));
                    let exact = Since {
                        ns: h.ktime_ns,
                        estimated: false,
                    };
                    sock.close_wait = Some(exact);
                    if !sock.leak_reported {
                        self.pending.insert((exact.ns, h.cookie));
                    }
                }
            }
            return;
        }
        sock.state = ev.newstate;
        sock.state_ns = h.ktime_ns;

        if ev.newstate == tcp::CLOSE_WAIT {
            let since = Since {
                ns: h.ktime_ns,
                estimated: false,
            };
            if let Some(old) = sock.close_wait.replace(since) {
                // Already pending (e.g. from the snapshot): one entry only.
                self.pending.remove(&(old.ns, h.cookie));
            }
            // rx_queue counts the FIN's sequence number too.
            sock.unread_at_fin = (ev.rx_queue != RX_QUEUE_UNKNOWN).then(|| ev.rx_queue.saturating_sub(1));
            self.pending.insert((since.ns, h.cookie));
        } else if let Some(since) = sock.close_wait.take() {
            // Left CLOSE_WAIT: the application closed it (LAST_ACK), or it
            // was reset/aborted (CLOSE).
            self.pending.remove(&(since.ns, h.cookie));
            let due_ns = since.ns.saturating_add(leak_after);
            if !sock.leak_reported && h.ktime_ns >= due_ns && wanted(self.filter_pid, sock) {
                // It stayed past the threshold, but no sweep reported it
                // before it left (the clock waits while evidence is
                // gathered): it was a leak all the same, as of when it
                // became due, and this is its late close. Findings then do
                // not depend on when sweeps run.
                sock.leak_reported = true;
                self.stats.leaks_reported += 1;
                out.push(Verdict::Leak(report(sock, since, due_ns)));
            }
            if sock.leak_reported {
                let aborted = ev.newstate == tcp::CLOSE;
                let leak = report(sock, since, h.ktime_ns);
                out.push(Verdict::LateClose {
                    // Saturating: times come from recordings too, and a
                    // crafted one must not overflow.
                    closed_after_ns: h.ktime_ns.saturating_sub(since.ns.saturating_add(leak_after)),
                    leak,
                    aborted,
                });
                sock.leak_reported = false;
                self.stats.late_closes += 1;
            }
        }
        if ev.newstate == tcp::CLOSE {
            if is_reset(ev.oldstate) {
                self.stats.resets += 1;
            }
            // Destroyed: the cookie never comes back, the skaddr may.
            self.table.remove(h.cookie);
        }
    }

    fn on_accept(&mut self, ev: &FdEvent) {
        let h = ev.header;
        let Some(sock) = self.table.fd_socket(&h, &mut self.stats) else {
            return;
        };
        sock.owner = Some(Owner {
            pid: h.tgid,
            comm: Comm(h.comm),
            source: OwnerSource::Accept,
        });
        sock.fd = Some(ev.fd);
        sock.open_stack = Some(StackRef::of(&h));
    }

    fn on_close(&mut self, ev: &FdEvent) {
        let h = ev.header;
        let Some(sock) = self.table.fd_socket(&h, &mut self.stats) else {
            return;
        };
        sock.last_close = Some(CloseCall {
            pid: h.tgid,
            tid: h.tid,
            fd: ev.fd,
            ns: h.ktime_ns,
            stack: StackRef::of(&h),
        });
        if sock.owner.is_none() {
            sock.owner = Some(Owner {
                pid: h.tgid,
                comm: Comm(h.comm),
                source: OwnerSource::Close,
            });
        }
    }

    /// Reports every socket that has now been in CLOSE_WAIT for longer than
    /// the threshold. Driven by a clock (live) or by event time (replay).
    pub fn sweep(&mut self, now_ns: u64, out: &mut Vec<Verdict>) {
        while let Some(&(since_ns, cookie)) = self.pending.first() {
            if now_ns < since_ns.saturating_add(self.leak_after_ns) {
                break;
            }
            self.pending.pop_first();
            let Some(sock) = self.table.sockets.get_mut(&cookie) else {
                continue;
            };
            let Some(since) = sock.close_wait else { continue };
            if !wanted(self.filter_pid, sock) {
                continue;
            }
            sock.leak_reported = true;
            self.stats.leaks_reported += 1;
            out.push(Verdict::Leak(report(sock, since, now_ns)));
        }
    }

    /// Cookies the next `sweep(now_ns)` will report.
    pub fn due(&self, now_ns: u64) -> Vec<u64> {
        self.pending
            .iter()
            .take_while(|(since, _)| now_ns >= since.saturating_add(self.leak_after_ns))
            .map(|&(_, cookie)| cookie)
            .collect()
    }

    /// Every socket currently reported as leaked, as of `now_ns`.
    pub fn current_leaks(&self, now_ns: u64) -> Vec<LeakReport> {
        let mut v: Vec<_> = self
            .table
            .sockets
            .values()
            .filter(|s| s.leak_reported)
            .filter_map(|s| s.close_wait.map(|since| report(s, since, now_ns)))
            .collect();
        v.sort_by_key(|l| (l.owner.map(|o| o.pid), l.cookie));
        v
    }
}

fn wanted(filter_pid: Option<u32>, sock: &Socket) -> bool {
    match filter_pid {
        None => true,
        Some(pid) => sock.owner.is_some_and(|o| o.pid == pid),
    }
}

/// Going straight to CLOSE from a connected state means RST or abort.
fn is_reset(oldstate: u8) -> bool {
    matches!(
        oldstate,
        tcp::ESTABLISHED | tcp::CLOSE_WAIT | tcp::SYN_SENT | tcp::SYN_RECV
    )
}

fn report(sock: &Socket, since: Since, now_ns: u64) -> LeakReport {
    LeakReport {
        cookie: sock.cookie,
        owner: sock.owner,
        fd: sock.fd,
        endpoints: sock.endpoints,
        since,
        close_wait_ns: now_ns.saturating_sub(since.ns),
        last_close: sock.last_close,
        open_stack: sock.open_stack,
        unread_at_fin: sock.unread_at_fin,
    }
}
