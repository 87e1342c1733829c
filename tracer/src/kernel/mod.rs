//! Loading, configuring and attaching the eBPF programs, and reading what
//! they send.

mod close_wait;
pub mod compat;
pub mod hooks;
pub mod offsets;
mod socket_table;
pub mod tracefs;
pub mod verifier;

use std::os::fd::{AsFd, AsRawFd, RawFd};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};
use tracer_common::{
    stats, Config, SockRecord, StateEvent, Touch, COMPAT_IDS, COMPAT_NO_CMPXCHG, STACKS_KERNEL, STACKS_USER,
};

use hooks::{Attach, HOOKS};
use verifier::Rejected;

/// The compiled eBPF object, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

pub struct LoadOptions {
    pub filter_tgid: Option<u32>,
    pub ring_bytes: u32,
    pub wakeup_bytes: u64,
    /// Bounds of the `--pid` watch list and of the reported-leaks map.
    pub watch_entries: u32,
    pub reported_entries: u32,
    pub close_wait_entries: u32,
    pub socket_entries: u32,
    pub kernel_stacks: bool,
    pub user_stacks: bool,
    pub stack_rate: u32,
    /// Sockets are followed in the kernel (default `live`); 0 to send every
    /// event. With it, the age past which a CLOSE_WAIT socket is read.
    pub follow: Option<u64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct HookStatus {
    pub hook: &'static str,
    pub attached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<&'static str>,
}

/// Kernel-side totals, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelStats {
    pub generated: u64,
    pub ringbuf_drops: u64,
    /// `--pid` watch-list insertions that failed, the map being full: by
    /// the kernel side (new sockets) or the agent (sockets that predate it).
    pub watch_full: u64,
    /// Leaks the agent could not mark as reported in the kernel, the map
    /// being full: their late close comes without a stack.
    #[serde(default)]
    pub reported_full: u64,
    pub fd_unresolved: u64,
    pub close_range_truncated: u64,
    pub stack_errors: u64,
    /// Open stacks not taken: over the process's `--stack-rate` budget.
    #[serde(default)]
    pub stacks_sampled_out: u64,
    /// User stacks deeper than the eBPF walk follows (`MAX_USER_FRAMES`):
    /// their outermost frames are cut, and each says so.
    #[serde(default)]
    pub stack_walk_truncated: u64,
    /// Sockets followed in the kernel whose opener could not be remembered
    /// (the kernel's socket map was full): their leaks come without owner.
    #[serde(default)]
    pub owners_full: u64,
    /// CLOSE_WAIT records sent through the ring buffer because the
    /// kernel's CLOSE_WAIT map was full (not a loss).
    #[serde(default)]
    pub close_wait_spilled: u64,
    /// Sockets the kernel side could fix no id for, its id map being full
    /// (kernels before 5.12 only): their events may split between two ids.
    #[serde(default)]
    pub ids_full: u64,
    /// Hook runs the kernel skipped because the same program was already
    /// running on that CPU (a state change in softirq interrupting one in
    /// a syscall): each a state change, accept or close never seen. The
    /// kernel's own count (`recursion_misses` of every program).
    #[serde(default)]
    pub hook_misses: u64,
}

impl KernelStats {
    /// Whether anything was lost since `before`: the counters a `loss`
    /// line reports (sampling by `--stack-rate` is by design, not a loss).
    pub fn lost_more_than(&self, before: &KernelStats) -> bool {
        self.ringbuf_drops > before.ringbuf_drops
            || self.stack_errors > before.stack_errors
            || self.watch_full > before.watch_full
            || self.reported_full > before.reported_full
            || self.fd_unresolved > before.fd_unresolved
            || self.close_range_truncated > before.close_range_truncated
            || self.owners_full > before.owners_full
            || self.ids_full > before.ids_full
            || self.hook_misses > before.hook_misses
    }
}

pub struct Kernel {
    // Keeps programs and links alive.
    _ebpf: Ebpf,
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub events: RingBuf<MapData>,
    stats: PerCpuArray<MapData, u64>,
    watch: HashMap<MapData, u64, u32>,
    reported: HashMap<MapData, u64, u8>,
    close_wait: close_wait::CloseWaitTable,
    sockets: socket_table::SocketTable,
    reported_count: Array<MapData, u64>,
    snapshot_end: Array<MapData, u64>,
    known_stacks: HashMap<MapData, [u64; 2], u8>,
    native_pids: HashMap<MapData, u32, u8>,
    /// Agent-side insertions into `watch` and `reported` that failed.
    watch_full: u64,
    reported_full: u64,
    pub hooks: Vec<HookStatus>,
    /// The fallbacks taken for what this kernel lacks.
    pub fallbacks: Vec<compat::FallbackStatus>,
    /// The loaded programs' fds, whose fdinfo has the kernel's count of
    /// skipped runs.
    program_fds: Vec<RawFd>,
    /// That count as `stop` found it, before the programs (and their fds)
    /// went.
    hook_misses_at_stop: Option<u64>,
}

