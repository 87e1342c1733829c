//! Read-only globals written by the agent before load (see
//! `tracer_common::config`). Read with `read_volatile` so the compiler
//! cannot fold in the zero placeholder values.

use tracer_common::{Config, KernelOffsets};

#[unsafe(no_mangle)]
pub(crate) static OFFSETS: KernelOffsets = unsafe { core::mem::zeroed() };

#[unsafe(no_mangle)]
static CONFIG: Config = unsafe { core::mem::zeroed() };

/// `off!(field)`: the offset of `field` on the running kernel.
macro_rules! off {
    ($field:ident) => {
        $crate::config::volatile(&$crate::config::OFFSETS.$field)
    };
}
pub(crate) use off;

#[inline(always)]
pub fn volatile<T: Copy>(v: &T) -> T {
    // SAFETY: a valid reference to a global.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
pub fn filter_tgid() -> u32 {
    volatile(&CONFIG.filter_tgid)
}

#[inline(always)]
pub fn stacks() -> u32 {
    volatile(&CONFIG.stacks)
}

#[inline(always)]
pub fn stack_rate() -> u32 {
    volatile(&CONFIG.stack_rate)
}

#[inline(always)]
pub fn wakeup_bytes() -> u64 {
    volatile(&CONFIG.wakeup_bytes)
}

/// Sockets are followed in the kernel (see `follow`).
#[inline(always)]
pub fn follow() -> bool {
    volatile(&CONFIG.follow) != 0
}

#[inline(always)]
pub fn promote_ns() -> u64 {
    volatile(&CONFIG.promote_ns)
}

/// Whether the running kernel lacks what `bit` (a `COMPAT_*` bit) stands
/// for, and its fallback is to be taken. A load-time constant: the
/// verifier follows only the path taken.
#[inline(always)]
pub fn lacks(bit: u32) -> bool {
    volatile(&CONFIG.compat) & bit != 0
}

/// The socket table's slots less one (see `socks`).
#[inline(always)]
pub fn socket_slots_mask() -> u32 {
    volatile(&CONFIG.socket_slots_mask)
}

/// The CLOSE_WAIT table's slots less one (see `close_wait`).
#[inline(always)]
pub fn close_wait_slots_mask() -> u32 {
    volatile(&CONFIG.close_wait_slots_mask)
}
