//! Sockets followed in the kernel (default `live`): the agent reads the
//! ones that stay in CLOSE_WAIT and feeds the engine the events they stand
//! for, exactly as the full event stream would have carried them; every
//! later change of such a socket comes as an ordinary event.

use std::collections::HashSet;

use tracer_common::{tcp, EventKind, FdEvent, Header, StateEvent, Touch, OPENED_BY_ACCEPT, OPENED_BY_CONNECT};

use super::session::Session;
use crate::{
    decode::Event,
    input::{Input, ProcessInput},
    kernel::Kernel,
    procs,
};

/// How often the processes marked as running no JVM are checked for exit.
const NATIVE_CHECK_NS: u64 = 5_000_000_000;

/// How long a socket stays in CLOSE_WAIT before the agent reads it: long
/// enough that sockets closed promptly (nearly all) are never read, short
/// enough that a leak is read well before it is due.
pub fn promote_after(leak_after_ns: u64) -> u64 {
    (leak_after_ns / 2).min(1_000_000_000)
}

impl Session {
    /// Reads the followed sockets that have stayed in CLOSE_WAIT since at
    /// least `promote_ns`, and feeds those not fed yet.
    pub(super) fn read_close_wait(&mut self, kernel: &mut Kernel, now: u64, promote_ns: u64) {
        let mut seen = HashSet::new();
        for cookie in kernel.close_wait_cookies() {
            // One fed already is only remembered: a leak stays in the map
            // for as long as it leaks, and is not read again every tick.
            if self.promoted.contains(&cookie) {
                seen.insert(cookie);
                continue;
            }
            let Some(rec) = kernel.close_wait_record(cookie) else {
                continue; // left CLOSE_WAIT meanwhile
            };
            let age = now.saturating_sub(rec.header.ktime_ns);
            if age < promote_ns {
                continue;
            }
            log::debug!(
                "socket {cookie:#x} read from the CLOSE_WAIT map, {} ms in CLOSE_WAIT",
                age / 1_000_000
            );
            seen.insert(cookie);
            self.promote(kernel, &rec);
        }
        // Entries leave the map when their socket leaves CLOSE_WAIT.
        self.promoted = seen;
        if self.catalogue.full() {
            self.catalogue.clear();
            kernel.forget_known_stacks();
        }
        self.forget_exited_natives(kernel, now);
    }

    /// A pid the kernel side keys by return addresses alone could come back
    /// as a JVM: exited processes are unmarked (checked every few seconds;
    /// pids are not reused that fast).
    fn forget_exited_natives(&mut self, kernel: &mut Kernel, now: u64) {
        if now.saturating_sub(self.native_checked_ns) < NATIVE_CHECK_NS {
            return;
        }
        self.native_checked_ns = now;
        let gone: Vec<u32> = self.native.iter().copied().filter(|&p| !procs::exists(p)).collect();
        for pid in gone {
            kernel.mark_native(pid, false);
            self.native.remove(&pid);
            self.catalogue.forget_process(pid);
        }
    }

    /// The events a followed socket's change into CLOSE_WAIT stands for,
    /// with what the kernel side keeps of the socket, in time order: the
    /// open (connect's state change, or the accept), a close that left the
    /// socket open, and the change into CLOSE_WAIT.
    pub(super) fn promote(&mut self, kernel: &Kernel, change: &StateEvent) {
        let mut cw = *change;
        cw.header.kind = EventKind::State as u32;
        let (cookie, skaddr) = (cw.header.cookie, cw.header.skaddr);
        let (sock, shared_close) = kernel.socket_record(skaddr);
        let sock = sock.unwrap_or_default();
        let close = shared_close.unwrap_or_default();
        // Each event with the touch whose stacks it carries.
        let mut events: Vec<(Event, Option<&Touch>)> = Vec::with_capacity(3);
        let open = &sock.open;
        if open.ns != 0 && sock.opened_by == OPENED_BY_CONNECT {
            let mut ev = cw;
            ev.header = header(EventKind::State, open, cookie, skaddr);
            ev.oldstate = tcp::CLOSE;
            ev.newstate = tcp::SYN_SENT;
            ev.rx_queue = 0;
            events.push((Event::State(ev), Some(open)));
        } else if open.ns != 0 && sock.opened_by == OPENED_BY_ACCEPT {
            events.push((fd_event(EventKind::Accept, open, cookie, skaddr), Some(open)));
        }
        if close.ns != 0 {
            events.push((fd_event(EventKind::Close, &close, cookie, skaddr), Some(&close)));
        }
        events.push((Event::State(cw), None));
        events.sort_by_key(|(ev, _)| ev.header().ktime_ns);
        for (mut ev, touch) in events {
            if ev.opens_socket() {
                let pid = ev.header().tgid;
                if let Some(info) = self.names.learn(pid) {
                    self.inputs.push(Input::Process(ProcessInput { pid, info }));
                }
            }
            if let Some(t) = touch {
                self.catalogue
                    .resolve(t.tgid, &t.stacks, ev.header_mut(), &mut self.named);
                self.inputs.extend(self.named.drain(..).map(Input::Stack));
            }
            self.inputs.push(Input::Kernel(ev));
        }
    }
}

fn header(kind: EventKind, t: &Touch, cookie: u64, skaddr: u64) -> Header {
    Header {
        kind: kind as u32,
        cpu: t.cpu,
        ktime_ns: t.ns,
        tgid: t.tgid,
        tid: t.tid,
        comm: t.comm,
        cookie,
        skaddr,
        ustack: t.stacks.ustack,
        kstack: t.stacks.kstack,
    }
}

fn fd_event(kind: EventKind, t: &Touch, cookie: u64, skaddr: u64) -> Event {
    let ev = FdEvent {
        header: header(kind, t, cookie, skaddr),
        fd: t.fd,
        _pad: 0,
    };
    match kind {
        EventKind::Accept => Event::Accept(ev),
        _ => Event::Close(ev),
    }
}
