//! Output, kept apart from collection: the live loop hands finished facts
//! to a [`Sink`], which only formats them.

mod json;
mod text;

use std::io;

use serde::Serialize;

pub use json::JsonSink;
pub use text::TextSink;

use crate::{
    correlate::{CorrelatorStats, LeakReport, OwnerSource},
    kernel::{HookStatus, KernelStats},
    procs::ProcCache,
};

#[derive(Debug, Serialize)]
pub struct Start {
    pub hooks: Vec<HookStatus>,
    pub filter_pid: Option<u32>,
    pub leak_after_ms: u64,
    pub preexisting_sockets: usize,
}

/// One leaked socket, as shown to users.
#[derive(Clone, Debug, Serialize)]
pub struct LeakOut {
    pub pid: Option<u32>,
    pub comm: String,
    pub cmdline: String,
    /// `ADDR:PORT`, IPv6 in brackets.
    pub local: String,
    pub remote: String,
    pub cookie: u64,
    pub close_wait_ms: u64,
    /// The socket was already in CLOSE_WAIT when tracing started: the time
    /// is the kernel's age of the last ACK received, an estimate.
    pub close_wait_estimated: bool,
    pub fd: Option<i32>,
    /// How the owner was established.
    pub owner_source: Option<OwnerSource>,
    /// A close() of an fd to this socket that did not end it: another
    /// process or fd still holds the socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd_closed_by: Option<ClosedBy>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct ClosedBy {
    pub pid: u32,
    pub tid: u32,
    pub fd: i32,
}

impl LeakOut {
    pub fn new(l: &LeakReport, procs: &mut ProcCache) -> Self {
        let pid = l.owner.map(|o| o.pid);
        let info = pid.and_then(|p| procs.get(p)).cloned();
        let comm = match (&l.owner, &info) {
            (Some(o), _) => o.comm.as_str().into_owned(),
            (None, _) => String::new(),
        };
        let ep = |f: fn(&crate::correlate::Endpoints) -> std::net::SocketAddr| {
            l.endpoints
                .as_ref()
                .map(|e| f(e).to_string())
                .unwrap_or_else(|| "?".into())
        };
        LeakOut {
            pid,
            comm,
            cmdline: info.map(|i| i.cmdline).unwrap_or_default(),
            local: ep(|e| e.local),
            remote: ep(|e| e.remote),
            cookie: l.cookie,
            close_wait_ms: l.close_wait_ns / 1_000_000,
            close_wait_estimated: l.since.estimated,
            fd: l.fd,
            owner_source: l.owner.map(|o| o.source),
            fd_closed_by: l.last_close.map(|c| ClosedBy {
                pid: c.pid,
                tid: c.tid,
                fd: c.fd,
            }),
        }
    }
}

/// One kernel event, for `--events`.
#[derive(Debug, Serialize)]
pub struct EventOut {
    pub time: String,
    pub kind: &'static str,
    pub cookie: u64,
    /// The task that was running: for a state change, often not the owner.
    pub task_pid: u32,
    pub task_tid: u32,
    pub task_comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub time: String,
    pub uptime_ms: u64,
    pub events: u64,
    pub sockets_tracked: usize,
    pub leaks_now: usize,
    pub ringbuf_drops: u64,
}

/// Leaks of one process to one remote endpoint.
#[derive(Debug, Serialize)]
pub struct Group {
    pub pid: Option<u32>,
    pub comm: String,
    pub remote: String,
    pub count: usize,
    pub oldest_close_wait_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct SummaryStats {
    pub kernel: KernelStats,
    pub agent: CorrelatorStats,
    pub decode_errors: u64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub duration_ms: u64,
    /// Why tracing stopped: "duration", "signal", "process_exit", "output_closed".
    pub reason: &'static str,
    pub leaks: Vec<LeakOut>,
    pub groups: Vec<Group>,
    pub stats: SummaryStats,
}

pub fn group(leaks: &[LeakOut]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for l in leaks {
        match groups.iter_mut().find(|g| g.pid == l.pid && g.remote == l.remote) {
            Some(g) => {
                g.count += 1;
                g.oldest_close_wait_ms = g.oldest_close_wait_ms.max(l.close_wait_ms);
            }
            None => groups.push(Group {
                pid: l.pid,
                comm: l.comm.clone(),
                remote: l.remote.clone(),
                count: 1,
                oldest_close_wait_ms: l.close_wait_ms,
            }),
        }
    }
    groups.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(a.pid.cmp(&b.pid))
            .then(a.remote.cmp(&b.remote))
    });
    groups
}

pub trait Sink {
    fn start(&mut self, s: &Start) -> io::Result<()>;
    fn event(&mut self, e: &EventOut) -> io::Result<()>;
    fn leak(&mut self, l: &LeakOut) -> io::Result<()>;
    fn late_close(&mut self, l: &LeakOut, closed_after_ms: u64, aborted: bool) -> io::Result<()>;
    fn status(&mut self, s: &Status) -> io::Result<()>;
    fn process_exit(&mut self, pid: u32) -> io::Result<()>;
    fn summary(&mut self, s: &Summary) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}
