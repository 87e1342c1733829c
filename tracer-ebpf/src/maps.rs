//! Maps shared by every hook. Each has a fixed bound; overflow is counted.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{stats, KernelStackEvent, SockRecord, StateEvent, Touch, UserStackEvent};

/// All events, to the agent. Resized by the agent at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Per CPU: where a kernel stack (`--kernel-stacks`) is copied before the
/// valid part goes into `EVENTS` (see `scratch::send_built`).
#[map]
pub static KSTACK_SCRATCH: PerCpuArray<Scratch<KernelStackEvent>> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: where the user-stack walk builds its record before the valid
/// part is copied into `EVENTS` (see `scratch::send_built`).
#[map]
pub static USTACK_SCRATCH: PerCpuArray<Scratch<UserStackEvent>> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: the user-stack walk's working words (the saved user registers
/// and one frame's window). Kept off the BPF stack: kernels before 6.13
/// have one 512-byte stack for a program and the functions it calls, and
/// these words on it made the state hook's call chain too deep for 6.1's
/// verifier. Used only inside `USTACK_SCRATCH`'s busy section, which
/// guards it too.
#[map]
pub static WALK_SCRATCH: PerCpuArray<WalkWords> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct WalkWords {
    pub regs: [u64; WALK_REGS_WORDS],
    pub window: [u64; WALK_WINDOW_WORDS],
}

pub const WALK_REGS_WORDS: usize = 16;
pub const WALK_WINDOW_WORDS: usize = 10;

#[repr(C)]
pub struct Scratch<T> {
    /// Non-zero while a program on this CPU is using `record`.
    pub busy: u64,
    pub record: T,
}

/// Per process and CPU: the theoretical arrival time of the process's next
/// open stack (GCRA, see `emit::take_open_stacks`), in slot `tgid %
/// BUDGET_SLOTS`. Per CPU so that a process's threads on different CPUs do
/// not bounce one cache line on every connect; an array, because its
/// lookups are inlined by the JIT, where a hash map's cost more than the
/// budget saves at 20k connects/s. Two processes in one slot take it from
/// each other, each starting over with a full budget: at worst more stacks.
#[map]
pub static STACK_BUDGET: PerCpuArray<Budget> = PerCpuArray::with_max_entries(BUDGET_SLOTS, 0);

pub const BUDGET_SLOTS: u32 = 4096;

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Budget {
    pub tgid: u32,
    pub _pad: u32,
    /// When the next stack is due, on the monotonic clock.
    pub tat: u64,
}

/// Cookies the agent has reported as leaked: their close is evidence (the
/// late close), so it gets a stack. Removed when the socket is destroyed.
#[map]
pub static REPORTED: HashMap<u64, u8> = HashMap::with_max_entries(65536, 0);

/// Loss and volume counters, indexed by `tracer_common::stats`.
/// Two sets: one for the state hook, one for the syscall hooks. A softirq
/// state change can interrupt a syscall hook on the same CPU, so sharing
/// a slot could lose increments; a program never nests with itself.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * stats::COUNT, 0);

/// Which set of `STATS` slots a program counts in.
#[derive(Clone, Copy)]
pub enum Counters {
    State = 0,
    Syscall = stats::COUNT as isize,
}

/// With `--pid`: cookies of sockets owned by the watched process. State
/// changes of these are reported whatever context they run in (softirq, the
/// peer's process). The agent seeds it with sockets that predate it.
/// A plain hash, not an LRU: when full, inserts fail and are counted
/// (WATCH_FULL) instead of silently evicting a watched socket.
#[map]
pub static WATCH: HashMap<u64, u32> = HashMap::with_max_entries(65536, 0);

/// Host-wide with sockets followed: when the start-up snapshot's dump
/// ended (CLOSE_WAIT sockets it found are in `WATCH`; 0 until the agent
/// writes it). A socket that entered CLOSE_WAIT later cannot be there, so
/// the state hook does not look.
#[map]
pub static SNAPSHOT_END: Array<u64> = Array::with_max_entries(1, 0);

/// Whether any socket is marked in `REPORTED` (see `REPORTED_COUNT`).
#[inline(always)]
pub fn reported_any() -> bool {
    REPORTED_COUNT.get(0).is_some_and(|n| *n != 0)
}

#[inline(always)]
pub fn count(set: Counters, index: u32) {
    if let Some(p) = STATS.get_ptr_mut(set as u32 + index) {
        // Per-CPU and per program kind: no other writer can interleave.
        unsafe { *p += 1 };
    }
}

