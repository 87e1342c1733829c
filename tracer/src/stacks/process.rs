//! What the stack unwinder needs to know about one process: its executable
//! mappings (is a return address code at all?) and, for a JVM, the handle
//! that names Java frames. Cached per pid and re-checked against the
//! process's start time, since pids are reused.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use procfs::process::{MMPermissions, MMapPath, Process};

use crate::jvm::Jvm;
use crate::privileges::{self, Denied};

/// How long a cached process is trusted before its start time is checked
/// again (a pid can be reused).
const RECHECK: Duration = Duration::from_secs(1);

/// Bound on cached processes; the least recently checked go first. Each
/// holds its `/proc/PID/mem` open: the bound keeps the agent well inside
/// its fd limit, and its memory flat over thousands of short-lived
/// processes.
const CAP: usize = 1024;

/// An executable mapping.
#[derive(Clone, Debug)]
pub struct ExecMap {
    pub start: u64,
    pub end: u64,
    /// No file behind it: JIT code (a JVM's code cache, V8's heap).
    pub anonymous: bool,
}

pub struct ProcessContext {
    /// `/proc/PID/mem`, to look at the code before a return address.
    mem: Option<std::fs::File>,
    start_time: u64,
    /// When the start time was last compared with the process's.
    checked: Instant,
    /// When the mappings were last read, on the kernel's event clock: a
    /// stack captured after it may hold code mapped since (a JVM commits
    /// its code cache as it compiles).
    maps_read_ns: u64,
    exec: Vec<ExecMap>,
    /// The JVM handle, or why this JVM's frames cannot be named. None for
    /// a process that is not a JVM.
    pub jvm: Option<Result<Jvm, String>>,
}

impl ProcessContext {
    fn load(pid: u32) -> Option<Self> {
        let p = Process::new(pid as i32).ok()?;
        let start_time = p.stat().ok()?.starttime;
        let mut ctx = ProcessContext {
            mem: open_mem(pid),
            start_time,
            checked: Instant::now(),
            maps_read_ns: 0,
            exec: Vec::new(),
            jvm: None,
        };
        if let Some(file_backed) = ctx.refresh_maps(&p) {
            check_map_files(pid, file_backed);
        }
        ctx.jvm = match Jvm::attach(pid) {
            Ok(None) => None,
            Ok(Some(j)) => Some(Ok(j)),
            // Gone since its event: nothing to name, and nothing to warn of.
            Err(_) if !std::path::Path::new(&format!("/proc/{pid}")).exists() => None,
            Err(e) => {
                log::warn!("pid {pid} runs a JVM whose frames cannot be named: {e:#}");
                Some(Err(format!("{e:#}")))
            }
        };
        Some(ctx)
    }

    /// Returns the first executable mapping of a file, if any (for
    /// [`check_map_files`]).
    fn refresh_maps(&mut self, p: &Process) -> Option<(u64, u64)> {
        // Taken before reading: a mapping made during the read counts as
        // made after it.
        self.maps_read_ns = crate::clock::monotonic_ns();
        let maps = match p.maps() {
            Ok(m) => m,
            Err(e) => {
                if privileges::is_denied(&e) {
                    privileges::denied(Denied::Maps, 1);
                }
                return None;
            }
        };
        let exec: Vec<_> = maps
            .into_iter()
            .filter(|m| m.perms.contains(MMPermissions::EXECUTE))
            .collect();
        let file_backed = exec
            .iter()
            .find(|m| matches!(m.pathname, MMapPath::Path(_)))
            .map(|m| m.address);
        self.exec = exec
            .into_iter()
            .map(|m| ExecMap {
                start: m.address.0,
                end: m.address.1,
                anonymous: matches!(m.pathname, MMapPath::Anonymous | MMapPath::Other(_)),
            })
            .collect();
        file_backed
    }

    pub fn exec_map(&self, addr: u64) -> Option<&ExecMap> {
        self.exec.iter().find(|m| m.start <= addr && addr < m.end)
    }

    /// Whether `addr` is a return address: code right after a call
    /// instruction (x86_64: `call rel32`, `call *reg`, `call *[reg+disp]`,
    /// `call *[rip+disp]`). A word on the stack that passes this is a
    /// saved return address, not data that happens to point into code.
    pub fn follows_call(&self, addr: u64) -> bool {
        use std::os::unix::fs::FileExt;
        let (Some(mem), Some(from)) = (&self.mem, addr.checked_sub(7)) else {
            return false;
        };
        let mut b = [0u8; 7];
        if mem.read_exact_at(&mut b, from).is_err() {
            return false;
        }
        // b[7 - k] is the byte k before addr.
        let before = |k: usize| b[7 - k];
        before(5) == 0xe8
            || (before(2) == 0xff && before(1) & 0xf8 == 0xd0)
            || (before(3) == 0xff && before(2) & 0xf8 == 0x50)
            || (before(4) == 0xff && before(3) == 0x54)
            || (before(6) == 0xff && (before(5) == 0x15 || before(5) & 0xf8 == 0x90))
    }

