//! The findings users are shown about a leak: the correlator's verdict joined with
//! the process's name, the symbolized stacks and the leak-time evidence.
//! Sinks only format these.

use std::collections::HashMap;

use serde::Serialize;

use crate::{
    correlate::{Endpoints, LeakReport, OwnerSource, StackRef},
    evidence::{Evidence, HolderOut},
    procs::ProcInfo,
    stacks::Frame,
};

/// One leaked socket, as shown to users.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LeakOut {
    pub pid: Option<u32>,
    pub comm: String,
    pub cmdline: String,
    /// The owner's container: the bare 64-hex id its cgroup names.
    pub container_id: Option<String>,
    /// The owner's pid in its own pid namespace, where it differs from
    /// `pid` (a container's).
    pub container_pid: Option<u32>,
    /// The owner's cgroup v2 path.
    pub cgroup: Option<String>,
    /// `ADDR:PORT`, IPv6 in brackets.
    pub local: String,
    pub remote: String,
    /// The network namespace the socket was found in (its inode, as in
    /// `net:[INODE]`), from the evidence.
    pub netns: Option<u64>,
    pub cookie: u64,
    pub close_wait_ms: u64,
    /// The socket was already in CLOSE_WAIT when tracing started: the time
    /// is the kernel's age of the last ACK received, an estimate.
    pub close_wait_estimated: bool,
    /// The owner's fd to it.
    pub fd: Option<i32>,
    /// How the owner was established.
    pub owner_source: Option<OwnerSource>,
    /// Bytes received and never read (FIN excluded), at report time.
    pub unread_bytes: Option<u32>,
    /// The same when the FIN arrived.
    pub unread_bytes_at_fin: Option<u32>,
    /// Every process holding the socket at report time.
    pub holders: Vec<HolderOut>,
    /// Where the owner opened it: user frames then kernel frames, each
    /// innermost first.
    pub open_stack: Vec<Frame>,
    pub open_stack_error: Option<String>,
    /// Why the opening stack ends before its outermost frame (a broken
    /// frame-pointer chain, the depth bound), and what to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_stack_truncated: Option<String>,
    /// Where an fd to it was last closed, when one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_stack: Option<Vec<Frame>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_stack_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_stack_truncated: Option<String>,
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

/// A stack as shown: frames (user then kernel, each innermost first), why
/// there is no user stack, and why it is cut short.
#[derive(Clone, Debug, Default)]
pub struct StackOut {
    pub frames: Vec<Frame>,
    pub error: Option<String>,
    pub truncated: Option<String>,
}

/// What building a [`LeakOut`] draws on: what the engine has learned.
pub struct Enrich<'a> {
    pub names: &'a HashMap<u32, ProcInfo>,
    pub evidence: &'a HashMap<u64, Evidence>,
    /// Symbolized frames for a stack reference, or why there are none.
    pub stacks: &'a dyn Fn(Option<StackRef>) -> StackOut,
}

