//! The one definition of every type that crosses the kernel/user boundary.
//!
//! Everything here is `#[repr(C)]` with explicit padding and no `bool`, so the
//! eBPF side and the agent agree on layout byte for byte. Event kinds are
//! plain `u32` values that are never reused: a recording written by one
//! version must still decode (or be rejected cleanly) by another.
#![no_std]

pub mod config;
pub mod event;
pub mod follow;
pub mod stats;
pub mod tcp;

pub use config::{
    is_address_id, Config, KernelOffsets, COMPAT_IDS, COMPAT_NO_CMPXCHG, COMPAT_NO_LOOP, COMPAT_NO_PT_REGS,
    COMPAT_NO_TASK_BTF, STACKS_KERNEL, STACKS_USER,
};
pub use event::{
    walk_end, EventKind, FdEvent, Header, KernelStackEvent, StateEvent, UserFrame, UserStackEvent, COMM_LEN,
    KSTACK_SENT, MAX_KERNEL_FRAMES, MAX_USER_FRAMES, NO_STACK, RX_QUEUE_UNKNOWN, SP_WORDS, STACKS_OFF,
    STACKS_SAMPLED_OUT, STACK_CATALOGUED, USTACK_WALKED,
};
pub use follow::{
    close_wait_home, group_slots, sock_slot_home, SockRecord, StacksTaken, Touch, FOLLOWED, OPENED_BY_ACCEPT,
    OPENED_BY_CONNECT, SHARED_CLOSE, SOCK_SLOT_PROBES,
};
