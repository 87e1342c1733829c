//! What tracer needs from the kernel, and what each missing capability
//! costs. Measured on 6.18 as uid 65534 with ambient capabilities, tracing
//! a leak in a process of another user (README, Requirements):
//!
//! * CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN, which the kernel accepts
//!   for both) are required: without CAP_BPF the programs cannot be
//!   attached, without CAP_PERFMON not even loaded. With them alone, leaks
//!   are found (state hook, sock_diag, comm and cmdline, which need
//!   nothing), with their unread bytes.
//! * CAP_DAC_READ_SEARCH (or CAP_DAC_OVERRIDE): tracefs, mode 0700, for the
//!   syscall tracepoints' ids (the accept and close hooks); and, with
//!   CAP_SYS_PTRACE, other users' `/proc/PID/fd` (mode 0500) and
//!   `/proc/PID/mem` (0600).
//! * CAP_SYS_PTRACE: other users' `/proc/PID/fd` links (holders, owners'
//!   fds), `/proc/PID/mem` (Java frames, the caller of libc's syscall
//!   wrappers) and `/proc/PID/root` (a JVM's libjvm.so).
//! * CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN): `/proc/PID/map_files`,
//!   through which blazesym opens the binaries: without it no native frame
//!   is named, in any process, not even the tracer's own user's.
//! * CAP_SYSLOG, only for `--kernel-stacks`, and only when the kernel hides
//!   kallsyms' addresses (`kptr_restrict`, `perf_event_paranoid` > 1).
//! * CAP_SYS_ADMIN, only where sockets live in other network namespaces
//!   (containers): `setns` into them, for their sockets (start-up
//!   snapshot) and their leaks' unread bytes, fd and holders. The leaks
//!   themselves are found without it (the hooks are host-wide). Not in
//!   [`FULL_SET`]: it is a broad grant, needed only there.
//!
//! [`check`] refuses to start without the required ones; [`denied`] warns,
//! once per kind and in one line, when evidence is actually missing for
//! lack of an optional one.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use anyhow::bail;

/// A capability, by its bit in `CapEff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cap(u32, &'static str);

const CAP_DAC_OVERRIDE: Cap = Cap(1, "CAP_DAC_OVERRIDE");
const CAP_DAC_READ_SEARCH: Cap = Cap(2, "CAP_DAC_READ_SEARCH");
const CAP_SYS_PTRACE: Cap = Cap(19, "CAP_SYS_PTRACE");
const CAP_SYS_ADMIN: Cap = Cap(21, "CAP_SYS_ADMIN");
const CAP_SYSLOG: Cap = Cap(34, "CAP_SYSLOG");
const CAP_PERFMON: Cap = Cap(38, "CAP_PERFMON");
const CAP_BPF: Cap = Cap(39, "CAP_BPF");
const CAP_CHECKPOINT_RESTORE: Cap = Cap(40, "CAP_CHECKPOINT_RESTORE");

/// The set that gives full findings, as `setpriv --ambient-caps` and the
/// refusal name it.
pub const FULL_SET: &str = "CAP_BPF,CAP_PERFMON,CAP_SYS_PTRACE,CAP_DAC_READ_SEARCH,CAP_CHECKPOINT_RESTORE";

/// Effective capabilities, as a bit mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Caps(u64);

impl Caps {
    fn has(self, c: Cap) -> bool {
        c.0 < 64 && self.0 & (1 << c.0) != 0
    }

    /// Any of `alternatives` (a capability, or one the kernel accepts in
    /// its place).
    fn any(self, alternatives: &[Cap]) -> bool {
        alternatives.iter().any(|&c| self.has(c))
    }
}

/// An optional capability tracer runs without, and what that costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Optional {
    /// CAP_DAC_READ_SEARCH (or CAP_DAC_OVERRIDE).
    DacReadSearch,
    SysPtrace,
    /// CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN).
    CheckpointRestore,
    /// CAP_SYSLOG, when the kernel hides kallsyms' addresses.
    Syslog,
}

impl Optional {
    pub fn name(self) -> &'static str {
        match self {
            Optional::DacReadSearch => CAP_DAC_READ_SEARCH.1,
            Optional::SysPtrace => CAP_SYS_PTRACE.1,
            Optional::CheckpointRestore => CAP_CHECKPOINT_RESTORE.1,
            Optional::Syslog => CAP_SYSLOG.1,
        }
    }

    /// What is missing without it.
    pub fn costs(self) -> &'static str {
        match self {
            Optional::DacReadSearch => {
                "the accept and close hooks where tracefs is root-only, and other users' holders, fds and Java frames"
            }
            Optional::SysPtrace => {
                "other users' holders, fds and Java frames, and the caller of libc's syscall wrappers in their stacks"
            }
            Optional::CheckpointRestore => {
                "native frames named from the mapped file itself (/proc/PID/maps paths are used instead)"
            }
            Optional::Syslog => "the names of kernel frames (--kernel-stacks)",
        }
    }
}

