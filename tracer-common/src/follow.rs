//! Sockets followed in the kernel (default `live`): what the kernel side
//! keeps about each socket until it matters. (The CLOSE_WAIT map holds the
//! [`crate::StateEvent`] that put a socket there.)
//!
//! Why: a connection makes about ten state changes, an accept and two
//! closes, and only a socket that stays in CLOSE_WAIT matters. Sending each
//! to userspace costs several times what following it in the kernel does.

use crate::COMM_LEN;

/// [`SockRecord::opened_by`]: how the socket's owner was learned.
pub const OPENED_BY_CONNECT: u32 = 1;
pub const OPENED_BY_ACCEPT: u32 = 2;

/// The stacks taken for a [`Touch`]: `ustack`/`kstack` are
/// [`crate::STACK_CATALOGUED`] (the content was sent to the agent's
/// catalogue, once per distinct content and process, under `ukey`/`kkey`),
/// or a `Header::ustack` marker or `-errno` saying why there is none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StacksTaken {
    pub ustack: i32,
    pub kstack: i32,
    pub ukey: u64,
    pub kkey: u64,
}

/// A task touching a socket in its own syscall: opening it (connect,
/// accept) or closing an fd to it. `ns == 0`: no such touch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Touch {
    pub ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub comm: [u8; COMM_LEN],
    /// The fd accepted or closed; -1 for a connect.
    pub fd: i32,
    pub cpu: u32,
    pub stacks: StacksTaken,
}

/// Per socket, in the kernel's socket map (by `struct sock` address), from
/// its open until it is destroyed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRecord {
    pub open: Touch,
    /// [`OPENED_BY_CONNECT`], [`OPENED_BY_ACCEPT`] or 0 (opened before
    /// tracing: only a close or the snapshot knows its owner).
    pub opened_by: u32,
    /// [`FOLLOWED`], [`SHARED_CLOSE`].
    pub flags: u32,
}

/// The kernel's socket table (by `struct sock` address) is open addressing
/// over two arrays of the same length: `SOCK_KEYS` (the address, 0: free)
/// and `SOCK_RECORDS`. A slot is claimed with a compare-and-swap on its key
/// and freed by clearing it, so keeping and dropping a socket's record
/// takes no lock (a hash map's update takes a bucket lock with interrupts
/// off, ~450 ns on these VMs). A socket may take any slot of its group of
/// [`SOCK_SLOT_PROBES`]: their keys are adjacent, so looking for a socket
/// (or for a free slot) reads one or two cache lines of keys, not the
/// records (80-byte slots with their keys inside made a miss read ten).
/// A socket whose group is full goes to an overflow hash map.
pub const SOCK_SLOT_PROBES: u32 = 8;

/// The first slot of a socket's group in a table of `mask + 1` slots (a
/// power of two; in a smaller table than a group, the group's slots wrap
/// onto the same few). From the address's low 32 bits only: the verifier
/// lets a program take those of a socket pointer (a 32-bit move), not do
/// arithmetic on the pointer itself. Socket addresses share their lowest
/// bits (slab objects): a multiplicative hash spreads them.
#[inline(always)]
pub fn sock_slot_home(sk: u64, mask: u32) -> u32 {
    group_home(u64::from(sk as u32), mask)
}

/// The first slot of a cookie's group in the kernel's table of followed
/// sockets now in CLOSE_WAIT (`CW_KEYS`, the cookies, 0: free; `CW_EVENTS`,
/// the state changes into it, at the same index), `mask + 1` slots (a
/// power of two), claimed and freed as the socket table's are. The agent
/// scans the keys, which it maps into its memory, without a system call.
#[inline(always)]
pub fn close_wait_home(cookie: u64, mask: u32) -> u32 {
    group_home(cookie, mask)
}

/// The first slot of the group `key` hashes to (multiplicative hashing),
/// in a table of `mask + 1` slots.
#[inline(always)]
fn group_home(key: u64, mask: u32) -> u32 {
    ((key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32) & mask & !(SOCK_SLOT_PROBES - 1)
}

/// The slots of the group starting at `home` (see [`sock_slot_home`],
/// [`close_wait_home`]), for the agent's reads.
pub fn group_slots(home: u32, mask: u32) -> impl Iterator<Item = u32> {
    (0..SOCK_SLOT_PROBES).map(move |i| home.wrapping_add(i) & mask)
}

/// [`SockRecord::flags`]: the socket has stayed in CLOSE_WAIT long enough
/// that the agent may know it: every later state change is sent.
pub const FOLLOWED: u32 = 1;
/// [`SockRecord::flags`]: a close of an fd to it left it open (the file
/// was shared: dup, fork); that close is in the shared-closes map, the
/// evidence that someone else holds it.
pub const SHARED_CLOSE: u32 = 2;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), explicit padding.
    unsafe impl aya::Pod for super::SockRecord {}
    unsafe impl aya::Pod for super::Touch {}
}

const _: () = assert!(core::mem::size_of::<Touch>() == 64);
const _: () = assert!(core::mem::size_of::<SockRecord>() == 72);
