//! Lock-free slots keyed by a non-zero u64 in an array map (the socket
//! table, `socks`, and the CLOSE_WAIT table, `close_wait`): claimed with a
//! compare-and-swap on the key (0: free), freed by clearing it. Needs
//! BPF_ATOMIC compare-and-exchange (5.12+); before, both tables are their
//! hash maps alone.

use core::intrinsics::{atomic_cxchg, AtomicOrdering};

use aya_ebpf::maps::Array;
use tracer_common::COMPAT_NO_CMPXCHG;

use crate::config;

/// Whether slots are used (they cannot be claimed without
/// compare-and-exchange).
#[inline(always)]
pub fn used() -> bool {
    !config::lacks(COMPAT_NO_CMPXCHG)
}

/// The key of the `i`th slot of the group starting at `home`, in a table
/// of `mask + 1` slots whose keys are `keys`, and the slot's index (where
/// its value is, in the table's other array).
#[inline(always)]
pub fn in_group(keys: &Array<u64>, home: u32, mask: u32, i: u32) -> Option<(*mut u64, u32)> {
    let index = home.wrapping_add(i) & mask;
    keys.get_ptr_mut(index).map(|k| (k, index))
}

/// The key in a slot; other CPUs may write it, hence the volatile read.
#[inline(always)]
pub fn key(k: *mut u64) -> u64 {
    // SAFETY: an 8-byte aligned array map value.
    unsafe { core::ptr::read_volatile(k) }
}

/// Claims a free slot for `key`: whether it is now `key`'s.
#[inline(always)]
pub fn claim(k: *mut u64, key: u64) -> bool {
    // SAFETY: an 8-byte aligned array map value (BPF_ATOMIC cmpxchg).
    unsafe { atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(k, 0, key).1 }
}

/// Frees a slot its key's owner holds.
#[inline(always)]
pub fn free(k: *mut u64) {
    // SAFETY: an array map value; a plain 8-byte store is atomic.
    unsafe { core::ptr::write_volatile(k, 0) };
}