/// Followed sockets (`follow`): who opened each (connect, accept), by
/// `struct sock` address, in an open-addressed table (see `socks`): the
/// slots' keys (0: free). Sized by the agent (a power of two). Mappable
/// only so that its values start on a page: a group of slots' keys is then
/// one cache line.
#[map]
pub static SOCK_KEYS: Array<u64> = Array::with_max_entries(1 << 17, BPF_F_MMAPABLE);

/// The records of the slots in `SOCK_KEYS`, at the same index.
#[map]
pub static SOCK_RECORDS: Array<SockRecord> = Array::with_max_entries(1 << 17, 0);

/// Followed sockets whose slots in `SOCK_KEYS` were all taken. Full:
/// counted (`OWNERS_FULL`). Sized by the agent.
#[map]
pub static SOCKS: HashMap<u64, SockRecord> = HashMap::with_max_entries(16384, 0);

/// Socket-table counts: [`SOCKS_ANY`], with `--pid` only, how many sockets
/// the table holds (while none, a state change of a socket not in the
/// watch list is another process's, known without looking); and
/// [`SOCKS_OVERFLOW`], how many `SOCKS` holds (while none, nobody looks
/// there).
#[map]
pub static SOCKS_COUNT: Array<u64> = Array::with_max_entries(2, 0);

pub const SOCKS_ANY: u32 = 0;
pub const SOCKS_OVERFLOW: u32 = 1;

/// Whether `SOCKS_COUNT[slot]` is not 0.
#[inline(always)]
pub fn any_socks(slot: u32) -> bool {
    SOCKS_COUNT.get(slot).is_some_and(|n| *n != 0)
}

/// Adds `delta` (wrapping: `u64::MAX` is -1) to `SOCKS_COUNT[slot]`.
/// Atomic: every CPU's hooks update it.
#[inline(always)]
pub fn count_socks(slot: u32, delta: u64) {
    if let Some(p) = SOCKS_COUNT.get_ptr_mut(slot) {
        // SAFETY: an 8-byte aligned array value. The result is unused, so
        // this is the classic atomic add (BPF_XADD) every kernel's verifier
        // accepts; the BPF target has no `AtomicU64::fetch_add`.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, delta) };
    }
}

/// Followed sockets: the last close of an fd that left the socket open (a
/// shared file), by `struct sock` address. Rare; flagged in the socket's
/// record (`SHARED_CLOSE`).
#[map]
pub static SHARED_CLOSES: HashMap<u64, Touch> = HashMap::with_max_entries(16384, 0);

/// Followed sockets now in CLOSE_WAIT (see `close_wait`): the slots' keys,
/// cookies (0: free), which the agent maps into its memory. Sized by the
/// agent (a power of two). Full: the change goes through the ring buffer
/// instead (`CLOSE_WAIT_SPILLED`).
#[map]
pub static CW_KEYS: Array<u64> = Array::with_max_entries(16384, BPF_F_MMAPABLE);

/// The changes into CLOSE_WAIT of the slots in `CW_KEYS`, at the same index.
#[map]
pub static CW_EVENTS: Array<StateEvent> = Array::with_max_entries(16384, 0);

/// The CLOSE_WAIT table before Linux 5.12 (no compare-and-exchange to
/// claim slots with), by cookie; one entry where slots are used.
#[map]
pub static CLOSE_WAIT: HashMap<u64, StateEvent> = HashMap::with_max_entries(16384, 0);

/// How many sockets the agent has marked in `REPORTED` and not yet seen
/// closed (slot 0, written by the agent): while 0, a close that does not
/// share its file needs no look at the socket at all.
#[map]
pub static REPORTED_COUNT: Array<u64> = Array::with_max_entries(1, 0);

/// Socket address -> the socket's id, on kernels without the cookie helper
/// in `tp_btf` programs (see `ids`). Full: counted (`IDS_FULL`).
#[map]
pub static IDS: HashMap<u64, u64> = HashMap::with_max_entries(65536, 0);

/// Stack contents the agent's catalogue holds, per process (pid 0: kernel
/// stacks). An LRU: forgetting one only sends that content again.
#[map]
pub static KNOWN_STACKS: LruHashMap<StackContent, u8> = LruHashMap::with_max_entries(16384, 0);

/// Processes the agent found not to run a JVM (pid -> 1): their stacks'
/// catalogue keys leave out the interpreter slots (see `ustack`).
#[map]
pub static NATIVE_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(16384, 0);

#[derive(Clone, Copy)]
#[repr(C)]
pub struct StackContent {
    pub tgid: u32,
    pub _pad: u32,
    pub key: u64,
}
