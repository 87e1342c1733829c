//! Header filling and ring-buffer submission with batched wakeups.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    cty::c_void,
    helpers::{bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns, generated as gen},
    programs::TracePointContext,
    EbpfContext,
};
use tracer_common::{stats, Header, COMM_LEN, NO_STACK, STACKS_KERNEL, STACKS_OFF, STACKS_SAMPLED_OUT, STACKS_USER};

use crate::{config, kstack, maps, maps::Counters, ustack};

/// A field of a syscall tracepoint's record, by a plain load: the verifier
/// allows aligned reads of a tracepoint program's context, where
/// `TracePointContext::read_at` calls `bpf_probe_read_kernel` (a helper
/// call on every syscall the hook sees).
#[inline(always)]
pub fn tp_field(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: `offset` is a constant, 8-byte aligned offset inside the
    // record; the verifier checks the access.
    unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(offset) as *const u64) }
}

/// The monotonic clock, as events carry it.
#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn header(kind: u32, cookie: u64, skaddr: u64) -> Header {
    let mut h = header_without_comm(kind, cookie, skaddr);
    // Straight into the header: aya's wrapper returns the name by value,
    // which the compiler zeroes and copies byte by byte through calls to
    // memset.
    // SAFETY: `comm` is COMM_LEN writable bytes; the helper NUL-pads.
    unsafe { gen::bpf_get_current_comm(h.comm.as_mut_ptr() as *mut c_void, COMM_LEN as u32) };
    h
}

/// A header whose `comm` is left empty: where the current task is not the
/// socket's user (softirq, or the peer's process on loopback), its name
/// says nothing and costs a copy.
#[inline(always)]
pub fn header_without_comm(kind: u32, cookie: u64, skaddr: u64) -> Header {
    let pid_tgid = bpf_get_current_pid_tgid();
    Header {
        kind,
        cpu: unsafe { bpf_get_smp_processor_id() },
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: [0u8; COMM_LEN],
        cookie,
        skaddr,
        ustack: NO_STACK,
        kstack: NO_STACK,
    }
}

/// [`take_stacks`] for where a socket is opened (connect, accept), within
/// the process's stack budget: a stack walk costs ~3 µs, most of what the
/// tracer costs a process that opens thousands of connections a second,
/// and its opens mostly come from a few places anyway. Over the budget the
/// open is marked (and counted) as sampled out.
#[inline(always)]
pub fn take_open_stacks<C: EbpfContext>(ctx: &C, h: &mut Header, set: Counters) {
    if config::stacks() & STACKS_USER != 0 && !within_budget(h.tgid, h.ktime_ns) {
        maps::count(set, stats::STACKS_SAMPLED_OUT);
        h.ustack = STACKS_SAMPLED_OUT;
        h.kstack = STACKS_SAMPLED_OUT;
        return;
    }
    take_stacks(ctx, h, set);
}

/// GCRA: one stack per `1/rate` s on average, bursts of up to `rate`, per
/// process and CPU.
#[inline(always)]
pub fn within_budget(tgid: u32, now: u64) -> bool {
    let rate = config::stack_rate();
    if rate == 0 {
        return true;
    }
    let interval = 1_000_000_000 / rate as u64;
    // Up to `rate` in a burst: a full second's worth.
    let tolerance = interval * (rate as u64 - 1);
    let Some(slot) = maps::STACK_BUDGET.get_ptr_mut(tgid % maps::BUDGET_SLOTS) else {
        return true;
    };
    // SAFETY: a valid per-CPU map value. Opens run in process context (a
    // connect, an accept), one at a time on a CPU: no other writer.
    let b = unsafe { &mut *slot };
    if b.tgid != tgid {
        // Another process's (or no one's) slot: this process starts over.
        b.tgid = tgid;
        b.tat = now + interval;
        return true;
    }
    let t = b.tat.max(now);
    if t - now > tolerance {
        return false;
    }
    b.tat = t + interval;
    true
}

/// Records the current task's user stack (walked and sent ahead of the
/// event, see `ustack`) and kernel stack (`kstack`, likewise) in the header.
/// Only called where the task is the socket's user (its own syscall).
#[inline(always)]
pub fn take_stacks<C: EbpfContext>(ctx: &C, h: &mut Header, set: Counters) {
    let which = config::stacks();
    if which & STACKS_USER == 0 {
        // Marked, so the agent can say why there is no stack.
        h.ustack = STACKS_OFF;
        h.kstack = STACKS_OFF;
        return;
    }
    h.ustack = ustack::walk(h, set);
    if which & STACKS_KERNEL != 0 {
        h.kstack = kstack::capture(ctx, h, set);
    }
}

/// Sends one record. The reader is woken only once `wakeup_bytes` are
/// waiting; otherwise it drains on its own timer. A full ring buffer is a
/// counted drop, never a silent one.
#[inline(always)]
pub fn send<T>(event: &T, set: Counters) {
    maps::count(set, stats::GENERATED);
    let waiting = maps::EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let flags = if waiting >= config::wakeup_bytes() {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if maps::EVENTS.output::<T>(event, flags as u64).is_err() {
        maps::count(set, stats::RINGBUF_DROPS);
    }
}
