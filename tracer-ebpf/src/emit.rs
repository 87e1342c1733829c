//! Header filling and ring-buffer submission with batched wakeups.

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns},
    programs::tracing::StackIdContext,
};
use tracer_common::{stats, Header, COMM_LEN, NO_STACK};

use crate::{config, maps, maps::Counters};

#[inline(always)]
pub fn header(kind: u32, cookie: u64, skaddr: u64) -> Header {
    let pid_tgid = bpf_get_current_pid_tgid();
    Header {
        kind,
        cpu: unsafe { bpf_get_smp_processor_id() },
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]),
        cookie,
        skaddr,
        ustack: NO_STACK,
        kstack: NO_STACK,
    }
}

/// Records the current task's user and kernel stacks in the header. Only
/// called where the task is the socket's user (its own syscall).
#[inline(always)]
pub fn take_stacks<C: StackIdContext>(ctx: &C, h: &mut Header, set: Counters) {
    h.ustack = stack_id(ctx, BPF_F_USER_STACK as u64, set);
    if config::kernel_stacks() {
        h.kstack = stack_id(ctx, 0, set);
    }
}

#[inline(always)]
fn stack_id<C: StackIdContext>(ctx: &C, flags: u64, set: Counters) -> i32 {
    match ctx.get_stackid(&maps::STACKS, flags) {
        Ok(id) => id as i32,
        Err(e) => {
            maps::count(set, stats::STACK_ERRORS);
            e as i32
        }
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
