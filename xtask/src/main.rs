//! Developer tasks for tracer: `cargo xtask <command>` (alias in
//! .cargo/config.toml). Plain Rust instead of shell scripts so that the same
//! logic runs on developer machines and in CI.

mod bench;
mod kernels;
mod lint;
mod run;
mod setup;
mod soak;
mod test;
mod util;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(bin_name = "cargo xtask", about = "Developer tasks for tracer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check, and install if missing, the pinned nightly, LLVM 22, bpf-linker and ss.
    Setup,
    /// Setup, build the binaries, run the whole test suite, then `bench --quick`.
    Test(test::Args),
    /// Setup, build tracer (release) and run it with the given arguments.
    Run(run::Args),
    /// Setup, then cargo fmt --check and cargo clippy -D warnings.
    Lint,
    /// Setup, build release, and measure the tracer's cost on a loopback
    /// connection churn next to peer tools (needs root).
    Bench(bench::Args),
    /// Setup, build release, and run the tracer for minutes under churn,
    /// thousands of leaking processes and many idle sockets; judge leaks
    /// found, stacks, drops and memory (needs root).
    Soak(soak::Args),
    /// Boot one of Debian's kernels under qemu with this host's root shared
    /// read-only, and run a command (default: a tracer smoke scenario) in it.
    Vm(vm::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::run().map(|_| 0),
        Cmd::Test(args) => test::run(args).map(|()| 0),
        Cmd::Run(args) => run::run(args),
        Cmd::Lint => lint::run().map(|()| 0),
        Cmd::Bench(args) => bench::run(args).map(|()| 0),
        Cmd::Soak(args) => soak::run(args),
        Cmd::Vm(args) => vm::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line, the whole context chain, never a backtrace (even with
            // RUST_BACKTRACE set): these errors are for users, not for us.
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