/// The state hook was rejected for something the kernel lacks that a
/// fallback avoids: load again with it.
#[derive(Debug)]
struct NeedsFallback(u32);

impl std::fmt::Display for NeedsFallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the kernel needs fallback {:#x}", self.0)
    }
}

impl std::error::Error for NeedsFallback {}

impl Kernel {
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        // Parsed, used and dropped before aya parses the same BTF again: the
        // two parsed copies together would set the agent's peak memory.
        let offs = offsets::resolve(&offsets::load_btf()?)?;
        let btf = aya::Btf::from_sys_fs().context("cannot read kernel BTF")?;
        raise_memlock();
        let mut compat = compat::probe();
        let (mut ebpf, hooks, tables) = loop {
            match load_and_attach(opts, &offs, &btf, compat) {
                Ok(loaded) => break loaded,
                Err(e) => match e.downcast_ref::<NeedsFallback>() {
                    Some(NeedsFallback(bit)) => {
                        log::info!("the state hook needs a fallback on this kernel ({e}); loading again");
                        compat |= bit;
                    }
                    None => return Err(e),
                },
            }
        };
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!("eBPF-side diagnostics will not be shown: {e}");
                None
            }
        };

        // The parsed kernel BTF (~40 MiB here) is needed only to load and
        // attach: freed before the ring buffer is mapped (16 MiB resident,
        // its data pages mapped twice), so the two never add up in the
        // agent's peak memory.
        drop(btf);
        let program_fds = ebpf
            .programs()
            .filter_map(|(_, p)| p.fd().ok().map(|fd| fd.as_fd().as_raw_fd()))
            .collect();
        let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map")?)?;
        let stats = PerCpuArray::try_from(ebpf.take_map("STATS").context("STATS map")?)?;
        let watch = HashMap::try_from(ebpf.take_map("WATCH").context("WATCH map")?)?;
        let reported = HashMap::try_from(ebpf.take_map("REPORTED").context("REPORTED map")?)?;
        let close_wait = close_wait::CloseWaitTable::new(
            ebpf.take_map("CW_KEYS").context("CW_KEYS map")?,
            ebpf.take_map("CW_EVENTS").context("CW_EVENTS map")?,
            ebpf.take_map("CLOSE_WAIT").context("CLOSE_WAIT map")?,
            tables.slots,
            tables.close_wait_slots_mask,
        )?;
        let sockets = socket_table::SocketTable::take(&mut ebpf, tables.socket_slots_mask)?;
        let reported_count = Array::try_from(ebpf.take_map("REPORTED_COUNT").context("REPORTED_COUNT map")?)?;
        let snapshot_end = Array::try_from(ebpf.take_map("SNAPSHOT_END").context("SNAPSHOT_END map")?)?;
        let known_stacks = HashMap::try_from(ebpf.take_map("KNOWN_STACKS").context("KNOWN_STACKS map")?)?;
        let native_pids = HashMap::try_from(ebpf.take_map("NATIVE_PIDS").context("NATIVE_PIDS map")?)?;
        Ok(Self {
            _ebpf: ebpf,
            _logger: logger,
            events,
            stats,
            watch,
            reported,
            close_wait,
            sockets,
            reported_count,
            snapshot_end,
            known_stacks,
            native_pids,
            watch_full: 0,
            reported_full: 0,
            hooks,
            fallbacks: compat::statuses(compat),
            program_fds,
            hook_misses_at_stop: None,
        })
    }

    /// Detaches every program. Afterwards no event is generated, so what is
    /// left in the ring buffer is the rest: drained, the counters balance
    /// exactly (delivered + dropped = generated).
    pub fn stop(&mut self) {
        self.hook_misses_at_stop = Some(self.hook_misses());
        // Once per program: one may serve several hooks.
        let mut unloaded = std::collections::HashSet::new();
        for hook in HOOKS.iter().filter(|h| unloaded.insert(h.program)) {
            let Some(prog) = self._ebpf.program_mut(hook.program) else {
                continue;
            };
            let r = match hook.attach {
                Attach::BtfTracepoint(_) => <&mut BtfTracePoint>::try_from(prog)
                    .map_err(anyhow::Error::from)
                    .and_then(|p| Ok(p.unload()?)),
                Attach::Tracepoint(..) => <&mut TracePoint>::try_from(prog)
                    .map_err(anyhow::Error::from)
                    .and_then(|p| Ok(p.unload()?)),
            };
            if let Err(e) = r {
                log::debug!("detaching {}: {e:#}", hook.program);
            }
        }
    }

    /// Runs of the programs the kernel skipped so far (see
    /// [`KernelStats::hook_misses`]).
    fn hook_misses(&self) -> u64 {
        self.program_fds.iter().map(|&fd| recursion_misses(fd)).sum()
    }

    /// Marks a socket as reported leaked, so its eventual close is captured
    /// with a stack. A full map only loses that stack (counted).
    pub fn mark_reported(&mut self, cookie: u64) {
        if self.reported.insert(cookie, 1, 0).is_err() {
            self.reported_full += 1;
        }
    }

    /// Adds a socket to the `--pid` watch list (sockets that predate us).
    /// A full map is counted, not fatal: that socket's state changes in
    /// other contexts (softirq) are missed, and `watch_full` says so.
    pub fn watch(&mut self, cookie: u64, tgid: u32) {
        if self.watch.insert(cookie, tgid, 0).is_err() {
            self.watch_full += 1;
        }
    }

    pub fn stats(&self) -> Result<KernelStats> {
        // Two sets of slots (state hook, syscall hooks): add both.
        let sum = |i: u32| -> Result<u64> {
            let mut total = 0;
            for slot in [i, i + stats::COUNT] {
                total += self.stats.get(&slot, 0)?.iter().sum::<u64>();
            }
            Ok(total)
        };
        Ok(KernelStats {
            generated: sum(stats::GENERATED)?,
            ringbuf_drops: sum(stats::RINGBUF_DROPS)?,
            watch_full: sum(stats::WATCH_FULL)? + self.watch_full,
            reported_full: self.reported_full,
            fd_unresolved: sum(stats::FD_UNRESOLVED)?,
            close_range_truncated: sum(stats::CLOSE_RANGE_TRUNCATED)?,
            stack_errors: sum(stats::STACK_ERRORS)?,
            stacks_sampled_out: sum(stats::STACKS_SAMPLED_OUT)?,
            stack_walk_truncated: sum(stats::STACK_WALK_TRUNCATED)?,
            owners_full: sum(stats::OWNERS_FULL)?,
            close_wait_spilled: sum(stats::CLOSE_WAIT_SPILLED)?,
            ids_full: sum(stats::IDS_FULL)?,
            hook_misses: self.hook_misses_at_stop.unwrap_or_else(|| self.hook_misses()),
        })
    }

    /// Cookies of the followed sockets now in CLOSE_WAIT (the kernel sends
    /// every later change of those at least `promote_ns` old).
    pub fn close_wait_cookies(&self) -> Vec<u64> {
        self.close_wait.cookies()
    }

    /// The change that put a followed socket in CLOSE_WAIT; None once it has
    /// left it.
    pub fn close_wait_record(&self, cookie: u64) -> Option<StateEvent> {
        self.close_wait.get(cookie)
    }

    /// What the kernel side keeps of a followed socket: its opener, and the
    /// last close of an fd to it that left it open.
    pub fn socket_record(&self, skaddr: u64) -> (Option<SockRecord>, Option<Touch>) {
        self.sockets.record(skaddr)
    }

    /// Tells the close hook how many sockets are marked reported (while
    /// none is, it skips most closes without looking at the socket).
    pub fn set_reported_count(&mut self, n: u64) {
        if let Err(e) = self.reported_count.set(0, n, 0) {
            log::warn!("cannot update the reported-leak count: {e}");
        }
    }

    /// Tells the state hook when the start-up snapshot's dump ended (kernel
    /// clock): the sockets it found in CLOSE_WAIT are in the watch list,
    /// and no socket that entered CLOSE_WAIT later can be.
    pub fn set_snapshot_end(&mut self, ns: u64) {
        if let Err(e) = self.snapshot_end.set(0, ns, 0) {
            log::warn!("cannot tell the kernel side when the snapshot ended: {e}");
        }
    }

    /// Marks a process as running no JVM (see `NATIVE_PIDS`), or unmarks
    /// it once it has exited (its pid may come back as a JVM). A full map
    /// only costs the process more stacks sent.
    pub fn mark_native(&mut self, pid: u32, native: bool) {
        let _ = if native {
            self.native_pids.insert(pid, 1, 0)
        } else {
            self.native_pids.remove(&pid)
        };
    }

    /// Empties the kernel's list of stacks the agent's catalogue holds, so
    /// that each is sent again when next taken.
    pub fn forget_known_stacks(&mut self) {
        let keys: Vec<[u64; 2]> = self.known_stacks.keys().flatten().collect();
        for k in keys {
            let _ = self.known_stacks.remove(&k);
        }
    }

    pub fn flush_logs(&mut self) {
        if let Some(l) = self._logger.as_mut() {
            l.flush();
        }
    }

    pub fn ring_fd(&self) -> i32 {
        self.events.as_raw_fd()
    }
}

