//! Helper processes that are copies of ourselves (the server of `run`, the
//! `hold` helpers): started so that they die with us, and their stderr read
//! up to their READY line.

use std::io::{self, BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::thread;

/// Spawns a copy of ourselves that dies with us (PR_SET_PDEATHSIG), with
/// stdin piped (closing it asks `hold` to exit) and stderr piped.
pub fn spawn_self(args: &[String]) -> io::Result<std::process::Child> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Reads a child's stderr until a line starting with `prefix`; returns the
/// rest of that line and the reader (for the lines after). Other lines are
/// passed on to our stderr.
pub fn wait_ready(
    stderr: std::process::ChildStderr,
    prefix: &str,
) -> io::Result<(String, io::Lines<BufReader<std::process::ChildStderr>>)> {
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(rest) = line.strip_prefix(prefix) {
            return Ok((rest.to_owned(), lines));
        }
        eprintln!("{line}");
    }
    Err(io::Error::other("it exited before it was ready"))
}

/// Passes a helper's remaining stderr lines on to ours, from a thread.
pub fn forward_lines(lines: io::Lines<BufReader<std::process::ChildStderr>>) {
    thread::spawn(move || {
        for line in lines.map_while(|l| l.ok()) {
            eprintln!("{line}");
        }
    });
}
