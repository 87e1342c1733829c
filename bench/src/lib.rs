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
