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

#[derive(Clone, Debug, Default, PartialEq, Eq)]
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

/// pid -> name and command line, looked up once per pid while it runs, so
/// that a leak reported after the process exited still names it. Bounded.
pub struct ProcCache {
    map: HashMap<u32, ProcInfo>,
    cap: usize,
}

impl ProcCache {
    pub fn new(cap: usize) -> Self {
        ProcCache {
            map: HashMap::new(),
            cap,
        }
    }

    pub fn learn(&mut self, pid: u32) {
        if pid == 0 || self.map.contains_key(&pid) {
            return;
        }
        if self.map.len() >= self.cap {
            // Cheap bound: forget everything; live processes are re-read.
            self.map.clear();
        }
        if let Some(i) = info(pid) {
            self.map.insert(pid, i);
        }
    }

    pub fn get(&mut self, pid: u32) -> Option<&ProcInfo> {
        self.learn(pid);
        self.map.get(&pid)
    }
}