/// How the kernel side's tables were sized.
struct Tables {
    /// Lock-free slots are used (else the hash maps alone).
    slots: bool,
    socket_slots_mask: u32,
    close_wait_slots_mask: u32,
}

/// Loads the object configured for `compat` (what this kernel lacks) and
/// attaches every hook; with the hooks' status and the tables' sizes.
fn load_and_attach(
    opts: &LoadOptions,
    offs: &tracer_common::KernelOffsets,
    btf: &aya::Btf,
    compat: u32,
) -> Result<(Ebpf, Vec<HookStatus>, Tables)> {
    // Without compare-and-exchange the table is the overflow map alone,
    // sized for every socket; the slot array is left one entry.
    let slots_used = compat & COMPAT_NO_CMPXCHG == 0;
    let socket_slots = if slots_used {
        opts.socket_entries.checked_next_power_of_two().unwrap_or(1 << 31)
    } else {
        1
    };
    let socks_entries = if slots_used {
        opts.socket_entries.min(SOCKS_OVERFLOW_ENTRIES)
    } else {
        opts.socket_entries
    };
    let socket_slots_mask = socket_slots - 1;
    // The CLOSE_WAIT table: slots, or the hash map where they cannot be
    // claimed (the other left one entry).
    let (close_wait_slots, close_wait_hash) = if slots_used {
        let slots = opts.close_wait_entries.checked_next_power_of_two().unwrap_or(1 << 31);
        (slots, 1)
    } else {
        (1, opts.close_wait_entries)
    };
    // (A Vec from the allocator is 16-byte aligned, as the ELF parser needs.)
    let rewritten;
    let object: &[u8] = if slots_used {
        OBJECT
    } else {
        rewritten = compat::without_new_atomics(OBJECT)?;
        &rewritten
    };
    let config = Config {
        filter_tgid: opts.filter_tgid.unwrap_or(0),
        stacks: match (opts.user_stacks, opts.kernel_stacks) {
            (false, _) => 0,
            (true, false) => STACKS_USER,
            (true, true) => STACKS_USER | STACKS_KERNEL,
        },
        wakeup_bytes: opts.wakeup_bytes,
        stack_rate: opts.stack_rate,
        follow: u32::from(opts.follow.is_some()),
        promote_ns: opts.follow.unwrap_or(0),
        socket_slots_mask,
        close_wait_slots_mask: close_wait_slots - 1,
        _pad: 0,
        compat,
    };
    let mut ebpf = EbpfLoader::new()
        .btf(Some(btf))
        .override_global("OFFSETS", offs, true)
        .override_global("CONFIG", &config, true)
        .map_max_entries("EVENTS", opts.ring_bytes)
        .map_max_entries("WATCH", opts.watch_entries)
        .map_max_entries("REPORTED", opts.reported_entries)
        .map_max_entries("CLOSE_WAIT", close_wait_hash)
        .map_max_entries("CW_KEYS", close_wait_slots)
        .map_max_entries("CW_EVENTS", close_wait_slots)
        .map_max_entries("SOCK_KEYS", socket_slots)
        .map_max_entries("SOCK_RECORDS", socket_slots)
        .map_max_entries("SOCKS", socks_entries)
        // Only used where ids are fixed by the kernel side (`COMPAT_IDS`).
        .map_max_entries("IDS", if compat & COMPAT_IDS != 0 { IDS_ENTRIES } else { 1 })
        .load(object)
        .map_err(|e| privilege_hint(anyhow!(e), "loading the eBPF programs"))?;

    let mut hooks = Vec::new();
    for hook in HOOKS {
        if let Some(f) = compat::FALLBACKS.iter().find(|f| hook.unless & compat & f.bit != 0) {
            hooks.push(HookStatus {
                hook: hook.name,
                attached: false,
                error: Some(format!("this kernel lacks {} (Linux {}+)", f.lacks, f.since)),
                lost: Some(hook.purpose),
            });
            continue;
        }
        match attach(&mut ebpf, hook, btf) {
            Ok(()) => hooks.push(HookStatus {
                hook: hook.name,
                attached: true,
                error: None,
                lost: None,
            }),
            Err(e) if hook.required => {
                if let Some(r) = e.downcast_ref::<Rejected>() {
                    let bit = r.fallback();
                    if bit != 0 && compat & bit == 0 {
                        return Err(anyhow!(NeedsFallback(bit)).context(r.to_string()));
                    }
                    if let Some(too_old) = r.too_old(&release()) {
                        anyhow::bail!(too_old);
                    }
                }
                return Err(privilege_hint(e, &format!("attaching {}", hook.target())));
            }
            Err(e) => {
                log::warn!("{} not attached ({e:#}); lost: {}", hook.target(), hook.purpose);
                hooks.push(HookStatus {
                    hook: hook.name,
                    attached: false,
                    error: Some(format!("{e:#}")),
                    lost: Some(hook.purpose),
                });
            }
        }
    }
    let tables = Tables {
        slots: slots_used,
        socket_slots_mask,
        close_wait_slots_mask: close_wait_slots - 1,
    };
    Ok((ebpf, hooks, tables))
}

