//! `tracer live --json` run as an unprivileged user with only some
//! capabilities ([`run_reduced`]), through `setpriv` (util-linux): uid and
//! gid [`NOBODY`], no groups, and the given capabilities made ambient so
//! they survive the exec. Needs root (to grant them) and `setpriv`
//! ([`require_setpriv`]: skip locally, fail in CI).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use crate::child::Child;
use crate::paths::tracer_bin;
use crate::privileges::current_test_name;
use crate::tracer::TracerOutput;

/// The uid and gid the tracer runs as: not root, not the fixture's owner.
pub const NOBODY: u32 = 65534;

/// The capabilities that give full findings (README, Requirements), as
/// `setpriv` names them.
pub const FULL_SET: [&str; 5] = ["bpf", "perfmon", "sys_ptrace", "dac_read_search", "checkpoint_restore"];

/// [`FULL_SET`] without `cap`.
pub fn full_set_without(cap: &str) -> Vec<&'static str> {
    assert!(FULL_SET.contains(&cap), "{cap} is not in the full set");
    FULL_SET.iter().copied().filter(|c| *c != cap).collect()
}

/// `setpriv`, or None (after a skip notice) when it is missing and CI is
/// not set. Panics under CI: a missing prerequisite fails the test there.
pub fn require_setpriv() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("setpriv"))
            .find(|p| p.is_file())
    });
    if found.is_some() {
        return found;
    }
    let test = current_test_name();
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{test} needs setpriv (util-linux) to run tracer with reduced capabilities, and CI is set: install util-linux");
    }
    eprintln!("skipping: {test} needs setpriv (util-linux) to run tracer with reduced capabilities");
    None
}

/// The bit of a capability (as `setpriv` names it) in `CapEff`.
pub fn cap_bit(cap: &str) -> u32 {
    match cap {
        "dac_override" => 1,
        "dac_read_search" => 2,
        "sys_ptrace" => 19,
        "sys_admin" => 21,
        "syslog" => 34,
        "perfmon" => 38,
        "bpf" => 39,
        "checkpoint_restore" => 40,
        _ => panic!("unknown capability {cap}"),
    }
}

/// `tracer live --json ARGS...` as [`NOBODY`] with exactly `caps`
/// (effective, permitted, inheritable and ambient; nothing else).
pub fn run_reduced(setpriv: &PathBuf, caps: &[&str], args: &[&str]) -> Child {
    run_reduced_cmd(setpriv, caps, &["live", "--json"], args)
}

/// `tracer COMMAND... ARGS...` (for example `["daemon"]`) as [`NOBODY`]
/// with exactly `caps`, as [`run_reduced`].
pub fn run_reduced_cmd(setpriv: &PathBuf, caps: &[&str], command: &[&str], args: &[&str]) -> Child {
    let list: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let id = NOBODY.to_string();
    let mut cmd = Command::new(setpriv);
    cmd.args(["--reuid", &id, "--regid", &id, "--clear-groups"])
        .arg(format!("--inh-caps={list}"))
        .arg(format!("--ambient-caps={list}"))
        .arg(tracer_for_nobody())
        .args(command)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE");
    Child::spawn(
        &format!(
            "tracer {} {} (uid {NOBODY}, caps {caps:?})",
            command.join(" "),
            args.join(" ")
        ),
        cmd,
    )
}

/// Whether others (uid [`NOBODY`]) can run `path`: every directory above
/// it searchable, the file executable.
fn others_can_run(path: &Path) -> bool {
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode()).unwrap_or(0);
    mode(path) & 0o001 != 0 && path.ancestors().skip(1).all(|d| mode(d) & 0o001 != 0)
}

static COPY: OnceLock<Result<PathBuf, String>> = OnceLock::new();

