//! Ground truth from `/proc`: which fds of a process are sockets, and a
//! process's parent.

use std::collections::BTreeMap;
use std::fs;

/// The socket inode in a `/proc/PID/fd/N` link target, `socket:[12345]`.
pub fn parse_socket_link(target: &str) -> Option<u64> {
    target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Every socket fd of `pid`, by socket inode (the `ino:` of `ss -e`): one
/// socket may be open under several fds. Panics if `/proc/PID/fd` cannot be
/// read (the process is gone, or no permission); fds closed while reading
/// are skipped.
pub fn socket_fds(pid: u32) -> BTreeMap<u64, Vec<i32>> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {dir}: {e}"));
    let mut out: BTreeMap<u64, Vec<i32>> = BTreeMap::new();
    for entry in entries.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        if let Some(ino) = target.to_str().and_then(parse_socket_link) {
            out.entry(ino).or_default().push(fd);
        }
    }
    for fds in out.values_mut() {
        fds.sort_unstable();
    }
    out
}

/// The ppid field of `/proc/PID/stat` (after the parenthesised comm, which
/// may itself contain spaces and parentheses). `None` if the process is
/// gone.
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ppid(&stat)
}

fn parse_stat_ppid(stat: &str) -> Option<u32> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // State, then ppid.
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_links() {
        assert_eq!(parse_socket_link("socket:[15205]"), Some(15205));
        assert_eq!(parse_socket_link("pipe:[15205]"), None);
        assert_eq!(parse_socket_link("/dev/null"), None);
        assert_eq!(parse_socket_link("socket:[]"), None);
    }

    #[test]
    fn stat_ppid() {
        assert_eq!(parse_stat_ppid("8300 (tcp-fixture) S 8290 8300 1 0 -1"), Some(8290));
        assert_eq!(parse_stat_ppid("9 (a) b (c)) R 1 9 9 0"), Some(1));
        assert_eq!(parse_stat_ppid("garbage"), None);
    }

    #[test]
    fn own_process() {
        let me = std::process::id();
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        assert_eq!(parent_pid(me), u32::try_from(parent).ok());
        // Whatever sockets this test process has, reading them works.
        let _ = socket_fds(me);
    }
}
