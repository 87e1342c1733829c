//! Followed sockets now in CLOSE_WAIT (`follow`), by cookie: the state
//! change that put each there. The agent reads the ones that stay (with
//! their socket-table record); most stay microseconds.
//!
//! The table is lock-free slots (`slots`): keys in `CW_KEYS`, which the
//! agent maps into its memory and scans, the changes in `CW_EVENTS` at the
//! same index. A hash map's insert and delete each take a bucket lock with
//! interrupts off: with both, on every connection, they were a quarter of
//! the state hook's cost. Before Linux 5.12 (no compare-and-exchange) the
//! table is the `CLOSE_WAIT` hash map.
//!
//! Races: a socket's entry is written and dropped by its own state changes,
//! which the kernel serialises; two sockets only race for a free slot,
//! which the compare-and-swap settles. The agent reads an entry's change
//! between two reads of its key, and takes it only if it carries that
//! cookie (a slot just claimed may still hold its previous change).

use tracer_common::{close_wait_home, StateEvent, SOCK_SLOT_PROBES};

use crate::{config, maps, slots};

/// A socket's entry: its change into CLOSE_WAIT, and its slot's key (null:
/// in the hash map). Not an `Option`: the compiler leaves a `None`'s
/// payload register unset and stores it anyway, and the verifier rejects
/// reading an unset register ("R1 !read_ok", 5.10).
pub struct Entry {
    pub change: *const StateEvent,
    key: *mut u64,
}

/// The key of the `i`th slot of `cookie`'s group, and the slot's index.
#[inline(always)]
fn slot(cookie: u64, i: u32) -> Option<(*mut u64, u32)> {
    let mask = config::close_wait_slots_mask();
    slots::in_group(&maps::CW_KEYS, close_wait_home(cookie, mask), mask, i)
}

/// Keeps `change` as the socket's entry. False: no room.
#[inline(always)]
pub fn insert(cookie: u64, change: &StateEvent) -> bool {
    if !slots::used() {
        return maps::CLOSE_WAIT.insert(&cookie, change, 0).is_ok();
    }
    for i in 0..SOCK_SLOT_PROBES {
        let Some((k, index)) = slot(cookie, i) else { continue };
        if slots::key(k) == 0 && slots::claim(k, cookie) {
            if let Some(c) = maps::CW_EVENTS.get_ptr_mut(index) {
                // SAFETY: the slot is now this socket's.
                unsafe { *c = *change };
            }
            return true;
        }
    }
    false
}

/// The socket's entry, if it has one.
#[inline(always)]
pub fn get(cookie: u64) -> Option<Entry> {
    if cookie == 0 {
        return None;
    }
    if !slots::used() {
        return maps::CLOSE_WAIT.get_ptr(&cookie).map(|c| Entry {
            change: c,
            key: core::ptr::null_mut(),
        });
    }
    for i in 0..SOCK_SLOT_PROBES {
        let Some((k, index)) = slot(cookie, i) else { continue };
        if slots::key(k) == cookie {
            return maps::CW_EVENTS.get_ptr(index).map(|c| Entry { change: c, key: k });
        }
    }
    None
}

/// Drops the socket's entry: it left CLOSE_WAIT.
#[inline(always)]
pub fn remove(cookie: u64, entry: &Entry) {
    if entry.key.is_null() {
        let _ = maps::CLOSE_WAIT.remove(&cookie);
    } else {
        slots::free(entry.key);
    }
}
