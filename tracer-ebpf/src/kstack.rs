//! The current task's kernel stack (`--kernel-stacks`), copied with
//! `bpf_get_stack` and sent as a [`KernelStackEvent`] just before the event
//! it belongs to. By value, like user stacks (`ustack`): no stack map to
//! fill, collide in or free.

use aya_ebpf::{cty::c_void, helpers::generated::bpf_get_stack, EbpfContext};
use tracer_common::{EventKind, Header, KernelStackEvent, KSTACK_SENT, MAX_KERNEL_FRAMES};

use crate::{catalog, maps, maps::Counters, scratch};

/// Where the instruction pointers start in a [`KernelStackEvent`].
const IPS_AT: usize = core::mem::offset_of!(KernelStackEvent, ips);

/// Copies and sends the kernel stack for the event whose header is `h`.
/// Returns the value for `h.kstack`: [`KSTACK_SENT`], or a counted stack
/// error (see `scratch::send_built`; `-errno` from the helper).
#[inline(always)]
pub fn capture<C: EbpfContext>(ctx: &C, h: &Header, set: Counters) -> i32 {
    scratch::send_built(&maps::KSTACK_SCRATCH, set, KSTACK_SENT, |ev| {
        build(ctx, ev, h).map(|(len, _)| Some(len))
    })
}

/// The kernel stack for a socket the kernel follows: sent to the agent's
/// catalogue (under pid 0) only if its content is not known there yet.
/// Returns [`STACK_CATALOGUED`] and the content key, or a counted error.
#[inline(always)]
pub fn capture_catalogued<C: EbpfContext>(ctx: &C, h: &Header, set: Counters) -> (i32, u64) {
    catalog::send_once(
        &maps::KSTACK_SCRATCH,
        set,
        0,
        |ev| {
            let (len, n) = build(ctx, ev, h)?;
            let mut hash = catalog::SEED;
            for i in 0..MAX_KERNEL_FRAMES {
                if i >= n {
                    break;
                }
                hash = catalog::mix(hash, ev.ips[i]);
            }
            Ok((len, hash))
        },
        |ev| &mut ev.header,
    )
}

/// Fills the record for `h`; returns its valid length and frame count.
#[inline(always)]
fn build<C: EbpfContext>(ctx: &C, ev: &mut KernelStackEvent, h: &Header) -> Result<(usize, usize), i32> {
    ev.header = *h;
    ev.header.kind = EventKind::KernelStack as u32;
    // SAFETY: the helper writes at most the size it is given into the
    // record's array.
    let got = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            ev.ips.as_mut_ptr() as *mut c_void,
            (MAX_KERNEL_FRAMES * 8) as u32,
            0,
        )
    };
    if got < 0 {
        return Err(got as i32);
    }
    let n = (got as usize / 8).min(MAX_KERNEL_FRAMES);
    ev.nframes = n as u32;
    Ok((IPS_AT + n * 8, n))
}