fn attach(ebpf: &mut Ebpf, hook: &hooks::Hook, btf: &aya::Btf) -> Result<()> {
    let prog = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| anyhow!("program {} missing from the eBPF object", hook.program))?;
    match hook.attach {
        Attach::BtfTracepoint(name) => {
            let p: &mut BtfTracePoint = prog.try_into()?;
            p.load(name, btf).map_err(|e| rejected(hook, e))?;
            p.attach()?;
        }
        Attach::Tracepoint(category, name) => {
            tracefs::ensure_mounted()?;
            let p: &mut TracePoint = prog.try_into()?;
            if p.fd().is_err() {
                p.load().map_err(|e| rejected(hook, e))?;
            }
            p.attach(category, name)?;
        }
    }
    Ok(())
}

/// A load error as one line ([`Rejected`]) when the verifier refused the
/// program; the whole log goes to the debug log.
fn rejected(hook: &hooks::Hook, e: aya::programs::ProgramError) -> anyhow::Error {
    match e {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            log::debug!("{}: {io_error}; verifier log:\n{log}", hook.target());
            anyhow!(Rejected::from_log(&log))
        }
        other => anyhow!(other),
    }
}

/// The running kernel's release (`uname -r`).
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|_| "unknown release".into())
}

/// Turns EPERM/EACCES into the one thing a user needs to know.
fn privilege_hint(e: anyhow::Error, doing: &str) -> anyhow::Error {
    let text = format!("{e:#}");
    // The verifier answers EACCES too, for a program it rejects: its log
    // says why, and that is not a missing privilege.
    let refused = text.contains("Operation not permitted") || text.contains("Permission denied");
    if refused && e.downcast_ref::<Rejected>().is_none() {
        anyhow!(
            "{doing} was refused by the kernel: tracer needs CAP_BPF and CAP_PERFMON (a container or security module can withhold them, even from root): run it as root, or grant CAP_BPF,CAP_PERFMON,CAP_SYS_PTRACE,CAP_DAC_READ_SEARCH,CAP_CHECKPOINT_RESTORE (see README, Requirements)"
        )
    } else {
        e.context(format!("{doing} failed"))
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; harmless after.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

/// Entries of the kernel's overflow socket map (sockets whose slots in
/// the socket table were all taken).
const SOCKS_OVERFLOW_ENTRIES: u32 = 16384;

/// Live sockets the kernel side can fix an id for where it must
/// (`COMPAT_IDS`); beyond them, counted (`ids_full`).
const IDS_ENTRIES: u32 = 65536;

/// The kernel's count of runs of the program behind `fd` skipped because
/// it was already running on that CPU (`recursion_misses` in its fdinfo;
/// 0 where the kernel does not say).
fn recursion_misses(fd: RawFd) -> u64 {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("recursion_misses:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
