//! Network namespaces and cgroups for the tests of leaks in containers
//! (tests/tests/netns.rs): [`NetNs`], a named network namespace removed on
//! drop; [`other_namespaces`], every network namespace but ours;
//! [`TestCgroup`], a cgroup v2 named as a container runtime names its own,
//! removed on drop; [`ns_inode`].
//!
//! A namespace of a test gets ephemeral ports from a range disjoint from
//! the host's ([`disjoint_port_range`]): the tests of the host's namespace
//! tell their sockets by port, and a host-wide tracer reports the leaks of
//! every namespace, so a port of a test's namespace must never be one of
//! theirs.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::ss::{ss_sockets_via, SsSocket};

/// A network namespace made with `ip netns add`, with `lo` up and its
/// ephemeral ports in [`disjoint_port_range`]; deleted on drop (it lives
/// on while processes are in it).
pub struct NetNs {
    name: String,
    inode: u64,
}

/// Runs a command, panicking with its output if it fails.
fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A name no other test (of this run or a concurrent one) uses.
fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

impl NetNs {
    pub fn create() -> NetNs {
        let name = unique("tracer-test");
        run(&["ip", "netns", "add", &name]);
        // From here on, dropping it deletes it (also on a panic below).
        let mut ns = NetNs { name, inode: 0 };
        ns.inode = std::fs::metadata(format!("/run/netns/{}", ns.name))
            .unwrap_or_else(|e| panic!("/run/netns/{}: {e}", ns.name))
            .ino();
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        let (lo, hi) = disjoint_port_range();
        let set = format!("echo '{lo} {hi}' > /proc/sys/net/ipv4/ip_local_port_range");
        run(&["ip", "netns", "exec", &ns.name, "sh", "-c", &set]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its inode: `net:[INODE]` in `ls -l /proc/PID/ns/net`.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// The command that runs its arguments in place, inside it.
    pub fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// `ss -tanpeH state STATE` inside it.
    pub fn ss(&self, state: &str) -> Vec<SsSocket> {
        ss_sockets_via(&self.wrapper(), state)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The host's ephemeral port range (`net.ipv4.ip_local_port_range`).
pub fn host_port_range() -> (u16, u16) {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_else(|e| panic!("reading ip_local_port_range: {e}"));
    let mut it = text.split_whitespace().map(|v| v.parse::<u16>().expect("a port"));
    (it.next().expect("low"), it.next().expect("high"))
}

/// 10000 ports below the host's ephemeral range (or above it, when it
/// starts too low): where a test's namespace takes its ephemeral ports.
pub fn disjoint_port_range() -> (u16, u16) {
    let (lo, hi) = host_port_range();
    if lo > 11_024 {
        (lo - 10_000, lo - 1)
    } else {
        assert!(
            hi < 55_535,
            "the host's ephemeral ports {lo}-{hi} leave no room for a disjoint range"
        );
        (hi + 1, hi + 10_000)
    }
}

/// The inode of `pid`'s network namespace.
pub fn ns_inode(pid: u32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ns/net: {e}"))
        .ino()
}

/// Every network namespace some process is in, but ours: its inode and a
/// `/proc/PID/ns/net` of it (valid while that process lives).
pub fn other_namespaces() -> Vec<(u64, String)> {
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    let mut seen: Vec<u64> = own.into_iter().collect();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let file = format!("/proc/{pid}/ns/net");
        if let Ok(m) = std::fs::metadata(&file) {
            if !seen.contains(&m.ino()) {
                seen.push(m.ino());
                out.push((m.ino(), file));
            }
        }
    }
    out
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on a hybrid host), from `/proc/self/mounts`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .collect();
    let preferred = Path::new("/sys/fs/cgroup");
    found
        .iter()
        .find(|d| *d == preferred)
        .or_else(|| found.first())
        .cloned()
}

/// 64 random lowercase hex digits: a container id.
pub fn random_container_id() -> String {
    let mut bytes = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    std::io::Read::read_exact(&mut f, &mut bytes).expect("random bytes");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A cgroup `tracer-test-PID-N.slice/LEAF` under the cgroup v2 mount, named
/// as a runtime names a container's (`LEAF` = `libpod-<id>.scope`). On
/// drop, whatever still runs in it is killed and both are removed.
pub struct TestCgroup {
    slice: PathBuf,
    leaf: PathBuf,
    path: String,
}

impl TestCgroup {
    pub fn new(mount: &Path, leaf: &str) -> TestCgroup {
        let slice_name = format!("{}.slice", unique("tracer-test"));
        let slice = mount.join(&slice_name);
        std::fs::create_dir(&slice).unwrap_or_else(|e| panic!("creating {}: {e}", slice.display()));
        let cg = TestCgroup {
            leaf: slice.join(leaf),
            slice,
            path: format!("/{slice_name}/{leaf}"),
        };
        std::fs::create_dir(&cg.leaf).unwrap_or_else(|e| panic!("creating {}: {e}", cg.leaf.display()));
        cg
    }

    /// Its path as `/proc/PID/cgroup`'s `0::` line shows it.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Moves `pid` into it.
    pub fn add(&self, pid: u32) {
        let procs = self.leaf.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).unwrap_or_else(|e| panic!("writing {pid} to {}: {e}", procs.display()));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // cgroup.kill (5.14+) ends whatever is left; then the directories
        // go once the kernel has let the processes out.
        let _ = std::fs::write(self.leaf.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        for dir in [&self.leaf, &self.slice] {
            while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disjoint_ports_are_disjoint() {
        let (lo, hi) = host_port_range();
        let (a, b) = disjoint_port_range();
        assert!(a < b && (b < lo || a > hi), "{a}-{b} vs {lo}-{hi}");
    }

    #[test]
    fn container_ids_are_64_hex() {
        let id = random_container_id();
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(id, random_container_id());
    }
}