/// The optional capabilities tracer runs without.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Missing(Vec<Optional>);

impl Missing {
    pub fn contains(&self, o: Optional) -> bool {
        self.0.contains(&o)
    }
}

/// One line: each missing capability and what it costs.
impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no capability missing");
        }
        for (i, o) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "without {}: loses {}", o.name(), o.costs())?;
        }
        Ok(())
    }
}

/// Refuses, in one line naming the exact set, when tracer lacks what it
/// needs to load its eBPF programs; otherwise returns the optional
/// capabilities it runs without (evidence then goes missing, and
/// [`denied`] says so when it does).
pub fn check() -> anyhow::Result<Missing> {
    let Some(caps) = effective() else {
        // Without /proc/self/status the kernel is the judge: a refused
        // load says what to do (kernel::privilege_hint).
        log::debug!("cannot read CapEff from /proc/self/status; not checking capabilities");
        return Ok(Missing::default());
    };
    match assess(caps, kallsyms_hidden()) {
        Ok(m) => Ok(m),
        Err(msg) => bail!("{msg}"),
    }
}

fn assess(caps: Caps, kallsyms_hidden: bool) -> Result<Missing, String> {
    // bpf_capable() and perfmon_capable() also accept CAP_SYS_ADMIN.
    let lacking: Vec<&str> = [CAP_BPF, CAP_PERFMON]
        .into_iter()
        .filter(|&c| !caps.any(&[c, CAP_SYS_ADMIN]))
        .map(|c| c.1)
        .collect();
    if !lacking.is_empty() {
        return Err(format!(
            "tracer needs CAP_BPF and CAP_PERFMON to load its eBPF programs and lacks {}: run it as root, \
             or grant {FULL_SET} (see README, Requirements)",
            lacking.join(" and ")
        ));
    }
    let mut missing = Vec::new();
    if !caps.any(&[CAP_DAC_READ_SEARCH, CAP_DAC_OVERRIDE]) {
        missing.push(Optional::DacReadSearch);
    }
    if !caps.has(CAP_SYS_PTRACE) {
        missing.push(Optional::SysPtrace);
    }
    if !caps.any(&[CAP_CHECKPOINT_RESTORE, CAP_SYS_ADMIN]) {
        missing.push(Optional::CheckpointRestore);
    }
    if kallsyms_hidden && !caps.has(CAP_SYSLOG) {
        missing.push(Optional::Syslog);
    }
    Ok(Missing(missing))
}

/// `CapEff` of this process, read once.
fn effective() -> Option<Caps> {
    static CAPS: OnceLock<Option<Caps>> = OnceLock::new();
    *CAPS.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        parse_cap_eff(&status)
    })
}

fn parse_cap_eff(status: &str) -> Option<Caps> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .map(Caps)
}

/// Whether /proc/kallsyms shows this process zeros instead of addresses.
fn kallsyms_hidden() -> bool {
    use std::io::BufRead as _;
    let Ok(f) = std::fs::File::open("/proc/kallsyms") else {
        return true;
    };
    let mut first = String::new();
    if std::io::BufReader::new(f).read_line(&mut first).is_err() {
        return true;
    }
    first
        .split_whitespace()
        .next()
        .is_none_or(|a| a.bytes().all(|b| b == b'0'))
}

/// Evidence read from /proc that the kernel can refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// `/proc/PID/fd`: holders, and owners' fds.
    Fds,
    /// `/proc/PID/stat` (a /proc mounted with hidepid): process names.
    Names,
    /// `/proc/PID/mem`: Java frames, the caller of libc's syscall wrappers.
    Mem,
    /// `/proc/PID/maps`: which return addresses are code.
    Maps,
    /// `/proc/PID/map_files`: the binaries native frames are named from.
    MapFiles,
    /// `/proc/PID/ns/net`: which network namespace a process is in.
    NetnsLinks,
    /// `setns` into another network namespace, for its sockets.
    Setns,
}

const KINDS: usize = 7;

impl Denied {
    fn index(self) -> usize {
        self as usize
    }

