//! The current task's user stack, walked by frame pointer from its saved
//! user registers (`bpf_task_pt_regs`), sent as a [`UserStackEvent`] just
//! before the event it belongs to.
//!
//! Why not `bpf_get_stackid(BPF_F_USER_STACK)`: the kernel's walk keeps only
//! return addresses. Naming a JVM's interpreted frames needs two words of
//! each frame (HotSpot keeps the frame's `Method*` at `[fp-24]` and its
//! bytecode pointer at `[fp-64]`), and the words at the user `sp` hold the
//! return address into the caller of a libc syscall wrapper, the frame the
//! kernel's walk always loses. The stack also travels in the ring buffer
//! rather than a stack map, so stacks never run out of map slots; the agent
//! deduplicates them.

use aya_ebpf::{
    cty::c_void,
    helpers::generated::{
        bpf_get_current_task, bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs,
    },
};
use tracer_common::{
    stats, walk_end, EventKind, Header, UserFrame, UserStackEvent, COMPAT_NO_PT_REGS, MAX_USER_FRAMES, SP_WORDS,
    USTACK_WALKED,
};

use crate::{
    catalog,
    config::{self, off},
    fdsock, maps,
    maps::Counters,
    scratch,
};

/// x86_64 `struct pt_regs` (the user registers saved at kernel entry; the
/// layout is ABI, the same as ptrace's `user_regs_struct`): `bp` is at
/// byte 32, `ip` at 128 and `sp` at 152. One read covers bp..=sp.
const REGS_FROM: usize = 32;
const REGS_WORDS: usize = maps::WALK_REGS_WORDS;
const BP: usize = 0;
const IP: usize = (128 - REGS_FROM) / 8;
const SP: usize = (152 - REGS_FROM) / 8;

/// Largest step from one frame pointer to its caller's. A bigger one (or a
/// step down) means the chain is broken: code that keeps data in rbp.
const MAX_FRAME_SPAN: u64 = 1 << 20;

/// One read per frame covers `[fp-64, fp+16)`: the bcp slot (word 0), the
/// `Method*` slot (word 5), the saved frame pointer (8) and the return
/// address (9). The words below `fp` are the callee's frame, mapped
/// whenever `fp` is a real frame pointer.
const WINDOW_BELOW_FP: u64 = 64;
const SLOT_BCP: usize = 0;
const SLOT_METHOD: usize = 5;
const SAVED_FP: usize = 8;
const RET: usize = 9;

/// Walks and sends the current task's user stack for the event whose
/// header is `h`. Returns the value for `h.ustack`: [`USTACK_WALKED`], or a
/// counted stack error (see `scratch::send_built`).
#[inline(always)]
pub fn walk(h: &Header, set: Counters) -> i32 {
    scratch::send_built(&maps::USTACK_SCRATCH, set, USTACK_WALKED, |ev| {
        let (len, _, _) = build(ev, h, set);
        Ok(Some(len))
    })
}

/// Walks the current task's user stack for a socket the kernel follows:
/// sent to the agent's catalogue only if this process's stack with that
/// content is not known there yet. Returns [`STACK_CATALOGUED`] and the
/// content key, or a counted stack error.
#[inline(always)]
pub fn walk_catalogued(h: &Header, set: Counters) -> (i32, u64) {
    // The interpreter slots identify a JVM's interpreted frames; elsewhere
    // they are locals, new in every call, which would make every stack
    // look new. The agent lists the processes it found not to run a JVM.
    let native = maps::NATIVE_PIDS.get_ptr(&h.tgid).is_some();
    catalog::send_once(
        &maps::USTACK_SCRATCH,
        set,
        h.tgid,
        |ev| {
            let (len, with_slots, pcs_only) = build(ev, h, set);
            Ok((len, if native { pcs_only } else { with_slots }))
        },
        |ev| &mut ev.header,
    )
}

/// Fills the record for `h`; returns its valid length and its content key,
/// with and without the frames' interpreter slots.
#[inline(always)]
fn build(ev: &mut UserStackEvent, h: &Header, set: Counters) -> (usize, u64, u64) {
    ev.header = *h;
    ev.header.kind = EventKind::UserStack as u32;
    // SAFETY: see `fill`.
    let (nframes, end, with_slots, pcs_only) = unsafe { fill(&mut ev.frames, &mut ev.sp_words) };
    ev.nframes = nframes;
    ev.end = end;
    if end == walk_end::DEPTH {
        maps::count(set, stats::STACK_WALK_TRUNCATED);
    }
    let n = if nframes as usize > MAX_USER_FRAMES {
        MAX_USER_FRAMES
    } else {
        nframes as usize
    };
    (
        FRAMES_AT + n * core::mem::size_of::<UserFrame>(),
        catalog::mix(with_slots, end as u64),
        catalog::mix(pcs_only, end as u64),
    )
}