impl LeakOut {
    pub fn new(l: &LeakReport, e: &Enrich<'_>) -> Self {
        let ev = e.evidence.get(&l.cookie);
        let holders = ev.map(|ev| ev.holders.clone()).unwrap_or_default();
        // The owner per the kernel events; failing that, whoever holds it.
        let (pid, comm) = match (&l.owner, holders.first()) {
            (Some(o), _) => (Some(o.pid), o.comm.as_str().into_owned()),
            (None, Some(h)) => (Some(h.pid), h.comm.clone()),
            (None, None) => (None, String::new()),
        };
        let fd = holders.iter().find(|h| Some(h.pid) == pid).map(|h| h.fd).or(l.fd);
        let info = pid.and_then(|p| e.names.get(&p));
        let cmdline = info.map(|i| i.cmdline.clone()).unwrap_or_default();
        let ep = |f: fn(&Endpoints) -> std::net::SocketAddr| {
            l.endpoints
                .as_ref()
                .map(|e| f(e).to_string())
                .unwrap_or_else(|| "?".into())
        };
        let open = (e.stacks)(l.open_stack);
        let close = l.last_close.map(|c| (e.stacks)(Some(c.stack)));
        LeakOut {
            pid,
            comm,
            cmdline,
            container_id: info.and_then(|i| i.container_id.clone()),
            container_pid: info.and_then(|i| i.container_pid),
            cgroup: info.map(|i| i.cgroup.clone()).filter(|c| !c.is_empty()),
            local: ep(|e| e.local),
            remote: ep(|e| e.remote),
            netns: ev.and_then(|ev| ev.netns),
            // The kernel's cookie (as `ss` shows it), where the tracer knew
            // the socket by its address.
            cookie: ev.and_then(|ev| ev.cookie).unwrap_or(l.cookie),
            close_wait_ms: l.close_wait_ns / 1_000_000,
            close_wait_estimated: l.since.estimated,
            fd,
            owner_source: l.owner.map(|o| o.source),
            unread_bytes: ev.and_then(|ev| ev.unread_now),
            unread_bytes_at_fin: l.unread_at_fin,
            holders,
            open_stack: open.frames,
            open_stack_error: open.error,
            open_stack_truncated: open.truncated,
            close_stack_error: close.as_ref().and_then(|c| c.error.clone()),
            close_stack_truncated: close.as_ref().and_then(|c| c.truncated.clone()),
            close_stack: close.map(|c| c.frames),
            fd_closed_by: l.last_close.map(|c| ClosedBy {
                pid: c.pid,
                tid: c.tid,
                fd: c.fd,
            }),
        }
    }

    /// The opening stack's user frames, as a grouping key: the function
    /// and, for Java frames, the line (one method calls out from many).
    fn stack_key(&self) -> StackKey<'_> {
        self.open_stack
            .iter()
            .filter(|f| !f.kernel)
            .map(|f| (f.symbol.as_deref().unwrap_or(&f.ip), f.line.filter(|_| f.is_java())))
            .collect()
    }
}

/// A stack as leaks are grouped by: each user frame's function and, for a
/// Java frame, its line.
type StackKey<'a> = Vec<(&'a str, Option<u32>)>;

/// Leaks of one process, opened from one stack, to one remote endpoint.
#[derive(Debug, Serialize)]
pub struct Group {
    pub pid: Option<u32>,
    pub comm: String,
    /// The process's container (64-hex id), where it runs in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    pub remote: String,
    pub count: usize,
    pub oldest_close_wait_ms: u64,
    /// Sum of the group's unread bytes.
    pub unread_bytes: u64,
    pub open_stack: Vec<Frame>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_stack_truncated: Option<String>,
}

pub fn group(leaks: &[LeakOut]) -> Vec<Group> {
    let mut groups: Vec<(StackKey<'_>, Group)> = Vec::new();
    for l in leaks {
        let key = l.stack_key();
        match groups
            .iter_mut()
            .find(|(k, g)| g.pid == l.pid && g.remote == l.remote && *k == key)
        {
            Some((_, g)) => {
                g.count += 1;
                g.oldest_close_wait_ms = g.oldest_close_wait_ms.max(l.close_wait_ms);
                g.unread_bytes += u64::from(l.unread_bytes.unwrap_or(0));
            }
            None => groups.push((
                key,
                Group {
                    pid: l.pid,
                    comm: l.comm.clone(),
                    container_id: l.container_id.clone(),
                    remote: l.remote.clone(),
                    count: 1,
                    oldest_close_wait_ms: l.close_wait_ms,
                    unread_bytes: u64::from(l.unread_bytes.unwrap_or(0)),
                    open_stack: l.open_stack.clone(),
                    open_stack_truncated: l.open_stack_truncated.clone(),
                },
            )),
        }
    }
    let mut groups: Vec<Group> = groups.into_iter().map(|(_, g)| g).collect();
    groups.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(a.pid.cmp(&b.pid))
            .then(a.remote.cmp(&b.remote))
    });
    groups
}
