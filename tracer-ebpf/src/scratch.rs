//! Stack records built in a per-CPU scratch slot, of which only the valid
//! part goes into the ring buffer, just before the event it belongs to:
//! most stacks are a few frames of the 127 a record has room for, and
//! whole records filled the ring in the bursts the stack budget allows.

use aya_ebpf::{bindings::BPF_RB_NO_WAKEUP, maps::PerCpuArray};
use tracer_common::stats;

use crate::{
    maps,
    maps::{Counters, Scratch},
};

const ENOSPC: i32 = 28;
const EBUSY: i32 = 16;

/// Fills this CPU's record in `slots` with `fill`, which returns how many
/// of the record's bytes are valid (or a `-errno`, or `None` when there is
/// nothing to send: the agent already has that content), and sends those
/// bytes.
/// Returns `sent`, or a counted stack error: `fill`'s, `-ENOSPC` when the
/// ring buffer had no room, `-EBUSY` when the slot was in use by a program
/// this one preempted.
#[inline(always)]
pub fn send_built<T>(
    slots: &PerCpuArray<Scratch<T>>,
    set: Counters,
    sent: i32,
    fill: impl FnOnce(&mut T) -> Result<Option<usize>, i32>,
) -> i32 {
    let Some(slot) = slots.get_ptr_mut(0) else {
        maps::count(set, stats::STACK_ERRORS);
        return -ENOSPC;
    };
    // SAFETY: a per-CPU map value; programs that use it run to completion
    // on this CPU once started (migration is disabled), so `busy`, set
    // before the first write and cleared after the last read, keeps a
    // program that preempted another from using the record at once.
    let result = unsafe {
        if (*slot).busy != 0 {
            maps::count(set, stats::STACK_ERRORS);
            return -EBUSY;
        }
        (*slot).busy = 1;
        let record = &mut (*slot).record;
        let result = match fill(record) {
            Ok(None) => sent,
            Ok(Some(len)) => {
                let len = len.min(core::mem::size_of::<T>());
                let bytes = core::slice::from_raw_parts(record as *const T as *const u8, len);
                // The event that follows decides on waking the reader.
                match maps::EVENTS.output::<[u8]>(bytes, BPF_RB_NO_WAKEUP as u64) {
                    Ok(()) => sent,
                    Err(_) => -ENOSPC,
                }
            }
            Err(e) => e,
        };
        (*slot).busy = 0;
        result
    };
    if result != sent {
        maps::count(set, stats::STACK_ERRORS);
    }
    result
}