/// Where the frames start in a [`UserStackEvent`].
const FRAMES_AT: usize = core::mem::offset_of!(UserStackEvent, frames);

/// `sizeof(struct pt_regs)` on x86_64.
const PT_REGS_SIZE: u64 = 168;

/// Where the current task's user registers were saved at kernel entry.
/// Before Linux 5.15 (no `bpf_task_pt_regs`) that is computed as the kernel
/// does (`task_pt_regs`): the top of the task's kernel stack, less one
/// `pt_regs` (x86_64 keeps no padding above it).
#[inline(always)]
unsafe fn user_regs() -> Option<*const u8> {
    unsafe {
        if config::lacks(COMPAT_NO_PT_REGS) {
            let stack: u64 = fdsock::read(bpf_get_current_task(), off!(task_stack)).ok()?;
            return Some((stack + u64::from(off!(thread_size)) - PT_REGS_SIZE) as *const u8);
        }
        Some(bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8)
    }
}

/// Fills `frames` from the user registers; returns how many are valid, why
/// the walk stopped, and two keys of their content (`catalog::mix` of every
/// frame's pc with and without its interpreter slots; the words at `sp`
/// are left out: they hold the wrapper's locals, new in every call). Both
/// are computed, without a branch, for the verifier's sake.
///
/// Written for the verifier, which follows every iteration of the loop:
/// one helper call and no merging branches per frame (a fallback read that
/// rejoined the loop made its states differ and multiply past the 1M
/// instruction limit). Its working words live in `WALK_SCRATCH`, not on
/// the BPF stack (see there); a helper fills them before they are read.
#[inline(always)]
unsafe fn fill(frames: &mut [UserFrame; MAX_USER_FRAMES], sp_words: &mut [u64; SP_WORDS]) -> (u32, u32, u64, u64) {
    let Some(words) = maps::WALK_SCRATCH.get_ptr_mut(0) else {
        return (0, walk_end::FAULT, 0, 0);
    };
    // SAFETY: a per-CPU map value, used only inside the caller's busy
    // section of `USTACK_SCRATCH` (see `maps::WALK_SCRATCH`).
    let (regs, window) = unsafe { (&mut (*words).regs, &mut (*words).window) };
    // SAFETY: the helper fills `regs` (or fails, and it is not read).
    unsafe {
        let Some(pt) = user_regs() else {
            return (0, walk_end::FAULT, 0, 0);
        };
        if bpf_probe_read_kernel(
            regs.as_mut_ptr() as *mut c_void,
            (REGS_WORDS * 8) as u32,
            pt.add(REGS_FROM) as *const c_void,
        ) != 0
        {
            return (0, walk_end::FAULT, 0, 0);
        }
    }
    // SAFETY: a fault-tolerant read of user memory (zeroed on a fault).
    unsafe { read_user(sp_words, regs[SP]) };
    frames[0].pc = regs[IP];
    frames[0].method_slot = 0;
    frames[0].bcp_slot = 0;
    let mut hash = catalog::mix(catalog::SEED, regs[IP]);
    let mut pcs = hash;
    let mut fp = regs[BP];
    for i in 1..MAX_USER_FRAMES {
        if fp == 0 {
            return (i as u32, walk_end::OUTERMOST, hash, pcs);
        }
        if fp & 7 != 0 || fp < WINDOW_BELOW_FP {
            return (i as u32, walk_end::BAD_FP, hash, pcs);
        }
        // SAFETY: as above; `window` is only read after a successful fill.
        if unsafe { read_user(window, fp - WINDOW_BELOW_FP) } != 0 {
            return (i as u32, walk_end::FAULT, hash, pcs);
        }
        let w = &*window;
        let pc = w[RET];
        if pc == 0 {
            return (i as u32, walk_end::OUTERMOST, hash, pcs);
        }
        frames[i].pc = pc;
        frames[i].method_slot = w[SLOT_METHOD];
        frames[i].bcp_slot = w[SLOT_BCP];
        hash = catalog::mix(catalog::mix(catalog::mix(hash, pc), w[SLOT_METHOD]), w[SLOT_BCP]);
        pcs = catalog::mix(pcs, pc);
        let next = w[SAVED_FP];
        if next <= fp || next - fp > MAX_FRAME_SPAN {
            // A zero `next` is the outermost frame (glibc's _start and
            // thread start clear rbp); anything else a broken chain.
            let end = if next == 0 {
                walk_end::OUTERMOST
            } else {
                walk_end::BAD_FP
            };
            return (i as u32 + 1, end, hash, pcs);
        }
        fp = next;
    }
    (MAX_USER_FRAMES as u32, walk_end::DEPTH, hash, pcs)
}

#[inline(always)]
unsafe fn read_user<T>(dst: &mut T, addr: u64) -> i64 {
    unsafe {
        bpf_probe_read_user(
            dst as *mut T as *mut c_void,
            core::mem::size_of::<T>() as u32,
            addr as *const c_void,
        )
    }
}
