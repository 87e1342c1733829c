//! Facts about processes from /proc: who holds which socket (by inode), and
//! what a pid is called. Read while the processes are alive.

use std::collections::HashMap;

use procfs::process::{FDTarget, Process};

use crate::correlate::Comm;

/// A process holding a socket through one of its fds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub fd: i32,
}

/// Socket inode -> holders, for one process or (None) every process.
/// Processes that vanish mid-scan are skipped: they hold nothing any more.
pub fn socket_holders(only_pid: Option<u32>) -> HashMap<u64, Vec<Holder>> {
    let mut map: HashMap<u64, Vec<Holder>> = HashMap::new();
    let mut scan = |p: &Process| {
        let Ok(fds) = p.fd() else { return };
        for fd in fds.flatten() {
            if let FDTarget::Socket(inode) = fd.target {
                map.entry(inode).or_default().push(Holder {
                    pid: p.pid() as u32,
                    fd: fd.fd,
                });
            }
        }
    };
    match only_pid {
        Some(pid) => {
            if let Ok(p) = Process::new(pid as i32) {
                scan(&p);
            }
        }
        None => {
            if let Ok(all) = procfs::process::all_processes() {
                for p in all.flatten() {
                    scan(&p);
                }
            }
        }
    }
    map
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcInfo {
    pub comm: String,
    pub cmdline: String,
}

pub fn info(pid: u32) -> Option<ProcInfo> {
    let p = Process::new(pid as i32).ok()?;
    let comm = p.stat().map(|s| s.comm).unwrap_or_default();
    let cmdline = p.cmdline().map(|v| v.join(" ")).unwrap_or_default();
    Some(ProcInfo { comm, cmdline })
}

pub fn comm_of(pid: u32) -> Comm {
    Comm::from_str(&info(pid).map(|i| i.comm).unwrap_or_default())
}

pub fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Remembers which pids have been named already, so each process's name
/// and command line are read from /proc once, while it still runs.
/// Bounded: forgets everything when full (live processes are re-read).
pub struct ProcNames {
    seen: std::collections::HashSet<u32>,
    cap: usize,
}

impl ProcNames {
    pub fn new(cap: usize) -> Self {
        ProcNames {
            seen: Default::default(),
            cap,
        }
    }

    /// Forgets processes (the analysis no longer holds their names): if
    /// they are asked for again, they are read and sent again.
    pub fn forget(&mut self, pids: &[u32]) {
        for pid in pids {
            self.seen.remove(pid);
        }
    }

    /// The process's name, the first time it is asked for.
    pub fn learn(&mut self, pid: u32) -> Option<crate::input::ProcessInput> {
        if pid == 0 || self.seen.contains(&pid) {
            return None;
        }
        if self.seen.len() >= self.cap {
            self.seen.clear();
        }
        self.seen.insert(pid);
        info(pid).map(|info| crate::input::ProcessInput { pid, info })
    }
}