    pub fn jvm(&mut self) -> Option<&mut Jvm> {
        self.jvm.as_mut().and_then(|j| j.as_mut().ok())
    }
}

/// `/proc/PID/mem`; a refusal is warned about once (Java frames and the
/// caller of libc's syscall wrappers are missing without it).
fn open_mem(pid: u32) -> Option<std::fs::File> {
    match std::fs::File::open(format!("/proc/{pid}/mem")) {
        Ok(f) => Some(f),
        Err(e) => {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                privileges::denied(Denied::Mem, 1);
            }
            None
        }
    }
}

/// blazesym opens a process's binaries through `/proc/PID/map_files`,
/// which the kernel refuses without CAP_CHECKPOINT_RESTORE (even for one's
/// own processes): then no native frame is named. Checked on one file
/// mapping per new process, until the first refusal has been warned about.
fn check_map_files(pid: u32, (start, end): (u64, u64)) {
    if privileges::warned(Denied::MapFiles) {
        return;
    }
    let entry = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
    if std::fs::metadata(entry).is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied) {
        privileges::denied(Denied::MapFiles, 1);
    }
}

/// Per-pid [`ProcessContext`]s.
#[derive(Default)]
pub struct Processes {
    by_pid: HashMap<u32, ProcessContext>,
}

impl Processes {
    /// The context for `pid`, loaded or re-validated as needed; None when
    /// the process is gone. `addrs` are addresses the caller is about to
    /// classify, captured at `captured_ns` (kernel clock): a miss re-reads
    /// the mappings when they were read before the capture (a library
    /// loaded, or JIT code committed, since).
    pub fn get(&mut self, pid: u32, addrs: &[u64], captured_ns: u64) -> Option<&mut ProcessContext> {
        let stale = match self.by_pid.get_mut(&pid) {
            None => true,
            Some(c) if c.checked.elapsed() > RECHECK => {
                let start = Process::new(pid as i32)
                    .ok()
                    .and_then(|p| p.stat().ok())
                    .map(|s| s.starttime);
                c.checked = Instant::now();
                start != Some(c.start_time)
            }
            Some(_) => false,
        };
        if stale {
            self.by_pid.remove(&pid);
            if self.by_pid.len() >= CAP {
                self.evict();
            }
            let ctx = ProcessContext::load(pid)?;
            self.by_pid.insert(pid, ctx);
        }
        let ctx = self.by_pid.get_mut(&pid)?;
        if ctx.maps_read_ns <= captured_ns && addrs.iter().any(|&a| ctx.exec_map(a).is_none()) {
            // Mapped after the read, before the capture. Read once per
            // capture at most: mappings read after a capture hold all the
            // code it could have run, so a broken chain's garbage does not
            // make every stack of a process read its maps again.
            if let Ok(p) = Process::new(pid as i32) {
                ctx.refresh_maps(&p);
            }
        }
        Some(ctx)
    }

    fn evict(&mut self) {
        let mut by_age: Vec<(Instant, u32)> = self.by_pid.iter().map(|(&p, c)| (c.checked, p)).collect();
        by_age.sort();
        for (_, pid) in by_age.into_iter().take(CAP / 4) {
            self.by_pid.remove(&pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JVM commits its code cache as it compiles: code mapped after the
    /// mappings were read is found for a stack captured after it, and a
    /// stack captured before the read does not read them again.
    #[test]
    fn code_mapped_after_the_maps_were_read_is_found() {
        let pid = std::process::id();
        let mut procs = Processes::default();
        procs.get(pid, &[], 0).expect("this process");
        // SAFETY: a fresh anonymous mapping, unmapped below.
        let code = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(code, libc::MAP_FAILED);
        let addr = code as u64 + 16;
        let captured_ns = crate::clock::monotonic_ns();
        let earlier = procs.get(pid, &[addr], 1).expect("this process");
        assert!(
            earlier.exec_map(addr).is_none(),
            "captured before the read: not read again"
        );
        let later = procs.get(pid, &[addr], captured_ns).expect("this process");
        assert!(
            later.exec_map(addr).is_some_and(|m| m.anonymous),
            "captured after: read again"
        );
        // SAFETY: mapped above, not referenced since.
        unsafe { libc::munmap(code, 4096) };
    }
}
