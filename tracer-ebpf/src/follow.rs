//! Sockets followed in the kernel (default `live`, `Config::follow`):
//! userspace hears of a socket only when it matters.
//!
//! - Its opener (connect, accept) is kept in the socket table (`socks`),
//!   with its stacks' catalogue keys; the last close of a shared fd to it
//!   in `SHARED_CLOSES`.
//! - Entering CLOSE_WAIT puts that state change in `CLOSE_WAIT`, which the
//!   agent reads (with the socket's records) for the sockets that stay
//!   there at least `promote_ns`. Most leave within microseconds: nothing
//!   is sent.
//! - Leaving CLOSE_WAIT after `promote_ns` (the agent may know the socket
//!   by then), and every later change of such a socket, is sent as the
//!   full event; so is leaving a CLOSE_WAIT the kernel side did not see
//!   start (sockets older than the tracer, which the snapshot gave the
//!   agent). Times are the kernel's, and the agent reads only what is at
//!   least `promote_ns` old by a clock read before it reads: a socket the
//!   agent read is always older than that when anything else happens to
//!   it, so no race decides what is sent.

use aya_ebpf::{cty::c_void, programs::BtfTracePointContext, EbpfContext};
use tracer_common::{
    stats, tcp, EventKind, Header, SockRecord, StateEvent, Touch, FOLLOWED, OPENED_BY_ACCEPT, OPENED_BY_CONNECT,
    SHARED_CLOSE,
};

use crate::{
    catalog, close_wait, config,
    config::off,
    emit, ids,
    maps::{self, Counters},
    socks, state,
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
    if newstate == tcp::CLOSE && config::filter_tgid() != 0 {
        unwatch(sk);
    }
}

/// With `--pid`: a destroyed socket leaves the watch list (cookies are
/// never reused; the entry would only take room).
#[inline(always)]
fn unwatch(sk: *const c_void) {
    let cookie = held_cookie(sk);
    if cookie != 0 {
        let _ = maps::WATCH.remove(&cookie);
    }
}

#[inline(always)]
fn is_tcp(sk: *const c_void) -> bool {
    // SAFETY: a field of the BTF-typed socket (see `state::load`).
    unsafe { state::load::<u16>(sk, off!(sk_protocol)) == tcp::IPPROTO_TCP }
}

#[inline(always)]
fn cookie(sk: *const c_void) -> u64 {
    ids::of(sk)
}

