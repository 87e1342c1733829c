//! Sockets followed in the kernel (default `live`, `Config::follow`):
//! userspace hears of a socket only when it matters.
//!
//! - Its opener (connect, accept) and the last close of a shared fd to it
//!   are kept in `SOCKS`, with their stacks' catalogue keys.
//! - Entering CLOSE_WAIT puts a [`CloseWaitRecord`] in `CLOSE_WAIT`, which
//!   the agent reads for the sockets that stay there (at least
//!   `promote_ns`). Most leave within microseconds: nothing is sent.
//! - Leaving CLOSE_WAIT after `promote_ns` (the agent may know the socket
//!   by then), and every later change of such a socket, is sent as the
//!   full event; so is leaving a CLOSE_WAIT the kernel side did not see
//!   start (sockets older than the tracer, which the snapshot gave the
//!   agent). Times are the kernel's, so no race decides what is sent: a
//!   socket the agent read is always older than `promote_ns` when it
//!   leaves.

use aya_ebpf::{cty::c_void, helpers::generated::bpf_get_socket_cookie, programs::BtfTracePointContext, EbpfContext};
use tracer_common::{
    stats, tcp, CloseWaitRecord, EventKind, Header, SockRecord, Touch, OPENED_BY_ACCEPT, OPENED_BY_CONNECT,
};

use crate::{
    catalog, config,
    config::off,
    emit, fdsock,
    maps::{self, Counters},
    state,
};

/// What the state hook does with a change when sockets are followed.
#[inline(always)]
pub fn on_state(ctx: &BtfTracePointContext, sk: *const c_void, oldstate: u8, newstate: u8) {
    if oldstate == tcp::CLOSE && newstate == tcp::SYN_SENT {
        on_connect(ctx, sk);
    } else if newstate == tcp::CLOSE_WAIT {
        on_close_wait(ctx, sk, oldstate);
    } else if oldstate == tcp::CLOSE_WAIT {
        on_leave(ctx, sk, newstate);
    } else if newstate == tcp::CLOSE {
        on_destroy(ctx, sk, oldstate);
    }
}

#[inline(always)]
fn is_tcp(sk: *const c_void) -> bool {
    // SAFETY: a field of the BTF-typed socket (see `state::load`).
    unsafe { state::load::<u16>(sk, off!(sk_protocol)) == tcp::IPPROTO_TCP }
}

#[inline(always)]
fn cookie(sk: *const c_void) -> u64 {
    unsafe { bpf_get_socket_cookie(sk as *mut c_void) }
}

/// Who the current task is, now, with its stacks (see `catalog::take`).
#[inline(always)]
pub fn touch<C: EbpfContext>(ctx: &C, fd: i32, set: Counters, open: bool, stacks: bool) -> Touch {
    let h: Header = emit::header(0, 0, 0);
    Touch {
        ns: h.ktime_ns,
        tgid: h.tgid,
        tid: h.tid,
        comm: h.comm,
        fd,
        cpu: h.cpu,
        stacks: catalog::take(ctx, &h, set, open, stacks),
    }
}

/// Keeps a socket's opener, taken in its own syscall.
#[inline(always)]
pub fn opened<C: EbpfContext>(ctx: &C, sk: u64, fd: i32, opened_by: u32, set: Counters) {
    let record = SockRecord {
        open: touch(ctx, fd, set, true, true),
        close: Touch::default(),
        opened_by,
        followed: 0,
    };
    if maps::SOCKS.insert(&sk, &record, 0).is_err() {
        maps::count(set, stats::OWNERS_FULL);
    }
}

/// An accept (`accept` hook). Returns whether it is to be sent as an
/// event: the socket has been in CLOSE_WAIT long enough that the agent may
/// know it (the peer can close before the server accepts). Otherwise its
/// opener is kept, and given to its CLOSE_WAIT record if it has one.
#[inline(always)]
pub fn on_accept<C: EbpfContext>(ctx: &C, sk: u64, fd: i32) -> bool {
    let cookie = fdsock::cookie_of(sk);
    let cw = if cookie != 0 {
        maps::CLOSE_WAIT.get_ptr_mut(&cookie)
    } else {
        None
    };
    if cw.is_some_and(|cw| known_to_agent(cw)) {
        return true;
    }
    opened(ctx, sk, fd, OPENED_BY_ACCEPT, Counters::Syscall);
    if let (Some(cw), Some(r)) = (cw, maps::SOCKS.get_ptr(&sk)) {
        // SAFETY: map values; see `on_fd_close`.
        unsafe {
            (*cw).sock = *r;
            (*cw).has_sock = 1;
        }
    }
    false
}

/// Whether a socket's CLOSE_WAIT record is old enough that the agent may
/// have read it (it reads only records at least `promote_ns` old, by a
/// clock read before it reads them).
#[inline(always)]
fn known_to_agent(cw: *const CloseWaitRecord) -> bool {
    // SAFETY: a map value, read at once.
    let since = unsafe { (*cw).event.header.ktime_ns };
    emit::now().saturating_sub(since) >= config::promote_ns()
}

/// CLOSE -> SYN_SENT runs inside the owner's connect().
#[inline(always)]
fn on_connect(ctx: &BtfTracePointContext, sk: *const c_void) {
    let filter = config::filter_tgid();
    if (filter != 0 && state::current_tgid() != filter) || !is_tcp(sk) {
        return;
    }
    opened(ctx, sk as u64, -1, OPENED_BY_CONNECT, Counters::State);
}

