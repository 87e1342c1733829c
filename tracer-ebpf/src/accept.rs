//! `syscalls:sys_exit_accept{,4}`: the fd accept returned, resolved to its
//! socket, in the accepting process. Passive sockets are created in softirq,
//! so this is the first moment their owner is known.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext};
use tracer_common::{stats, EventKind, FdEvent};

use crate::{config, emit, fdsock, follow, ids, maps, maps::Counters};

/// Offset of `long ret` in the `sys_exit_*` tracepoint record.
const RET_OFFSET: usize = 16;

/// Attached to `sys_exit_accept` too (see kernel/hooks.rs): one program,
/// verified once, for both.
#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    handle(&ctx);
    0
}

#[inline(always)]
fn handle(ctx: &TracePointContext) {
    // With --pid, other processes' accepts end here, before any read.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let filter = config::filter_tgid();
    if filter != 0 && tgid != filter {
        return;
    }
    let ret = emit::tp_field(ctx, RET_OFFSET) as i64;
    if ret < 0 {
        return;
    }
    let Some((fds, max)) = fdsock::fd_table() else {
        return;
    };
    let fd = ret as u32;
    let Some(sk) = fdsock::tcp_sock(fds, max, fd) else {
        return;
    };
    if config::follow() && !follow::on_accept(ctx, sk, fd as i32) {
        return;
    }
    let cookie = ids::known(sk);
    if filter != 0 && cookie != 0 && maps::WATCH.insert(&cookie, &tgid, 0).is_err() {
        maps::count(Counters::Syscall, stats::WATCH_FULL);
    }
    let mut header = emit::header(EventKind::Accept as u32, cookie, sk);
    emit::take_open_stacks(ctx, &mut header, Counters::Syscall);
    emit::send(
        &FdEvent {
            header,
            fd: fd as i32,
            _pad: 0,
        },
        Counters::Syscall,
    );
}
