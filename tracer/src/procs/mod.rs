//! Facts about processes from /proc: who holds which socket (by inode), and
//! what a pid is called. Read while the processes are alive.
//!
//! The kernel refuses other users' `/proc/PID/fd` to a tracer without
//! CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH: such processes are counted
//! ([`scan_holders`]), never silently taken for processes that hold
//! nothing; a refused `/proc/PID/stat` is warned about once
//! ([`privileges::denied`]).

use std::collections::HashMap;

use procfs::process::{FDTarget, Process};

pub mod container;

use crate::correlate::Comm;
use crate::privileges::{self, Denied};

/// A process holding a socket through one of its fds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub fd: i32,
}

/// `PF_KTHREAD` in `/proc/PID/stat`'s flags.
const PF_KTHREAD: u32 = 0x0020_0000;

/// Socket inode -> holders, for one process or (None) every process.
/// Processes that vanish mid-scan are skipped: they hold nothing any more.
pub fn socket_holders(only_pid: Option<u32>) -> HashMap<u64, Vec<Holder>> {
    scan_holders(only_pid).by_inode
}

/// What a scan of `/proc/PID/fd` found.
#[derive(Debug, Default)]
pub struct HolderScan {
    /// Socket inode -> holders.
    pub by_inode: HashMap<u64, Vec<Holder>>,
    /// Processes whose fds the kernel refused (EACCES/EPERM: another
    /// user's, without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH), as opposed
    /// to processes that exited. Kernel threads, which have no fds, are
    /// not counted.
    pub refused: usize,
}

/// [`socket_holders`], also counting the processes the kernel refused:
/// whoever finds a socket without holders can tell a privilege problem
/// from a socket nobody holds (and warn, [`privileges::denied`]).
pub fn scan_holders(only_pid: Option<u32>) -> HolderScan {
    let mut out = HolderScan::default();
    let mut scan = |p: &Process| {
        let refused = match p.fd() {
            Ok(fds) => {
                let mut any = false;
                for fd in fds.flatten() {
                    any = true;
                    if let FDTarget::Socket(inode) = fd.target {
                        out.by_inode.entry(inode).or_default().push(Holder {
                            pid: p.pid() as u32,
                            fd: fd.fd,
                        });
                    }
                }
                // procfs skips the fds it cannot read: when it yields none,
                // the kernel may have refused them all (it refuses all of a
                // process's or none).
                !any && fd_links_refused(p.pid())
            }
            Err(e) => privileges::is_denied(&e),
        };
        // A kernel thread's fd directory is root's but it has no fds.
        if refused && !is_kernel_thread(p) {
            out.refused += 1;
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
    out
}

/// Whether the kernel refuses to read the first of `pid`'s fds (the
/// directory lists them without ptrace access, the links need it). Not for
/// an fd closed meanwhile, nor a process without fds.
fn fd_links_refused(pid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.flatten().next().is_some_and(|fd| {
        std::fs::read_link(fd.path()).is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
    })
}

fn is_kernel_thread(p: &Process) -> bool {
    p.stat().is_ok_and(|s| s.flags & PF_KTHREAD != 0)
}

/// Whether `pid` is a kernel thread (false when it is gone or refused).
pub fn is_kernel_thread_pid(pid: u32) -> bool {
    Process::new(pid as i32).is_ok_and(|p| is_kernel_thread(&p))
}

/// What a process is: its name, and where it runs. Kept in recordings:
/// fields added later default when an older recording lacks them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcInfo {
    pub comm: String,
    pub cmdline: String,
    /// Its cgroup v2 path (the `0::` line of `/proc/PID/cgroup`); empty
    /// when unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cgroup: String,
    /// The bare 64-hex id of its container, when `cgroup` is a container
    /// runtime's ([`container::id_from_cgroup`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Its pid in its own pid namespace (the last of `NSpid:` in
    /// `/proc/PID/status`), when that differs from the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_pid: Option<u32>,
}

pub fn info(pid: u32) -> Option<ProcInfo> {
    let p = open(pid)?;
    let comm = comm_of_process(&p).unwrap_or_default();
    let cmdline = p.cmdline().map(|v| v.join(" ")).unwrap_or_default();
    // Neither file needs a privilege; a process gone meanwhile has none.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|c| container::cgroup_v2_path(&c).map(str::to_string))
        .unwrap_or_default();
    let container_pid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| innermost_pid(&s))
        .filter(|&p| p != pid);
    Some(ProcInfo {
        comm,
        cmdline,
        container_id: container::id_from_cgroup(&cgroup),
        cgroup,
        container_pid,
    })
}

