//! Stacks of followed sockets (`follow`), which may be needed long after
//! they were taken: each distinct content is sent once per process to the
//! agent's catalogue, and the socket's record keeps the content key.

use aya_ebpf::{maps::PerCpuArray, EbpfContext};
use tracer_common::{
    stats, Header, StacksTaken, NO_STACK, STACKS_KERNEL, STACKS_OFF, STACKS_SAMPLED_OUT, STACKS_USER, STACK_CATALOGUED,
};

use crate::{
    config, emit, kstack,
    maps::{self, Counters, Scratch, StackContent},
    scratch, ustack,
};

/// FNV-1a's offset basis and prime, over 64-bit words.
pub const SEED: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

#[inline(always)]
pub fn mix(hash: u64, word: u64) -> u64 {
    (hash ^ word).wrapping_mul(PRIME)
}

#[inline(always)]
fn known(tgid: u32, key: u64) -> bool {
    maps::KNOWN_STACKS
        .get_ptr(&StackContent { tgid, _pad: 0, key })
        .is_some()
}

#[inline(always)]
fn remember(tgid: u32, key: u64) {
    let _ = maps::KNOWN_STACKS.insert(&StackContent { tgid, _pad: 0, key }, &1, 0);
}

/// Builds a stack record in `slots` with `build` (its valid length and
/// content key, or a `-errno`) and sends it to the agent's catalogue unless
/// the catalogue already holds `owner`'s stack with that key. Returns
/// [`STACK_CATALOGUED`] and the key, or a counted stack error.
#[inline(always)]
pub fn send_once<T>(
    slots: &PerCpuArray<Scratch<T>>,
    set: Counters,
    owner: u32,
    build: impl FnOnce(&mut T) -> Result<(usize, u64), i32>,
    header: impl FnOnce(&mut T) -> &mut Header,
) -> (i32, u64) {
    let mut key = 0u64;
    let mut sent = false;
    let r = scratch::send_built(slots, set, STACK_CATALOGUED, |record| {
        let (len, k) = build(record)?;
        key = k;
        let h = header(record);
        h.ustack = STACK_CATALOGUED;
        h.kstack = NO_STACK;
        h.cookie = 0;
        h.skaddr = k;
        if known(owner, k) {
            return Ok(None);
        }
        sent = true;
        Ok(Some(len))
    });
    if r == STACK_CATALOGUED && sent {
        remember(owner, key);
    }
    (r, key)
}

/// The current task's stacks for a socket record. `open`: within the
/// process's stack budget (see `emit::take_open_stacks`). `stacks`: false
/// in `close_range`'s loop, which the verifier cannot follow with a walk
/// (or the kernel stack's key loop) inside: no stacks there.
#[inline(always)]
pub fn take<C: EbpfContext>(ctx: &C, h: &Header, set: Counters, open: bool, stacks: bool) -> StacksTaken {
    let mut t = StacksTaken {
        ustack: NO_STACK,
        kstack: NO_STACK,
        ukey: 0,
        kkey: 0,
    };
    let which = config::stacks();
    if !stacks {
        return t;
    }
    if which & STACKS_USER == 0 {
        t.ustack = STACKS_OFF;
        t.kstack = STACKS_OFF;
        return t;
    }
    if open && !emit::within_budget(h.tgid, h.ktime_ns) {
        maps::count(set, stats::STACKS_SAMPLED_OUT);
        t.ustack = STACKS_SAMPLED_OUT;
        t.kstack = STACKS_SAMPLED_OUT;
        return t;
    }
    (t.ustack, t.ukey) = ustack::walk_catalogued(h, set);
    if which & STACKS_KERNEL != 0 {
        (t.kstack, t.kkey) = kstack::capture_catalogued(ctx, h, set);
    }
    t
}
