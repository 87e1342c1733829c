//! What the bench's programs share: `tracer-bench` (the cost bench,
//! src/main.rs) and `tracer-soak` (the long run, src/soak/) both start,
//! watch and stop child processes the same way.

pub mod procs;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The loadgen to run (`given`, else the one beside this executable), once
/// it and the tracer exist and we run as root (`why_root` says what needs
/// it).
pub fn check_binaries(tracer: &Path, given: Option<&Path>, why_root: &str) -> Result<PathBuf> {
    let loadgen = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .context("finding our own executable")?
            .with_file_name("loadgen"),
    };
    for (what, p) in [("tracer", tracer), ("loadgen", loadgen.as_path())] {
        if !p.is_file() {
            bail!("{what} not found at {}", p.display());
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{why_root}: run as root");
    }
    Ok(loadgen)
}

/// Starts `loadgen server` with `threads` and `addrs`, and waits for the
/// port it listens on.
pub fn start_loadgen_server(loadgen: &Path, threads: usize, addrs: usize) -> Result<(procs::Proc, u16)> {
    use procs::{OnParentDeath, Out, Proc};
    let mut cmd = std::process::Command::new(loadgen);
    cmd.args([
        "server",
        "--threads",
        &threads.to_string(),
        "--addrs",
        &addrs.to_string(),
    ]);
    let mut server = Proc::spawn("loadgen server", cmd, false, Out::Null, OnParentDeath::Kill)?;
    let mut port = None;
    server.wait_until("READY", std::time::Duration::from_secs(30), |p| {
        port = p.stderr_line("READY port=").and_then(|l| {
            l.trim_start_matches("READY port=")
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u16>().ok())
        });
        port.is_some()
    })?;
    Ok((server, port.expect("checked")))
}
