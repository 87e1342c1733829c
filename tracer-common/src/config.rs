//! Load-time configuration, written into the eBPF object's read-only globals
//! by the agent before the programs are verified.

/// Byte offsets of the kernel struct fields the programs read, resolved by
/// the agent from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
///
/// Rust eBPF code has no CO-RE relocations, so this table is how one binary
/// works across kernel builds whose struct layouts differ.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    // struct sock_common / struct sock
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_cookie: u32,
    pub sk_protocol: u32,
    // struct tcp_sock (starts with struct sock): receive queue accounting
    pub tcp_rcv_nxt: u32,
    pub tcp_copied_seq: u32,
    // fd -> socket: task_struct.files -> files_struct.fdt -> fdtable.fd[fd]
    // -> file.private_data (struct socket) -> socket.sk
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_f_op: u32,
    pub file_private_data: u32,
    pub socket_file: u32,
    pub socket_sk: u32,
    /// `sock_common.skc_state` (one byte).
    pub skc_state: u32,
    /// `file.f_ref` (6.13+) or `file.f_count`: the file's reference count.
    pub file_ref: u32,
    /// The count's value when exactly one reference is held (0 for
    /// `f_ref`'s file_ref_t, 1 for the older `f_count`).
    pub file_ref_one: u32,
    /// `task_struct.stack`: the task's kernel stack, whose top holds its
    /// saved user registers. Read only where `bpf_task_pt_regs` is missing
    /// ([`COMPAT_NO_PT_REGS`]).
    pub task_stack: u32,
    /// The kernel stack's size (`THREAD_SIZE`), with `task_stack`.
    pub thread_size: u32,
    /// Address of `socket_file_ops` from kallsyms, 0 if hidden: then a file
    /// is taken to be a socket when `socket->file` points back at it.
    pub socket_file_ops: u64,
}

/// Everything else the agent sets at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Only this process's sockets (0 = every process).
    pub filter_tgid: u32,
    /// Which stacks to capture where they are evidence: [`STACKS_USER`]
    /// (the default; a frame-pointer walk, ~3 µs) and [`STACKS_KERNEL`]
    /// (an unwinder walk, ~5 µs). 0 with `--no-stacks`.
    pub stacks: u32,
    /// Wake the reader only once this many bytes are waiting; below it the
    /// reader drains on its own timer. Per-event wakeups cost ~1.5 µs each.
    pub wakeup_bytes: u64,
    /// Open stacks (connect, accept) per process and CPU per second, with a
    /// burst of as many; beyond it opens are sampled out (counted). 0: no
    /// limit.
    pub stack_rate: u32,
    /// Non-zero: sockets are followed in the kernel (default `live`), and
    /// userspace hears only of those that stay in CLOSE_WAIT (see
    /// `follow`). Zero: every event is sent (`--events`, `record`).
    pub follow: u32,
    /// With `follow`: a socket in CLOSE_WAIT this long is one the agent may
    /// have read from the CLOSE_WAIT map, so from then on every change to
    /// it is sent. The agent reads only entries at least this old.
    pub promote_ns: u64,
    /// With `follow`: the socket table's slots less one (a power of two
    /// less one; see [`crate::SOCK_SLOT_PROBES`]).
    pub socket_slots_mask: u32,
    /// With `follow`: the CLOSE_WAIT table's slots less one (a power of
    /// two less one; see [`crate::close_wait_home`]).
    pub close_wait_slots_mask: u32,
    pub _pad: u32,
    /// What the running kernel lacks, as `COMPAT_*` bits: each selects a
    /// fallback path. The object carries both paths; this value is a
    /// load-time constant, so the verifier never visits the path not
    /// taken (and never sees its helper calls or instructions).
    pub compat: u32,
}

/// [`Config::compat`] bit: no `bpf_get_socket_cookie` in `tp_btf` programs
/// (before Linux 5.12). A socket is known by the cookie it held when the
/// kernel side first saw it, or else by its address, kept for its life in
/// the `IDS` map (an id never changes while the socket lives).
pub const COMPAT_IDS: u32 = 1;
/// [`Config::compat`] bit: no BPF_ATOMIC compare-and-exchange (before 5.12):
/// the followed-socket table is the hash map alone.
pub const COMPAT_NO_CMPXCHG: u32 = 2;
/// [`Config::compat`] bit: no `bpf_get_current_task_btf` (before 5.11): the
/// task is walked with probe reads.
pub const COMPAT_NO_TASK_BTF: u32 = 4;
/// [`Config::compat`] bit: no `bpf_task_pt_regs` (before 5.15): the saved
/// user registers are found at the top of the task's kernel stack.
pub const COMPAT_NO_PT_REGS: u32 = 8;
/// [`Config::compat`] bit: no `bpf_loop` (before 5.17): close_range is not
/// followed.
pub const COMPAT_NO_LOOP: u32 = 16;

/// Whether `id` (a [`crate::Header::cookie`]) is a socket's address standing
/// in for its cookie ([`COMPAT_IDS`]): kernel addresses have the top bit
/// set, cookies count up from 1.
pub const fn is_address_id(id: u64) -> bool {
    id >> 63 != 0
}

/// [`Config::stacks`] bit: capture user stacks.
pub const STACKS_USER: u32 = 1;
/// [`Config::stacks`] bit: capture kernel stacks too.
pub const STACKS_KERNEL: u32 = 2;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), explicit padding.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::Config {}
}

const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 104);
const _: () = assert!(core::mem::size_of::<Config>() == 48);
