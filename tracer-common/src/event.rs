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
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::State),
            2 => Some(Self::Accept),
            3 => Some(Self::Close),
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
    /// Ids in the `STACKS` map of the current task's user and kernel stacks,
    /// taken only where the task is known to be the socket's user (connect,
    /// accept, close). [`NO_STACK`] when not taken; another negative value
    /// is the `-errno` of a failed capture (e.g. `-EEXIST`: map full).
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
    /// application, plus one for a FIN. Filled on entering CLOSE_WAIT.
    pub rx_queue: u32,
    pub _pad: u32,
}

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
}

// Layout is the wire format: any change here must be deliberate.
const _: () = assert!(core::mem::size_of::<Header>() == 64);
const _: () = assert!(core::mem::size_of::<StateEvent>() == 112);
const _: () = assert!(core::mem::size_of::<FdEvent>() == 72);