/// The process's pid in the innermost pid namespace it is in: the last
/// value of `NSpid:` in `/proc/PID/status`.
fn innermost_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last())
        .and_then(|p| p.parse().ok())
}

/// The process's name (`comm`), None when it is gone or refused.
pub fn comm(pid: u32) -> Option<String> {
    comm_of_process(&open(pid)?)
}

pub fn comm_of(pid: u32) -> Comm {
    Comm::from_str(&comm(pid).unwrap_or_default())
}

fn open(pid: u32) -> Option<Process> {
    match Process::new(pid as i32) {
        Ok(p) => Some(p),
        Err(e) => {
            if privileges::is_denied(&e) {
                privileges::denied(Denied::Names, 1);
            }
            None
        }
    }
}

fn comm_of_process(p: &Process) -> Option<String> {
    match p.stat() {
        Ok(s) => Some(s.comm),
        Err(e) => {
            if privileges::is_denied(&e) {
                privileges::denied(Denied::Names, 1);
            }
            None
        }
    }
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

    /// The process's name and command line, the first time `pid` is asked
    /// for; None when it was asked for already, or is gone.
    pub fn learn(&mut self, pid: u32) -> Option<ProcInfo> {
        if pid == 0 || self.seen.contains(&pid) {
            return None;
        }
        if self.seen.len() >= self.cap {
            self.seen.clear();
        }
        self.seen.insert(pid);
        info(pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learn_info_names_a_pid_once() {
        let me = std::process::id();
        let mut names = ProcNames::new(4);
        let info = names.learn(me).expect("this process is alive");
        assert!(!info.comm.is_empty() && !info.cmdline.is_empty(), "{info:?}");
        assert_eq!(names.learn(me), None, "asked for already");
        assert_eq!(names.learn(0), None);
    }

    #[test]
    fn our_own_info_has_our_cgroup_and_no_other_pid() {
        let me = std::process::id();
        let info = info(me).expect("this process is alive");
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").expect("our cgroup");
        assert_eq!(Some(info.cgroup.as_str()), container::cgroup_v2_path(&cgroup));
        assert_eq!(info.container_id, container::id_from_cgroup(&info.cgroup));
        // Tests run in the pid namespace their /proc shows.
        assert_eq!(info.container_pid, None);
    }

    #[test]
    fn nspid_gives_the_innermost_pid() {
        let status = "Name:\ttcp-fixture\nTgid:\t4242\nNgid:\t0\nPid:\t4242\nNSpid:\t4242\t7\nNSpgid:\t4242\t1\n";
        assert_eq!(innermost_pid(status), Some(7));
        assert_eq!(innermost_pid("Pid:\t10\nNSpid:\t10\n"), Some(10));
        assert_eq!(innermost_pid("Pid:\t10\n"), None);
    }

    #[test]
    fn older_recordings_process_records_still_read() {
        let old: ProcInfo = serde_json::from_str(r#"{"comm":"leaky","cmdline":"./leaky"}"#).expect("reads");
        assert_eq!(
            old,
            ProcInfo {
                comm: "leaky".into(),
                cmdline: "./leaky".into(),
                ..ProcInfo::default()
            }
        );
        // And a process outside any container writes nothing more.
        assert_eq!(
            serde_json::to_string(&old).expect("writes"),
            r#"{"comm":"leaky","cmdline":"./leaky"}"#
        );
    }

    #[test]
    fn holders_include_our_own_socket() {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::fs::MetadataExt as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let fd = listener.as_raw_fd();
        let inode = std::fs::metadata(format!("/proc/self/fd/{fd}")).expect("fd").ino();
        let me = std::process::id();
        let holders = socket_holders(Some(me));
        assert_eq!(holders.get(&inode), Some(&vec![Holder { pid: me, fd }]));
        assert_eq!(comm(me), info(me).map(|i| i.comm));
    }
}
