//! The current task's kernel stack (`--kernel-stacks`), copied with
//! `bpf_get_stack` and sent as a [`KernelStackEvent`] just before the event
//! it belongs to. By value, like user stacks (`ustack`): no stack map to
//! fill, collide in or free.

use aya_ebpf::{bindings::BPF_RB_NO_WAKEUP, cty::c_void, helpers::generated::bpf_get_stack, EbpfContext};
use tracer_common::{stats, EventKind, Header, KernelStackEvent, KSTACK_SENT, MAX_KERNEL_FRAMES};

use crate::{maps, maps::Counters};

const ENOSPC: i32 = 28;
const EBUSY: i32 = 16;

/// Where the instruction pointers start in a [`KernelStackEvent`].
const IPS_AT: usize = core::mem::offset_of!(KernelStackEvent, ips);

/// Copies and sends the kernel stack for the event whose header is `h`.
/// Returns the value for `h.kstack`: [`KSTACK_SENT`], or a counted stack
/// error (`-errno` from the helper, `-ENOSPC` when the ring buffer had no
/// room, `-EBUSY` when this CPU's scratch record was in use).
#[inline(always)]
pub fn capture<C: EbpfContext>(ctx: &C, h: &Header, set: Counters) -> i32 {
    let Some(slot) = maps::KSTACK_SCRATCH.get_ptr_mut(0) else {
        maps::count(set, stats::STACK_ERRORS);
        return -ENOSPC;
    };
    // SAFETY: a per-CPU map value, guarded by `busy` as in `ustack::walk`.
    unsafe {
        if (*slot).busy != 0 {
            maps::count(set, stats::STACK_ERRORS);
            return -EBUSY;
        }
        (*slot).busy = 1;
        let ev = &mut (*slot).event;
        ev.header = *h;
        ev.header.kind = EventKind::KernelStack as u32;
        let got = bpf_get_stack(
            ctx.as_ptr(),
            ev.ips.as_mut_ptr() as *mut c_void,
            (MAX_KERNEL_FRAMES * 8) as u32,
            0,
        );
        if got < 0 {
            (*slot).busy = 0;
            maps::count(set, stats::STACK_ERRORS);
            return got as i32;
        }
        let n = (got as usize / 8).min(MAX_KERNEL_FRAMES);
        ev.nframes = n as u32;
        let len = IPS_AT + n * 8;
        let bytes = core::slice::from_raw_parts(ev as *const KernelStackEvent as *const u8, len);
        // The event that follows decides on waking the reader.
        let sent = maps::EVENTS.output::<[u8]>(bytes, BPF_RB_NO_WAKEUP as u64);
        (*slot).busy = 0;
        if sent.is_err() {
            maps::count(set, stats::STACK_ERRORS);
            return -ENOSPC;
        }
    }
    KSTACK_SENT
}
