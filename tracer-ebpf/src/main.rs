//! Kernel side of `tracer`: one module per hook, all feeding one ring buffer.
//!
//! Hooks used (and why these, on machines without kprobes or fentry):
//! - `state`: `tp_btf/inet_sock_set_state`, every TCP state change, with the
//!   socket cookie (`bpf_get_socket_cookie` needs the BTF-typed `sk`).
//! - `accept`: `syscalls:sys_exit_accept{,4}`, binds a passive socket to the
//!   process that accepted it.
//! - `close`: `syscalls:sys_enter_close{,_range}`, ties a close to the
//!   thread and fd that did it.
//! - `ids`: not a hook; how a socket is known (its cookie, or on kernels
//!   before 5.12 an id fixed at first sight).
//! - `follow`: not a hook; what the hooks above do when sockets are
//!   followed in the kernel (default `live`) instead of sent event by event.
//! - `ustack`: not a hook; the user-stack walk the hooks above call where
//!   the task is the socket's user.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no `AtomicU64::fetch_add`.
#![feature(core_intrinsics)]
// `socks::low32`: a 32-bit move, the one way to a socket pointer's bits.
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

mod accept;
mod catalog;
mod close;
mod close_wait;
mod config;
mod emit;
mod fdsock;
mod follow;
mod ids;
mod kstack;
mod maps;
mod scratch;
mod slots;
mod socks;
mod state;
mod ustack;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic; this is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
