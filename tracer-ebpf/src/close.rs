//! `syscalls:sys_enter_close` and `sys_enter_close_range`: which thread
//! closed which socket fd, and when. Runs before the fd is released, so the
//! fd still resolves to its socket.
//!
//! A close does not always end the socket (another process may hold a dup);
//! the state hook shows whether it did.

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_loop},
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};
use tracer_common::{stats, EventKind, FdEvent, COMPAT_NO_LOOP};

use crate::{config, emit, fdsock, follow, ids, maps, maps::Counters};

const FD_OFFSET: usize = 16;
const MAX_FD_OFFSET: usize = 24;
const FLAGS_OFFSET: usize = 32;
/// `CLOSE_RANGE_CLOEXEC`: only marks fds close-on-exec, closes nothing.
const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;
/// fds examined per `close_range` call; the rest are counted as truncated.
/// The loop is `bpf_loop` (5.17+), whose body the verifier checks once, so
/// the bound costs nothing at load time. (An open-coded loop is verified
/// once per iteration: 256 of them took 6.1's verifier past its 1M
/// instruction limit, and 28 s under qemu.)
const CLOSE_RANGE_SCAN: u32 = 4096;

#[tracepoint(category = "syscalls", name = "sys_enter_close")]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    if !wanted() {
        return 0;
    }
    let fd = emit::tp_field(&ctx, FD_OFFSET);
    if let Some((fds, max)) = fdsock::fd_table() {
        report(&ctx, fds, max, fd as u32, true);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_close_range")]
pub fn sys_enter_close_range(ctx: TracePointContext) -> u32 {
    // Not attached there (the agent says so); this keeps the verifier from
    // the helper call.
    if config::lacks(COMPAT_NO_LOOP) || !wanted() {
        return 0;
    }
    let (first, last, flags) = (
        emit::tp_field(&ctx, FD_OFFSET),
        emit::tp_field(&ctx, MAX_FD_OFFSET),
        emit::tp_field(&ctx, FLAGS_OFFSET),
    );
    if flags & CLOSE_RANGE_CLOEXEC != 0 {
        return 0;
    }
    let Some((fds, max)) = fdsock::fd_table() else {
        return 0;
    };
    let first = first as u32;
    let last = (last as u32).min(max.saturating_sub(1));
    if last < first {
        return 0;
    }
    let span = last - first;
    let mut range = Range { fds, max, first };
    // SAFETY: `close_one` has the callback signature bpf_loop expects, and
    // `range` outlives the call.
    unsafe {
        bpf_loop(
            span.min(CLOSE_RANGE_SCAN - 1) + 1,
            close_one as *const () as *mut c_void,
            &mut range as *mut Range as *mut c_void,
            0,
        );
    }
    if span >= CLOSE_RANGE_SCAN {
        maps::count(Counters::Syscall, stats::CLOSE_RANGE_TRUNCATED);
    }
    0
}

/// What `close_one` needs of its `close_range` call.
#[repr(C)]
struct Range {
    fds: u64,
    max: u32,
    first: u32,
}

/// `bpf_loop`'s body: the `index`th fd of the range. No stacks here (a
/// close by close_range has "not captured for this event"): the callback
/// has no program context to take a kernel stack with, and the user-stack
/// walk's own loop inside this one is more than the verifier follows.
extern "C" fn close_one(index: u64, range: *mut c_void) -> i64 {
    // SAFETY: the `Range` the program passed to bpf_loop.
    let r = unsafe { &*(range as *const Range) };
    report(&NoContext, r.fds, r.max, r.first.wrapping_add(index as u32), false);
    0
}

/// Stands for the program context where there is none (see `close_one`):
/// only paths that take no stacks are given it.
struct NoContext;

impl EbpfContext for NoContext {
    fn as_ptr(&self) -> *mut c_void {
        core::ptr::null_mut()
    }
}

#[inline(always)]
fn wanted() -> bool {
    let filter = config::filter_tgid();
    filter == 0 || (bpf_get_current_pid_tgid() >> 32) as u32 == filter
}

#[inline(always)]
fn report<C: EbpfContext>(ctx: &C, fds: u64, max: u32, fd: u32, user_stacks: bool) {
    if fd >= max {
        return;
    }
    let followed = config::follow();
    // Followed sockets: a close that releases the file releases the socket,
    // and its state changes say the rest. Only a close that leaves it open
    // (a shared file) or a reported leak's close matters, so most closes
    // end here, before the socket is looked at.
    let shared = fdsock::file_shared(fds, fd);
    if followed && !shared && !maps::reported_any() {
        return;
    }
    let Some(sk) = fdsock::tcp_sock(fds, max, fd) else {
        return;
    };
    let cookie = ids::known(sk);
    let reported = maps::REPORTED.get_ptr(&cookie).is_some();
    if followed && !reported && !(shared && follow::on_shared_close(ctx, sk, cookie, fd as i32, user_stacks)) {
        return;
    }
    let mut header = emit::header(EventKind::Close as u32, cookie, sk);
    // Stacks cost a frame-pointer walk and a hash each; a close gets one
    // only when it is evidence: the late close of a reported leak, or a
    // close that releases an fd while the socket stays open (the file is
    // shared after dup or fork) and is or may become a leak.
    if reported || shared {
        if user_stacks {
            emit::take_stacks(ctx, &mut header, Counters::Syscall);
        }
    }
    emit::send(
        &FdEvent {
            header,
            fd: fd as i32,
            _pad: 0,
        },
        Counters::Syscall,
    );
}