    fn path(self) -> &'static str {
        match self {
            Denied::Fds => "/proc/PID/fd",
            Denied::Names => "/proc/PID/stat",
            Denied::Mem => "/proc/PID/mem",
            Denied::Maps => "/proc/PID/maps",
            Denied::MapFiles => "/proc/PID/map_files",
            Denied::NetnsLinks => "/proc/PID/ns/net",
            Denied::Setns => "/proc/PID/ns/net (setns)",
        }
    }

    /// What was refused, of how many: processes, or for `setns`,
    /// namespaces.
    fn subject(self, n: usize) -> String {
        let plural = |one: &str, many: &str| {
            if n == 1 {
                format!("1 {one}")
            } else {
                format!("{n} {many}")
            }
        };
        match self {
            Denied::Setns => format!("cannot enter {}", plural("network namespace", "network namespaces")),
            _ => format!("cannot read {} of {}", self.path(), plural("process", "processes")),
        }
    }

    fn lost(self) -> &'static str {
        match self {
            Denied::Fds => "leaks of sockets they hold come without holders or the owner's fd",
            Denied::Names => "their names (comm) are missing from leaks and holders",
            Denied::Mem => "their stacks have no Java frames and lack the caller of libc's syscall wrappers",
            Denied::Maps => "their stacks may stop early (return addresses cannot be checked)",
            Denied::MapFiles => {
                "their native frames are named from the paths in /proc/PID/maps instead (wrong for a binary replaced on disk since it started)"
            }
            Denied::NetnsLinks => {
                "if their network namespaces are not the tracer's, the sockets there may be missing from the \
                 start-up snapshot, and leaks there come without unread bytes, fd or holders"
            }
            Denied::Setns => {
                "their sockets are missing from the start-up snapshot, and leaks in them come without unread bytes, \
                 fd or holders"
            }
        }
    }

    /// The capabilities the kernel wants for this access, each as a list
    /// of alternatives (the first is the one to grant): for every process,
    /// then for other users' processes only.
    fn needs(self) -> (&'static [&'static [Cap]], &'static [&'static [Cap]]) {
        const DAC: &[Cap] = &[CAP_DAC_READ_SEARCH, CAP_DAC_OVERRIDE];
        const PTRACE: &[Cap] = &[CAP_SYS_PTRACE];
        const CHECKPOINT: &[Cap] = &[CAP_CHECKPOINT_RESTORE, CAP_SYS_ADMIN];
        const ADMIN: &[Cap] = &[CAP_SYS_ADMIN];
        match self {
            Denied::Fds | Denied::Mem => (&[], &[PTRACE, DAC]),
            Denied::Names | Denied::Maps | Denied::NetnsLinks => (&[], &[PTRACE]),
            Denied::Setns => (&[ADMIN], &[]),
            Denied::MapFiles => (&[CHECKPOINT], &[PTRACE, DAC]),
        }
    }
}

static DENIED: [AtomicU64; KINDS] = [const { AtomicU64::new(0) }; KINDS];
static WARNED: [AtomicBool; KINDS] = [const { AtomicBool::new(false) }; KINDS];

/// Counts `processes` whose `kind` of /proc entry the kernel refused
/// (EACCES/EPERM, not a process that exited), or for [`Denied::Setns`]
/// the network namespaces it refused to enter, and warns the first time, in
/// one line naming the capability to grant and what is missing. Callable
/// from any thread.
pub fn denied(kind: Denied, processes: usize) {
    if processes == 0 {
        return;
    }
    DENIED[kind.index()].fetch_add(processes as u64, Ordering::Relaxed);
    if !WARNED[kind.index()].swap(true, Ordering::Relaxed) {
        log::warn!("{}", denied_line(kind, processes, effective()));
    }
}

/// Whether [`denied`] has warned about `kind` (so a check that costs
/// something can stop once it has).
pub fn warned(kind: Denied) -> bool {
    WARNED[kind.index()].load(Ordering::Relaxed)
}

fn denied_line(kind: Denied, processes: usize, caps: Option<Caps>) -> String {
    let (always, others) = kind.needs();
    let names = |needs: &[&[Cap]], only_missing: bool| -> String {
        let v: Vec<&str> = needs
            .iter()
            .filter(|alts| !only_missing || !caps.is_some_and(|c| c.any(alts)))
            .map(|alts| alts[0].1)
            .collect();
        match v.split_last() {
            None => String::new(),
            Some((last, [])) => last.to_string(),
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        }
    };
    let (a, o) = (names(always, true), names(others, true));
    let fix = match (caps, a.is_empty(), o.is_empty()) {
        (None, ..) => {
            let all = names(&[always, others].concat(), false);
            format!("run tracer as root, or grant {all}")
        }
        (Some(_), false, false) => format!("grant {a} (and, for other users' processes, {o})"),
        (Some(_), false, true) => format!("grant {a}"),
        (Some(_), true, false) => format!("grant {o}"),
        // Every capability is there: hidepid, a security module or another
        // user namespace refuses.
        (Some(_), true, true) => "tracer has the capabilities for it, so /proc's hidepid, a security module or a \
                                  user namespace refuses"
            .to_string(),
    };
    format!(
        "{} (permission denied): {}; {fix} (see README, Requirements); further refusals are not reported",
        kind.subject(processes),
        kind.lost()
    )
}

/// Whether a procfs error is the kernel refusing access (as opposed to a
/// process or fd that is gone).
pub fn is_denied(e: &procfs::ProcError) -> bool {
    matches!(e, procfs::ProcError::PermissionDenied(_))
}

#[cfg(test)]
#[path = "privileges_tests.rs"]
mod tests;
