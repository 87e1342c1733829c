//! `cargo xtask soak`: the tracer for minutes on a busy host. Builds the
//! release tracer and the bench crate, then runs `tracer-soak`
//! (bench/src/soak/), which makes the load (connection churn, thousands of
//! short-lived processes that each leak a socket, tens of thousands of idle
//! connections), samples the tracer, judges the figures and prints them.
//! Exits with tracer-soak's exit code: non-zero when a criterion fails.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

use crate::setup;
use crate::util;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Minutes of load (1 to try it out).
    #[arg(long, value_name = "N", default_value_t = 5.0)]
    pub minutes: f64,

    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,

    /// More options for tracer-soak, after `--` (for example
    /// `-- --idle 50000 --leakers-per-sec 30`; see
    /// `target/release/tracer-soak --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "SOAK_ARGS")]
    pub soak_args: Vec<OsString>,
}

pub fn run(args: Args) -> Result<i32> {
    let env = setup::run()?;
    ensure!(
        util::is_root(),
        "the soak runs the tracer, which loads eBPF programs: run it as root"
    );
    let release = util::build_release_bench(|| env.cargo(), &["tracer", "tracer-soak", "loadgen"])?;
    let target = release
        .parent()
        .expect("release is in the target directory")
        .to_path_buf();
    let mut cmd = env.command(release.join("tracer-soak"));
    cmd.arg("--tracer")
        .arg(release.join("tracer"))
        .arg("--loadgen")
        .arg(release.join("loadgen"))
        .arg("--work")
        .arg(target.join("soak"))
        .args(["--minutes", &args.minutes.to_string()]);
    // The soak runs from the workspace root: a relative path is the user's.
    if let Some(p) = args.json {
        let p = if p.is_relative() {
            std::env::current_dir().context("current directory")?.join(p)
        } else {
            p
        };
        cmd.arg("--json").arg(p);
    }
    cmd.args(&args.soak_args);
    eprintln!("==> {}", util::display(&cmd));
    // Its verdict is its exit code, explained on its stderr: passed on
    // as ours, without a second error line.
    let status = cmd
        .stdin(std::process::Stdio::null())
        .status()
        .context("starting tracer-soak")?;
    Ok(status.code().unwrap_or(1))
}