#[inline(always)]
fn on_close_wait(ctx: &BtfTracePointContext, sk: *const c_void, oldstate: u8) {
    if !is_tcp(sk) {
        return;
    }
    let record = maps::SOCKS.get_ptr(&(sk as u64));
    let cookie = cookie(sk);
    // With --pid only its sockets have a record; its sockets older than the
    // tracer are in the watch list.
    if config::filter_tgid() != 0 && record.is_none() && maps::WATCH.get_ptr(&cookie).is_none() {
        return;
    }
    let Some(cw) = maps::CLOSE_WAIT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch value; the state hook does not nest with
    // itself, and nothing else uses it.
    let cw = unsafe { &mut *cw };
    cw.event = state::event(ctx, sk, cookie, oldstate, tcp::CLOSE_WAIT);
    cw.event.header.kind = EventKind::CloseWait as u32;
    match record {
        // SAFETY: a map value, copied at once.
        Some(r) => {
            cw.sock = unsafe { *r };
            cw.has_sock = 1;
        }
        None => {
            cw.sock = SockRecord::default();
            cw.has_sock = 0;
        }
    }
    if maps::CLOSE_WAIT.insert(&cookie, &*cw, 0).is_err() {
        maps::count(Counters::State, stats::CLOSE_WAIT_SPILLED);
        emit::send(cw, Counters::State);
    }
}

/// Leaving CLOSE_WAIT: closed by its owner (LAST_ACK) or aborted (CLOSE).
#[inline(always)]
fn on_leave(ctx: &BtfTracePointContext, sk: *const c_void, newstate: u8) {
    let cookie = cookie(sk);
    let entry = maps::CLOSE_WAIT.get_ptr(&cookie);
    let send = match entry {
        Some(cw) => known_to_agent(cw),
        // Not seen entering it: older than the tracer (the agent has it
        // from the snapshot), or spilled through the ring buffer.
        None => is_tcp(sk) && (config::filter_tgid() == 0 || maps::WATCH.get_ptr(&cookie).is_some()),
    };
    if send {
        send_state(ctx, sk, cookie, tcp::CLOSE_WAIT, newstate);
        if newstate != tcp::CLOSE {
            follow_from_now(sk as u64);
        }
    }
    if entry.is_some() {
        let _ = maps::CLOSE_WAIT.remove(&cookie);
    }
    if newstate == tcp::CLOSE {
        destroyed(sk as u64, cookie, send);
    }
}

/// Every later change of the socket is sent: the agent may know it.
#[inline(always)]
fn follow_from_now(sk: u64) {
    if let Some(r) = maps::SOCKS.get_ptr_mut(&sk) {
        // SAFETY: a map value; the socket's state changes are serialised
        // by its lock.
        unsafe { (*r).followed = 1 };
        return;
    }
    let record = SockRecord {
        followed: 1,
        ..SockRecord::default()
    };
    if maps::SOCKS.insert(&sk, &record, 0).is_err() {
        maps::count(Counters::State, stats::OWNERS_FULL);
    }
}

#[inline(always)]
fn on_destroy(ctx: &BtfTracePointContext, sk: *const c_void, oldstate: u8) {
    let Some(r) = maps::SOCKS.get_ptr(&(sk as u64)) else {
        return;
    };
    // SAFETY: a map value, read at once.
    let followed = unsafe { (*r).followed } != 0;
    let cookie = if followed { cookie(sk) } else { 0 };
    if followed {
        send_state(ctx, sk, cookie, oldstate, tcp::CLOSE);
    }
    destroyed(sk as u64, cookie, followed);
}

/// The socket is gone: its slots are freed for the next one.
#[inline(always)]
fn destroyed(sk: u64, cookie: u64, followed: bool) {
    let _ = maps::SOCKS.remove(&sk);
    if followed {
        let _ = maps::REPORTED.remove(&cookie);
    }
}

#[inline(always)]
fn send_state(ctx: &BtfTracePointContext, sk: *const c_void, cookie: u64, oldstate: u8, newstate: u8) {
    let ev = state::event(ctx, sk, cookie, oldstate, newstate);
    emit::send(&ev, Counters::State);
}

/// A close of an fd to a followed socket (`close` hook). Returns whether
/// the close is to be sent as an event (the agent may know the socket);
/// otherwise, if it leaves the socket open, it is kept as evidence.
#[inline(always)]
pub fn on_fd_close<C: EbpfContext>(ctx: &C, sk: u64, cookie: u64, fd: i32, shared: bool, stacks: bool) -> bool {
    if !shared {
        // The socket goes with it; its state changes say what happened.
        return false;
    }
    let cw = if cookie != 0 {
        maps::CLOSE_WAIT.get_ptr_mut(&cookie)
    } else {
        None
    };
    if cw.is_some_and(|cw| known_to_agent(cw)) {
        return true;
    }
    let t = touch(ctx, fd, Counters::Syscall, false, stacks);
    if let Some(cw) = cw {
        // SAFETY: a map value; a racing writer could only be another close
        // of the same socket, and either touch is a true one.
        unsafe { (*cw).sock.close = t };
    }
    match maps::SOCKS.get_ptr_mut(&sk) {
        // SAFETY: as above.
        Some(r) => unsafe { (*r).close = t },
        None => {
            let record = SockRecord {
                close: t,
                ..SockRecord::default()
            };
            if maps::SOCKS.insert(&sk, &record, 0).is_err() {
                maps::count(Counters::Syscall, stats::OWNERS_FULL);
            }
        }
    }
    false
}
