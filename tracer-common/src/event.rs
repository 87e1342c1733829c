//! Ring-buffer records. Each starts with a [`Header`]; `Header::kind` says
//! which struct follows.

/// Length of `task_struct::comm`, NUL padded.
pub const COMM_LEN: usize = 16;

/// Event kinds. The numbers are part of the wire and recording format: add
/// new ones at the end, never renumber or reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A TCP state change (`sock:inet_sock_set_state`). Body: [`StateEvent`].
    State = 1,
    /// `accept`/`accept4` returned a TCP socket fd. Body: [`FdEvent`].
    Accept = 2,
    /// `close`/`close_range` is closing a TCP socket fd. Body: [`FdEvent`].
    Close = 3,
    /// The user stack of the task at an accept, connect or close, walked
    /// by frame pointer in eBPF. Sent just before the event it belongs to
    /// (same `tid` and `ktime_ns`), whose `ustack` is [`USTACK_WALKED`].
    /// Consumed by the agent (symbolized while the process lives); never
    /// part of a recording. Body: [`UserStackEvent`].
    UserStack = 4,
    /// The kernel stack of the task at an accept, connect or close
    /// (`--kernel-stacks`), copied by `bpf_get_stack`. Sent just before
    /// the event it belongs to (same `tid` and `ktime_ns`), whose `kstack`
    /// is [`KSTACK_SENT`]. Like [`EventKind::UserStack`], consumed by the
    /// agent and never recorded. Body: [`KernelStackEvent`].
    KernelStack = 5,
    /// The state change that put a followed socket (`Config::follow`) in
    /// CLOSE_WAIT, sent because the CLOSE_WAIT map was full: normally the
    /// agent reads it from that map. Consumed by the agent, which feeds the
    /// events it stands for; never recorded. Body: [`StateEvent`].
    CloseWait = 6,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::State),
            2 => Some(Self::Accept),
            3 => Some(Self::Close),
            4 => Some(Self::UserStack),
            5 => Some(Self::KernelStack),
            6 => Some(Self::CloseWait),
            _ => None,
        }
    }
}

/// Common prefix of every record.
///
/// `tgid`/`tid`/`comm` describe the task that was current when the hook ran.
/// For a state change that is often *not* the socket's owner (softirq, or on
/// loopback the peer's process): the agent decides ownership, never this.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u32,
    pub cpu: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC, nanoseconds.
    pub ktime_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub comm: [u8; COMM_LEN],
    /// Socket cookie: unique per socket for the whole boot (unlike `skaddr`).
    pub cookie: u64,
    /// Kernel address of the `struct sock`; reused after free, so only a hint.
    pub skaddr: u64,
    /// The current task's user and kernel stacks, taken only where the task
    /// is known to be the socket's user (connect, accept, close). In the
    /// ring buffer: [`USTACK_WALKED`] / [`KSTACK_SENT`] (the stack was sent
    /// just before this event), [`NO_STACK`] when not taken, or the
    /// `-errno` of a failed capture. The agent replaces the first two with
    /// the id it gives the stack's content before anything is recorded.
    pub ustack: i32,
    pub kstack: i32,
}

/// Stack id value meaning "no stack was taken for this event".
pub const NO_STACK: i32 = i32::MIN;
/// Stack id value meaning "this event would have had a stack, but stacks
/// were turned off (`--no-stacks`)". Part of the format: never reuse.
pub const STACKS_OFF: i32 = i32::MIN + 1;
/// Stack id value meaning "not taken: the process opened sockets faster
/// than its stack budget (`--stack-rate`)". Part of the format: never reuse.
pub const STACKS_SAMPLED_OUT: i32 = i32::MIN + 2;

/// Stack id value meaning "the user stack was walked in eBPF and sent as a
/// [`UserStackEvent`] just before this event". The agent replaces it with
/// the id it gives that stack before anything is recorded or analysed.
pub const USTACK_WALKED: i32 = i32::MIN + 3;

/// Stack id value meaning "the kernel stack was copied and sent as a
/// [`KernelStackEvent`] just before this event".
pub const KSTACK_SENT: i32 = i32::MIN + 4;

/// Stack id value meaning "the stack was walked for a socket the kernel
/// follows (`Config::follow`) and is in the agent's catalogue under its
/// content key": stack records sent to the catalogue carry this in their
/// header's `ustack`, and their key in `skaddr`. Part of the format.
pub const STACK_CATALOGUED: i32 = i32::MIN + 5;

/// Deepest kernel stack copied: the kernel's own default bound
/// (`kernel.perf_event_max_stack`).
pub const MAX_KERNEL_FRAMES: usize = 127;

/// Deepest user stack the eBPF walk follows; deeper walks are cut and
/// counted (`stats::STACK_WALK_TRUNCATED`).
pub const MAX_USER_FRAMES: usize = 127;

