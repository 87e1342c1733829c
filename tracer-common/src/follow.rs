//! Sockets followed in the kernel (default `live`): what the kernel side
//! keeps about each socket until it matters, and the CLOSE_WAIT record the
//! agent reads when one stays in CLOSE_WAIT.
//!
//! Why: a connection makes about ten state changes, an accept and two
//! closes, and only a socket that stays in CLOSE_WAIT matters. Sending each
//! to userspace costs several times what following it in the kernel does.

use crate::{Header, StateEvent, COMM_LEN};

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
    /// The last close of an fd to it that left the socket open (the file
    /// was shared: dup, fork): the evidence that someone else holds it.
    pub close: Touch,
    /// [`OPENED_BY_CONNECT`], [`OPENED_BY_ACCEPT`] or 0 (opened before
    /// tracing: only a close or the snapshot knows its owner).
    pub opened_by: u32,
    /// Non-zero once the socket has stayed in CLOSE_WAIT long enough that
    /// the agent may know it: every later state change is sent.
    pub followed: u32,
}

/// A socket in CLOSE_WAIT: the state change that put it there (as the
/// full event would have carried it, `rx_queue` included) and what was
/// known of the socket then. In the CLOSE_WAIT map by cookie; sent as
/// [`crate::EventKind::CloseWait`] when the map is full.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseWaitRecord {
    pub event: StateEvent,
    pub sock: SockRecord,
    /// Non-zero when `sock` is valid (the socket was opened while traced).
    pub has_sock: u32,
    pub _pad: u32,
}

impl CloseWaitRecord {
    pub fn header(&self) -> &Header {
        &self.event.header
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), explicit padding.
    unsafe impl aya::Pod for super::SockRecord {}
    unsafe impl aya::Pod for super::CloseWaitRecord {}
}

const _: () = assert!(core::mem::size_of::<Touch>() == 64);
const _: () = assert!(core::mem::size_of::<SockRecord>() == 136);
const _: () = assert!(core::mem::size_of::<CloseWaitRecord>() == 112 + 136 + 8);
