//! The table of followed sockets' records (`follow`), by `struct sock`
//! address: open addressing over `SOCK_KEYS` and `SOCK_RECORDS` (arrays),
//! a slot claimed with a compare-and-swap on its key and freed by clearing
//! it (see `tracer_common::SOCK_SLOT_PROBES`). No lock is
//! taken: a hash map's update takes a bucket lock with interrupts off,
//! which `perf` showed to be most of the state and accept hooks' cost.
//!
//! A socket is in one of the `SOCK_SLOT_PROBES` slots of its group, or,
//! when they are all taken, in the overflow hash map `SOCKS` (counted, so
//! that while it is empty nobody looks there).
//!
//! Before Linux 5.12 (no BPF_ATOMIC compare-and-exchange,
//! `COMPAT_NO_CMPXCHG`) the table is the hash map alone, sized by the agent
//! to hold every followed socket.
//!
//! Races: a socket's record is written by its own connect or accept, and
//! read or dropped by its own state changes, which the kernel serialises
//! (they run under the socket's lock or after its last reference). Two
//! sockets only race for a free slot, which the compare-and-swap settles.
//! The agent reads a record long after it was written (the socket has
//! been in CLOSE_WAIT for a while) and checks the key again after reading.

use aya_ebpf::bindings::BPF_NOEXIST;
use tracer_common::{sock_slot_home, SockRecord, SOCK_SLOT_PROBES};

use crate::{
    config, maps,
    slots::{self, claim},
};

/// The key of the `i`th slot of `sk`'s group, and the slot's index.
#[inline(always)]
fn slot(sk: u64, i: u32) -> Option<(*mut u64, u32)> {
    let mask = config::socket_slots_mask();
    slots::in_group(&maps::SOCK_KEYS, sock_slot_home(low32(sk), mask), mask, i)
}

/// The record of slot `index`.
#[inline(always)]
fn record(index: u32) -> Option<*mut SockRecord> {
    maps::SOCK_RECORDS.get_ptr_mut(index)
}

/// The low 32 bits of a socket address, as a plain number. The state
/// hook's `sk` is a pointer to the verifier, which forbids arithmetic on
/// it (the compiler's truncation is a shift) but allows a 32-bit move,
/// whose result is a number.
#[inline(always)]
fn low32(sk: u64) -> u64 {
    let lo: u64;
    // SAFETY: one register move, no memory access.
    unsafe { core::arch::asm!("w2 = w1", in("r1") sk, lateout("r2") lo, options(pure, nomem, nostack)) };
    lo
}

/// Keeps `record` as `sk`'s, replacing any it had. False: no room (its
/// slots and the overflow map are full).
#[inline(always)]
pub fn insert(sk: u64, record: &SockRecord) -> bool {
    if let Some(r) = get(sk) {
        // SAFETY: the socket's own record (see the module's races).
        unsafe { *r = *record };
        return true;
    }
    let used = slots::used();
    for i in 0..SOCK_SLOT_PROBES {
        if !used {
            break;
        }
        let Some((k, index)) = slot(sk, i) else { continue };
        if slots::key(k) == 0 && claim(k, sk) {
            if let Some(r) = self::record(index) {
                // SAFETY: the slot is now this socket's.
                unsafe { *r = *record };
            }
            count_pid_sockets(1);
            return true;
        }
    }
    insert_overflow(sk, record)
}

/// A new entry in the overflow map (`insert` found none for `sk`, and the
/// socket's own changes are serialised): an error means the map is full.
#[inline(always)]
fn insert_overflow(sk: u64, record: &SockRecord) -> bool {
    if maps::SOCKS.insert(&sk, record, u64::from(BPF_NOEXIST)).is_err() {
        return false;
    }
    maps::count_socks(maps::SOCKS_OVERFLOW, 1);
    count_pid_sockets(1);
    true
}

/// `sk`'s record, if it has one.
#[inline(always)]
pub fn get(sk: u64) -> Option<*mut SockRecord> {
    let used = slots::used();
    for i in 0..SOCK_SLOT_PROBES {
        if !used {
            break;
        }
        let Some((k, index)) = slot(sk, i) else { continue };
        if slots::key(k) == sk {
            return record(index);
        }
    }
    if maps::any_socks(maps::SOCKS_OVERFLOW) {
        return maps::SOCKS.get_ptr_mut(&sk);
    }
    None
}

/// Drops `sk`'s record: the socket is destroyed.
#[inline(always)]
pub fn remove(sk: u64) {
    let used = slots::used();
    for i in 0..SOCK_SLOT_PROBES {
        if !used {
            break;
        }
        let Some((k, _)) = slot(sk, i) else { continue };
        if slots::key(k) == sk {
            slots::free(k);
            count_pid_sockets(u64::MAX);
            return;
        }
    }
    if maps::any_socks(maps::SOCKS_OVERFLOW) && maps::SOCKS.remove(&sk).is_ok() {
        maps::count_socks(maps::SOCKS_OVERFLOW, u64::MAX);
        count_pid_sockets(u64::MAX);
    }
}

/// With `--pid`, how many sockets the table holds is counted (see
/// `follow::watched`); host-wide it is never 0, and a counter shared by
/// every CPU would cost more than it saves.
#[inline(always)]
fn count_pid_sockets(delta: u64) {
    if config::filter_tgid() != 0 {
        maps::count_socks(maps::SOCKS_ANY, delta);
    }
}

/// With `--pid`: whether the table may hold any socket.
#[inline(always)]
pub fn any() -> bool {
    maps::any_socks(maps::SOCKS_ANY)
}
