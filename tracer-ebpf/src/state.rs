//! `tp_btf/inet_sock_set_state`: fires inside `tcp_set_state()` (and
//! `inet_sk_set_state()`) for every TCP state change, in whatever context
//! the change runs: the owner's syscall, softirq, or a peer's process.

use aya_ebpf::{
    cty::c_void, helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use tracer_common::{
    event::{AF_INET, AF_INET6},
    stats, tcp, EventKind, StateEvent, RX_QUEUE_UNKNOWN,
};

use crate::{
    config::{self, off},
    emit,
    fdsock::{read, Fault},
    follow, ids, maps,
    maps::Counters,
};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let oldstate: i32 = ctx.arg(1);
    let newstate: i32 = ctx.arg(2);
    let _ = handle(&ctx, sk, oldstate as u8, newstate as u8);
    if newstate as u8 == tcp::CLOSE {
        // Whichever path handled it: the socket is gone.
        ids::forget(sk);
    }
    0
}

#[inline(always)]
fn handle(ctx: &BtfTracePointContext, sk: *const c_void, oldstate: u8, newstate: u8) -> Result<(), Fault> {
    if config::follow() {
        follow::on_state(ctx, sk, oldstate, newstate);
        return Ok(());
    }
    let cookie = ids::of(sk);
    // With --pid, most state changes are other processes': the watch-map
    // lookup comes before any read of the socket.
    let filter = config::filter_tgid();
    if filter != 0 && !maybe_watched(cookie, filter, newstate) {
        return Ok(());
    }
    let proto: u16 = unsafe { load(sk, off!(sk_protocol)) };
    if proto != tcp::IPPROTO_TCP {
        return Ok(());
    }
    if filter != 0 {
        watch_new(cookie, filter, newstate);
    }

    // The running task's name only where it is the socket's user.
    let connect = oldstate == tcp::CLOSE && newstate == tcp::SYN_SENT;
    let mut ev = event(ctx, sk, cookie, oldstate, newstate, connect);
    if connect {
        // Inside the owner's connect(): its stack says who opened this.
        emit::take_open_stacks(ctx, &mut ev.header, Counters::State);
    }
    emit::send(&ev, Counters::State);

    if newstate == tcp::CLOSE {
        // The socket is gone; free its slots for the next one.
        if filter != 0 {
            let _ = maps::WATCH.remove(&cookie);
        }
        let _ = maps::REPORTED.remove(&cookie);
    }
    Ok(())
}

/// The state change as an event: addresses, ports, and on entering
/// CLOSE_WAIT the bytes left unread. `comm`: the current task's name too.
#[inline(always)]
pub fn event(
    ctx: &BtfTracePointContext,
    sk: *const c_void,
    cookie: u64,
    oldstate: u8,
    newstate: u8,
    comm: bool,
) -> StateEvent {
    let base = sk as u64;
    let family: u16 = unsafe { load(sk, off!(skc_family)) };
    let mut ev = StateEvent {
        header: if comm {
            emit::header(EventKind::State as u32, cookie, base)
        } else {
            emit::header_without_comm(EventKind::State as u32, cookie, base)
        },
        saddr: [0; 16],
        daddr: [0; 16],
        sport: unsafe { load::<u16>(sk, off!(skc_num)) },
        dport: u16::from_be(unsafe { load::<u16>(sk, off!(skc_dport)) }),
        family,
        oldstate,
        newstate,
        rx_queue: 0,
        _pad: 0,
    };
    if newstate == tcp::CLOSE_WAIT {
        // The FIN is already counted in rcv_nxt here (tcp_fin runs after
        // rcv_nxt moved past it), so this is unread data + 1.
        // Reading tcp_sock goes beyond what the verifier lets the typed
        // pointer reach, so it is a probe read, which could fault if the
        // layout were misread: then the event still goes (the state change
        // matters more than the byte count), marked unknown, and the one
        // diagnostic that says which field goes to the agent's log.
        ev.rx_queue = match unsafe {
            (
                read::<u32>(base, off!(tcp_rcv_nxt)),
                read::<u32>(base, off!(tcp_copied_seq)),
            )
        } {
            (Ok(nxt), Ok(copied)) => nxt.wrapping_sub(copied),
            _ => {
                aya_log_ebpf::warn!(
                    ctx,
                    "reading tcp_sock rcv_nxt/copied_seq (offsets {}, {}) faulted: unread bytes at FIN unknown",
                    off!(tcp_rcv_nxt),
                    off!(tcp_copied_seq)
                );
                RX_QUEUE_UNKNOWN
            }
        };
    }
    if family == AF_INET {
        let s: u32 = unsafe { load(sk, off!(skc_rcv_saddr)) };
        let d: u32 = unsafe { load(sk, off!(skc_daddr)) };
        ev.saddr[..4].copy_from_slice(&s.to_ne_bytes());
        ev.daddr[..4].copy_from_slice(&d.to_ne_bytes());
    } else if family == AF_INET6 {
        ev.saddr = unsafe { load_in6(sk, off!(skc_v6_rcv_saddr)) };
        ev.daddr = unsafe { load_in6(sk, off!(skc_v6_daddr)) };
    }
    ev
}

/// A field of the BTF-typed `struct sock` this hook is given, by a plain
/// load: the verifier checks the (load-time constant) offset against the
/// kernel's BTF and the JIT guards the load, so no helper call is needed,
/// unlike `bpf_probe_read_kernel` (each call costs more than the load).
/// Only for fields inside `struct sock`; `tcp_sock` fields lie beyond what
/// the verifier lets a `struct sock *` reach.
#[inline(always)]
pub unsafe fn load<T: Copy>(sk: *const c_void, offset: u32) -> T {
    unsafe { core::ptr::read_volatile((sk as *const u8).add(offset as usize) as *const T) }
}

/// An `in6_addr` field, as two 8-byte loads.
#[inline(always)]
unsafe fn load_in6(sk: *const c_void, offset: u32) -> [u8; 16] {
    let lo: u64 = unsafe { load(sk, offset) };
    let hi: u64 = unsafe { load(sk, offset + 8) };
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&lo.to_ne_bytes());
    a[8..].copy_from_slice(&hi.to_ne_bytes());
    a
}

/// With `--pid`: can this socket be the watched process's? Either it is
/// watched, or the watched process is connecting it (CLOSE -> SYN_SENT runs
/// in its own syscall). Later changes are matched by cookie, whichever task
/// runs them.
#[inline(always)]
fn maybe_watched(cookie: u64, filter: u32, newstate: u8) -> bool {
    maps::WATCH.get_ptr(&cookie).is_some() || (newstate == tcp::SYN_SENT && current_tgid() == filter)
}

/// Adds a TCP socket the watched process is connecting to the watch map.
#[inline(always)]
fn watch_new(cookie: u64, filter: u32, newstate: u8) {
    if newstate != tcp::SYN_SENT || current_tgid() != filter || maps::WATCH.get_ptr(&cookie).is_some() {
        return;
    }
    if maps::WATCH.insert(&cookie, &filter, 0).is_err() {
        maps::count(Counters::State, stats::WATCH_FULL);
    }
}

#[inline(always)]
pub fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}