/// Who the current task is, now, with its stacks (see `catalog::take`).
#[inline(always)]
fn touch<C: EbpfContext>(ctx: &C, fd: i32, set: Counters, open: bool, stacks: bool) -> Touch {
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

/// Keeps `record` as the socket's (see `socks`). No room: counted in `set`.
#[inline(always)]
fn insert_sock(sk: u64, record: &SockRecord, set: Counters) {
    if !socks::insert(sk, record) {
        maps::count(set, stats::OWNERS_FULL);
    }
}

/// Whether the socket table may hold the socket: with `--pid`, only while
/// it holds anything.
#[inline(always)]
fn may_have_sock() -> bool {
    config::filter_tgid() == 0 || socks::any()
}

/// The cookie as the socket holds it, without assigning one (as
/// `bpf_get_socket_cookie` does, from a counter all CPUs share): 0 if it
/// was never asked for, and then it cannot be in the watch list, which the
/// snapshot and the accept hook fill. Before 5.12, its id where one is
/// fixed (see `ids`).
#[inline(always)]
fn held_cookie(sk: *const c_void) -> u64 {
    if let Some(id) = ids::fixed(sk as u64) {
        return id;
    }
    // SAFETY: a field of the BTF-typed socket (see `state::load`).
    unsafe { state::load(sk, off!(skc_cookie)) }
}

/// With `--pid`: whether the socket is the watched process's, opened by it
/// (the socket table) or older than the tracer (the watch list), found without
/// asking the socket for a cookie (which assigns one, from a counter all
/// CPUs share). Other processes' sockets end here.
#[inline(always)]
fn watched(sk: *const c_void) -> bool {
    if config::filter_tgid() == 0 {
        return true;
    }
    if socks::any() && socks::get(sk as u64).is_some() {
        return true;
    }
    let cookie = held_cookie(sk);
    cookie != 0 && maps::WATCH.get_ptr(&cookie).is_some()
}

/// Keeps a socket's opener, taken in its own syscall.
#[inline(always)]
fn opened<C: EbpfContext>(ctx: &C, sk: u64, fd: i32, opened_by: u32, set: Counters) {
    let record = SockRecord {
        open: touch(ctx, fd, set, true, true),
        opened_by,
        flags: 0,
    };
    insert_sock(sk, &record, set);
}

/// Whether a socket's CLOSE_WAIT entry is old enough that the agent may
/// have read it.
#[inline(always)]
fn known_to_agent(cw: *const StateEvent) -> bool {
    // SAFETY: a map value, read at once.
    let since = unsafe { (*cw).header.ktime_ns };
    emit::now().saturating_sub(since) >= config::promote_ns()
}

/// Whether the socket with `cookie` (0: none assigned yet) has a CLOSE_WAIT
/// entry old enough that the agent may have read it.
#[inline(always)]
fn in_close_wait_known_to_agent(cookie: u64) -> bool {
    close_wait::get(cookie).is_some_and(|e| known_to_agent(e.change))
}

/// Whether the start-up snapshot may have put the socket whose CLOSE_WAIT
/// entry this is in `WATCH`: with `--pid` it put every socket of the
/// process there; host-wide only those it found in CLOSE_WAIT, which
/// entered it before its dump ended (`SNAPSHOT_END`, 0 until known).
#[inline(always)]
fn maybe_in_snapshot(cw: *const StateEvent) -> bool {
    if config::filter_tgid() != 0 {
        return true;
    }
    let end = maps::SNAPSHOT_END.get(0).copied().unwrap_or(0);
    // SAFETY: a map value, read at once.
    end == 0 || unsafe { (*cw).header.ktime_ns } <= end
}

/// Sets `flag` in the socket's record, creating one (with no opener) if it
/// has none. A full map is counted in `set`.
#[inline(always)]
fn add_flag(sk: u64, flag: u32, set: Counters) {
    if let Some(r) = socks::get(sk) {
        // SAFETY: a map value; flags only ever gain bits.
        unsafe { (*r).flags |= flag };
        return;
    }
    let record = SockRecord {
        flags: flag,
        ..SockRecord::default()
    };
    insert_sock(sk, &record, set);
}

/// An accept (`accept` hook). Returns whether it is to be sent as an
/// event: the socket has been in CLOSE_WAIT long enough that the agent may
/// know it (the peer can close before the server accepts). Otherwise its
/// opener is kept.
#[inline(always)]
pub fn on_accept<C: EbpfContext>(ctx: &C, sk: u64, fd: i32) -> bool {
    if in_close_wait_known_to_agent(ids::known(sk)) {
        return true;
    }
    opened(ctx, sk, fd, OPENED_BY_ACCEPT, Counters::Syscall);
    false
}

/// A close of an fd to a followed socket that leaves it open (the file is
/// shared: `close` hook). Returns whether it is to be sent as an event (the
/// agent may know the socket); otherwise it is kept as evidence.
#[inline(always)]
pub fn on_shared_close<C: EbpfContext>(ctx: &C, sk: u64, cookie: u64, fd: i32, stacks: bool) -> bool {
    if in_close_wait_known_to_agent(cookie) {
        return true;
    }
    let t = touch(ctx, fd, Counters::Syscall, false, stacks);
    if maps::SHARED_CLOSES.insert(&sk, &t, 0).is_err() {
        maps::count(Counters::Syscall, stats::OWNERS_FULL);
        return false;
    }
    add_flag(sk, SHARED_CLOSE, Counters::Syscall);
    false
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
    if !is_tcp(sk) || !watched(sk) {
        return;
    }
    let cookie = cookie(sk);
    // Mostly in softirq or the peer's process: no comm.
    let mut ev = state::event(ctx, sk, cookie, oldstate, tcp::CLOSE_WAIT, false);
    if !close_wait::insert(cookie, &ev) {
        maps::count(Counters::State, stats::CLOSE_WAIT_SPILLED);
        ev.header.kind = EventKind::CloseWait as u32;
        emit::send(&ev, Counters::State);
    }
}

/// Leaving CLOSE_WAIT: closed by its owner (LAST_ACK) or aborted (CLOSE).
#[inline(always)]
fn on_leave(ctx: &BtfTracePointContext, sk: *const c_void, newstate: u8) {
    if !watched(sk) {
        return;
    }
    let cookie = cookie(sk);
    let entry = close_wait::get(cookie);
    // The agent knows the sockets its start-up snapshot found in
    // CLOSE_WAIT (in `WATCH`), even those the kernel side saw enter it
    // between attaching and the snapshot.
    let send = match &entry {
        Some(e) => known_to_agent(e.change) || (maybe_in_snapshot(e.change) && maps::WATCH.get_ptr(&cookie).is_some()),
        // Not seen entering it: older than the tracer (the agent has it
        // from the snapshot), or spilled through the ring buffer.
        // (With --pid, `watched` has found it the process's.)
        None => is_tcp(sk),
    };
    if send {
        send_state(ctx, sk, cookie, tcp::CLOSE_WAIT, newstate);
        if newstate != tcp::CLOSE {
            // Every later change of the socket is sent: the agent may know it.
            add_flag(sk as u64, FOLLOWED, Counters::State);
        }
    }
    if let Some(e) = &entry {
        close_wait::remove(cookie, e);
    }
    if newstate == tcp::CLOSE {
        destroyed(sk as u64, cookie, send, true);
    }
}

#[inline(always)]
fn on_destroy(ctx: &BtfTracePointContext, sk: *const c_void, oldstate: u8) {
    if !may_have_sock() {
        return;
    }
    let Some(r) = socks::get(sk as u64) else {
        return;
    };
    // SAFETY: a map value, read at once.
    let flags = unsafe { (*r).flags };
    let followed = flags & FOLLOWED != 0;
    let cookie = if followed { cookie(sk) } else { 0 };
    if followed {
        send_state(ctx, sk, cookie, oldstate, tcp::CLOSE);
    }
    destroyed(sk as u64, cookie, followed, flags & SHARED_CLOSE != 0);
}

/// The socket is gone: its entries are freed for the next one.
#[inline(always)]
fn destroyed(sk: u64, cookie: u64, followed: bool, shared_close: bool) {
    if may_have_sock() {
        socks::remove(sk);
    }
    if shared_close {
        let _ = maps::SHARED_CLOSES.remove(&sk);
    }
    if followed {
        let _ = maps::REPORTED.remove(&cookie);
    }
}

#[inline(always)]
fn send_state(ctx: &BtfTracePointContext, sk: *const c_void, cookie: u64, oldstate: u8, newstate: u8) {
    let ev = state::event(ctx, sk, cookie, oldstate, newstate, false);
    emit::send(&ev, Counters::State);
}
