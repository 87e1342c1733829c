//! Socket ids: the cookie the kernel gives each socket, which the agent
//! and sock_diag (`ss`) know it by.
//!
//! Before Linux 5.12 a `tp_btf` program cannot ask for it
//! (`bpf_get_socket_cookie`), and the cookie a socket holds stays 0 until
//! something asks (sock_diag, `SO_COOKIE`), which can happen at any moment
//! of its life. There (`COMPAT_IDS`) a socket's id is fixed the first time
//! the kernel side sees it: the cookie it holds then, or else its address
//! (kernel addresses have the top bit set, so they never equal a cookie),
//! kept in `IDS` until the socket is destroyed. The agent learns the real
//! cookie of an address-id socket from sock_diag when it gathers evidence.

use aya_ebpf::{cty::c_void, helpers::generated::bpf_get_socket_cookie};
use tracer_common::{stats, COMPAT_IDS};

use crate::{
    config::{self, off},
    fdsock, maps,
    maps::Counters,
    state,
};

/// The id of the BTF-typed socket `sk` (state hook), fixing one if it has
/// none yet.
#[inline(always)]
pub fn of(sk: *const c_void) -> u64 {
    if !config::lacks(COMPAT_IDS) {
        // SAFETY: `sk` is the hook's BTF-typed socket.
        return unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
    }
    let key = sk as u64;
    if let Some(id) = maps::IDS.get_ptr(&key) {
        // SAFETY: a map value, read at once.
        return unsafe { *id };
    }
    // SAFETY: a field of the BTF-typed socket (see `state::load`).
    let held: u64 = unsafe { state::load(sk, off!(skc_cookie)) };
    let id = if held != 0 { held } else { key };
    if maps::IDS.insert(&key, &id, 0).is_err() {
        maps::count(Counters::State, stats::IDS_FULL);
    }
    id
}

/// The id of socket `sk` as far as it is fixed, from a syscall hook: 0 if
/// it has none yet (the agent then knows the socket by `skaddr`).
#[inline(always)]
pub fn known(sk: u64) -> u64 {
    fixed(sk).unwrap_or_else(|| fdsock::held_cookie(sk))
}

/// The id fixed for socket `sk` in `IDS`, on kernels where ids are fixed
/// there; otherwise the cookie the socket holds is its id.
#[inline(always)]
pub fn fixed(sk: u64) -> Option<u64> {
    if !config::lacks(COMPAT_IDS) {
        return None;
    }
    // SAFETY: a map value, read at once.
    maps::IDS.get_ptr(&sk).map(|id| unsafe { *id })
}

/// The socket is destroyed: its address may be reused by another.
#[inline(always)]
pub fn forget(sk: *const c_void) {
    if config::lacks(COMPAT_IDS) {
        let _ = maps::IDS.remove(&(sk as u64));
    }
}