extern "C" fn remove_copy() {
    if let Some(Ok(bin)) = COPY.get() {
        if let Some(dir) = bin.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The tracer binary, where uid [`NOBODY`] can run it: [`tracer_bin`]
/// itself, or (a checkout under a private home directory) a copy in a
/// temporary directory removed when the test process exits.
pub fn tracer_for_nobody() -> PathBuf {
    let bin = tracer_bin();
    if others_can_run(&bin) {
        return bin;
    }
    let copy = COPY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tracer-test-reduced-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        // SAFETY: registers a plain `extern "C" fn` that only reads a
        // static; nothing else is required of atexit's argument.
        unsafe { libc::atexit(remove_copy) };
        let to = dir.join("tracer");
        std::fs::copy(&bin, &to).map_err(|e| format!("copying {} to {}: {e}", bin.display(), to.display()))?;
        for (p, mode) in [(&dir, 0o755), (&to, 0o755)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod {}: {e}", p.display()))?;
        }
        if others_can_run(&to) {
            Ok(to)
        } else {
            Err(format!("{} is not reachable by other users either", to.display()))
        }
    });
    match copy {
        Ok(p) => p.clone(),
        Err(e) => panic!("uid {NOBODY} cannot run {}, and copying it failed: {e}", bin.display()),
    }
}

/// Waits for the tracer's `start` line.
pub fn wait_started(child: &mut Child, timeout: Duration) {
    child.wait_line(
        |l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["type"] == "start"),
        timeout,
    );
}

/// `(uid, CapEff)` of a running process, from `/proc/PID/status`: what the
/// tracer really runs with.
pub fn uid_and_caps(pid: u32) -> (u32, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{status}"))
            .trim()
            .to_string()
    };
    let uid = field("Uid:")
        .split_whitespace()
        .nth(1)
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("bad Uid line in /proc/{pid}/status:\n{status}"));
    let caps = u64::from_str_radix(&field("CapEff:"), 16)
        .unwrap_or_else(|_| panic!("bad CapEff line in /proc/{pid}/status:\n{status}"));
    (uid, caps)
}

/// Asserts that the process runs as [`NOBODY`] with exactly `caps`.
pub fn assert_runs_with(pid: u32, caps: &[&str]) {
    let want = caps.iter().fold(0u64, |m, c| m | 1 << cap_bit(c));
    let (uid, eff) = uid_and_caps(pid);
    assert_eq!(uid, NOBODY, "pid {pid} does not run as uid {NOBODY}");
    assert_eq!(eff, want, "pid {pid}: CapEff {eff:#x}, expected {want:#x} ({caps:?})");
}

/// Waits for the tracer to exit and parses its stdout as JSON lines, as
/// [`crate::Tracer::finish`] does.
pub fn finish(mut child: Child, timeout: Duration) -> TracerOutput {
    let Some(status) = child.wait_finished(timeout) else {
        let desc = child.describe();
        child.kill();
        panic!("tracer did not exit within {timeout:?}\n{desc}");
    };
    let lines = child.lines_seen().to_vec();
    let mut objects = Vec::with_capacity(lines.len());
    for line in lines {
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v.is_object() && v.get("type").is_some_and(Value::is_string) => objects.push(v),
            _ => panic!(
                "tracer printed a stdout line that is not a JSON object with a \"type\": {line:?}\n{}",
                child.describe()
            ),
        }
    }
    TracerOutput {
        objects,
        status,
        stderr: child.stderr_text(),
    }
}

/// The stderr lines that warn about a /proc entry the kernel refused
/// (tracer's privileges warnings), each at most once per run.
pub fn refusal_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("cannot read /proc/PID/") && l.contains("(permission denied)"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_set_without_one() {
        assert_eq!(
            full_set_without("sys_ptrace"),
            ["bpf", "perfmon", "dac_read_search", "checkpoint_restore"]
        );
        let bits: Vec<u32> = FULL_SET.iter().map(|c| cap_bit(c)).collect();
        assert_eq!(bits, [39, 38, 19, 2, 40]);
    }

    #[test]
    fn the_tracer_is_runnable_by_others() {
        assert!(others_can_run(Path::new("/bin/sh")));
        assert!(!others_can_run(Path::new("/nonexistent/tracer")));
    }

    #[test]
    fn our_own_status_parses() {
        let (uid, _) = uid_and_caps(std::process::id());
        // SAFETY: getuid has no preconditions and cannot fail.
        assert_eq!(uid, unsafe { libc::getuid() });
    }

    #[test]
    fn refusal_lines_are_the_privilege_warnings() {
        let stderr = "[WARN  tracer::kernel] something else\n\
                      [WARN  tracer::privileges] cannot read /proc/PID/fd of 3 processes (permission denied): x\n\
                      [WARN  tracer::privileges] cannot read /proc/PID/mem of 1 process (permission denied): y\n";
        assert_eq!(refusal_lines(stderr).len(), 2);
    }
}
