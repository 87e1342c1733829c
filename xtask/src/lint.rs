//! `cargo xtask lint`: formatting and clippy, kept out of `test` so that CI
//! reports test results even when a lint regresses.

use anyhow::{bail, Result};

use crate::setup;
use crate::util::run_step;

pub fn run() -> Result<()> {
    // Clippy compiles tracer, whose build script builds the eBPF crate with
    // the pinned nightly and bpf-linker.
    let env = setup::run()?;

    // Run both even if the first fails, so one run shows every problem.
    let fmt = run_step("fmt", env.cargo().args(["fmt", "--all", "--", "--check"]));
    // Default members only, for the same reason as in `test`: tracer-ebpf
    // does not build for the host. `-D warnings` so that lint fails on them.
    let clippy = run_step(
        "clippy",
        env.cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]),
    );
    let failed: Vec<String> = [fmt, clippy]
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join("; "));
    }
    Ok(())
}
