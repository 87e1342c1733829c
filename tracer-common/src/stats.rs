//! Indices into the per-CPU `STATS` counter array. Losses are never silent:
//! every place the kernel side gives up on an event bumps one of these.

/// Records the programs tried to emit (delivered + dropped).
pub const GENERATED: u32 = 0;
/// Records lost because the ring buffer was full.
pub const RINGBUF_DROPS: u32 = 1;
/// `--pid` watch-list insertions that failed (map full).
pub const WATCH_FULL: u32 = 2;
/// An fd the close/accept hooks could not resolve to a socket (read fault).
pub const FD_UNRESOLVED: u32 = 3;

/// `close_range` calls wider than the kernel side scans (256 fds).
pub const CLOSE_RANGE_TRUNCATED: u32 = 4;

/// Stack captures that failed: a stack whose record did not fit the ring
/// buffer, or whose per-CPU scratch record was in use by a preempted
/// program.
pub const STACK_ERRORS: u32 = 5;

/// Open stacks not taken because the process was over its stack budget
/// (`--stack-rate`): a sample, counted, never a silent gap.
pub const STACKS_SAMPLED_OUT: u32 = 6;

/// User stacks cut at `MAX_USER_FRAMES` frames by the eBPF walk.
pub const STACK_WALK_TRUNCATED: u32 = 7;

/// Sockets followed in the kernel whose opener could not be remembered
/// (the socket map was full): a leak of one comes without its owner.
pub const OWNERS_FULL: u32 = 8;

/// CLOSE_WAIT records sent through the ring buffer because the CLOSE_WAIT
/// map was full (nothing is lost: the agent gets the record sooner).
pub const CLOSE_WAIT_SPILLED: u32 = 9;

/// Sockets given no lasting id, the `IDS` map being full (kernels without
/// the cookie helper, [`crate::config::COMPAT_IDS`]): their id may change
/// when something asks the kernel for their cookie, splitting their events.
pub const IDS_FULL: u32 = 10;

pub const COUNT: u32 = 11;
