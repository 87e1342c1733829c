//! `cargo xtask test`: the one command that builds and tests everything,
//! locally and in CI (.ci/run), and then proves the bench still works
//! (`cargo xtask bench --quick`; timing is printed, never asserted).

use std::ffi::OsString;

use anyhow::{ensure, Result};

use crate::bench;
use crate::kernels;
use crate::setup;
use crate::util::{self, run_step, run_step_with_stdout};

#[derive(clap::Args)]
pub struct Args {
    /// Do not run `cargo xtask bench --quick` after the tests.
    #[arg(long)]
    no_bench: bool,

    /// Also run the integration subset inside these kernels under qemu
    /// (Debian's 5.10, 6.1 or 6.12; repeatable). Default: all three.
    #[arg(long = "kernel", value_name = "VERSION")]
    kernels: Vec<String>,

    /// Do not boot other kernels.
    #[arg(long, conflicts_with = "kernels")]
    no_kernels: bool,

    /// Only the runs on other kernels: no host tests, no bench.
    #[arg(long, conflicts_with = "no_kernels")]
    only_kernels: bool,

    /// Extra arguments for `cargo test`, after `--` (for example
    /// `cargo xtask test -- some_test -- --nocapture`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "CARGO_TEST_ARGS")]
    cargo_test_args: Vec<OsString>,
}

pub fn run(args: Args) -> Result<()> {
    let env = setup::run()?;

    if !util::is_root() {
        eprintln!(
            "warning: not running as root: the privileged integration tests (loading eBPF) will skip, or fail under CI"
        );
    }

    // The tests run the real binaries (tracer and the tcp-fixture of
    // tracer-tests), so build them first; `cargo test` alone builds only
    // tcp-fixture for its own package.
    //
    // No --workspace: the root's default-members leave out tracer-ebpf,
    // which only builds for the BPF target (tracer/build.rs does that) and
    // whose `tracer` binary would collide with the agent's.
    run_step("build", env.cargo().args(["build", "--bins"]))?;

    let tracer = util::target_dir(env.cargo())?.join("debug").join("tracer");
    ensure!(
        tracer.is_file(),
        "step 'build' failed: {} was not produced",
        tracer.display()
    );

    if !args.only_kernels {
        run_step_with_stdout(
            "test",
            env.cargo()
                .arg("test")
                .args(&args.cargo_test_args)
                .env("TRACER_BIN", &tracer),
        )?;
    }

    // The bench's mechanics (load generator, tracer start and stop in every
    // configuration, counters, table) are part of what CI proves.
    if args.no_bench || args.only_kernels {
        eprintln!("bench skipped");
    } else if !args.cargo_test_args.is_empty() {
        eprintln!("bench skipped: cargo test arguments given (a partial run); run `cargo xtask bench --quick`");
    } else if !util::is_root() {
        eprintln!("warning: bench skipped: it needs root");
    } else {
        bench::run_prepared(
            &env,
            bench::Args {
                quick: true,
                ..bench::Args::default()
            },
        )?;
    }

    // The same tracer on the kernels users run (CI: 5.10 and 6.1 at least).
    if args.no_kernels {
        eprintln!("other kernels skipped (--no-kernels)");
    } else if !args.cargo_test_args.is_empty() && args.kernels.is_empty() {
        eprintln!("other kernels skipped: cargo test arguments given (a partial run); add --kernel VERSION");
    } else if !util::is_root() {
        eprintln!("warning: other kernels skipped: booting them needs root");
    } else {
        let versions: Vec<String> = if args.kernels.is_empty() {
            kernels::DEFAULT.iter().map(|v| v.to_string()).collect()
        } else {
            args.kernels.clone()
        };
        // The release tracer, as users run it (the bench has built it
        // already): under emulation a debug build's BTF parsing alone took
        // ~6 s of every test's tracer start.
        run_step(
            "build release",
            env.cargo().args(["build", "--release", "-p", "tracer"]),
        )?;
        let release = util::target_dir(env.cargo())?.join("release").join("tracer");
        ensure!(
            release.is_file(),
            "step 'build release' failed: {} was not produced",
            release.display()
        );
        kernels::run(&env, &release, &versions)?;
    }
    Ok(())
}