/// Words read at the user stack pointer ([`UserStackEvent::sp_words`]).
pub const SP_WORDS: usize = 8;

/// Why the eBPF frame-pointer walk stopped ([`UserStackEvent::end`]).
pub mod walk_end {
    /// A zero frame pointer or return address: the outermost frame.
    pub const OUTERMOST: u32 = 0;
    /// A frame could not be read: code without frame pointers, or the end.
    pub const FAULT: u32 = 1;
    /// The next frame pointer is not above the current one, or is too far
    /// above it: the chain is broken (code that uses rbp for data).
    pub const BAD_FP: u32 = 2;
    /// [`MAX_USER_FRAMES`](super::MAX_USER_FRAMES) reached: truncated.
    pub const DEPTH: u32 = 3;
}

/// One frame of a walked user stack.
///
/// `method_slot` and `bcp_slot` are the words at `[fp-24]` and `[fp-64]` of
/// the frame pointer `fp` this `pc` was read from (`pc = [fp+8]`). That
/// frame belongs to the *callee* of the code at `pc`, i.e. to the previous
/// entry. HotSpot's interpreter keeps a frame's `Method*` and bytecode
/// pointer in exactly those slots (x86_64, JDK 9+); in other code they are
/// whatever the frame holds, and the agent ignores them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UserFrame {
    pub pc: u64,
    pub method_slot: u64,
    pub bcp_slot: u64,
}

/// A user stack walked in eBPF from the task's saved user registers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserStackEvent {
    /// The same `tgid`, `tid`, `ktime_ns` and `cookie` as the event it
    /// belongs to; `kind` is [`EventKind::UserStack`].
    pub header: Header,
    /// The words at the user stack pointer. At a syscall in a libc wrapper
    /// that has no frame of its own (`connect`, `close`), one of them is
    /// the return address into the wrapper's caller, the frame a
    /// frame-pointer walk skips: `[sp]` when the wrapper keeps nothing on
    /// the stack, a few words up when it does (glibc's cancellable
    /// wrappers in a threaded process). The agent takes the first that
    /// points just after a call instruction; all zero if unreadable.
    pub sp_words: [u64; SP_WORDS],
    /// Valid entries of `frames`: `frames[0].pc` is the user `ip` (slots 0).
    pub nframes: u32,
    /// A [`walk_end`] value.
    pub end: u32,
    pub frames: [UserFrame; MAX_USER_FRAMES],
}

/// A kernel stack, copied by `bpf_get_stack`. Stacks travel by value (as
/// user stacks do) rather than as ids in a stack map: a map shared by
/// every process fills, its buckets collide, and an id freed for reuse
/// could be read back as another stack; a stack in the ring buffer is
/// lost only with the ring buffer itself (counted).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelStackEvent {
    /// The same `tgid`, `tid`, `ktime_ns` and `cookie` as the event it
    /// belongs to; `kind` is [`EventKind::KernelStack`].
    pub header: Header,
    /// Valid entries of `ips`, innermost first.
    pub nframes: u32,
    pub _pad: u32,
    pub ips: [u64; MAX_KERNEL_FRAMES],
}

/// A TCP state change.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateEvent {
    pub header: Header,
    /// IPv4 addresses use the first 4 bytes; network byte order.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u16,
    pub oldstate: u8,
    pub newstate: u8,
    /// `rcv_nxt - copied_seq`: bytes received and not read by the
    /// application, plus one for a FIN. Filled on entering CLOSE_WAIT;
    /// [`RX_QUEUE_UNKNOWN`] if the socket could not be read.
    pub rx_queue: u32,
    pub _pad: u32,
}

/// [`StateEvent::rx_queue`] value meaning "could not be read".
pub const RX_QUEUE_UNKNOWN: u32 = u32::MAX;

/// A socket fd crossing a syscall: returned by accept, or passed to close.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdEvent {
    pub header: Header,
    pub fd: i32,
    pub _pad: u32,
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), every bit pattern valid.
    unsafe impl aya::Pod for super::Header {}
    unsafe impl aya::Pod for super::StateEvent {}
    unsafe impl aya::Pod for super::FdEvent {}
    unsafe impl aya::Pod for super::UserStackEvent {}
    unsafe impl aya::Pod for super::KernelStackEvent {}
}

// Layout is the wire format: any change here must be deliberate.
const _: () = assert!(core::mem::size_of::<Header>() == 64);
const _: () = assert!(core::mem::size_of::<StateEvent>() == 112);
const _: () = assert!(core::mem::size_of::<FdEvent>() == 72);
const _: () = assert!(core::mem::size_of::<KernelStackEvent>() == 72 + 8 * MAX_KERNEL_FRAMES);
const _: () = assert!(core::mem::size_of::<UserStackEvent>() == 72 + 8 * SP_WORDS + 24 * MAX_USER_FRAMES);
