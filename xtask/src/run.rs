//! `cargo xtask run -- <tracer args>`: build the release tracer and run it
//! in the foreground, exiting with its exit code.
//!
//! Signals: cargo execs into xtask, so the process tree is shell → xtask →
//! tracer, all in the terminal's foreground process group. Ctrl-C (SIGINT)
//! therefore reaches the tracer directly; xtask must survive it to report the
//! tracer's exit code. Signals sent to xtask alone (`kill`, `timeout`, a CI
//! runner cancelling the job) are forwarded, and if xtask dies anyway the
//! kernel sends SIGTERM to the tracer (PR_SET_PDEATHSIG), so no tracer is
//! ever left running behind a dead xtask.

use std::ffi::{c_int, c_void, OsString};
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{ensure, Context, Result};

use crate::setup;
use crate::util::{self, run_step};

#[derive(clap::Args)]
pub struct Args {
    /// Build with the release profile. This is already the default (and the
    /// only profile `run` uses); the flag is accepted for habit's sake.
    #[arg(long)]
    release: bool,

    /// Arguments for tracer, after `--` (for example `cargo xtask run -- --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "TRACER_ARGS")]
    tracer_args: Vec<OsString>,
}

/// The running tracer's pid, for the signal handler (0: none).
static CHILD: AtomicI32 = AtomicI32::new(0);

const FORWARDED: [c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

pub fn run(args: Args) -> Result<i32> {
    // Release is the only profile `run` builds; the flag changes nothing.
    let _ = args.release;
    let env = setup::run()?;

    run_step("build", env.cargo().args(["build", "--release", "-p", "tracer"]))?;
    let tracer = util::target_dir(env.cargo())?.join("release").join("tracer");
    ensure!(
        tracer.is_file(),
        "step 'build' failed: {} was not produced",
        tracer.display()
    );

    // Deliberately not env.command(): the tracer runs in the user's current
    // directory (relative paths in its arguments) with the user's PATH.
    // Not being root is no error here: the tracer itself explains that it
    // needs root or CAP_BPF.
    let mut cmd = Command::new(&tracer);
    cmd.args(&args.tracer_args);
    eprintln!("==> {}", util::display(&cmd));

    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // xtask may have died between fork and prctl; the death signal
            // would then never come, so do not start at all.
            if libc::getppid() != parent {
                return Err(io::Error::other("xtask exited before the tracer started"));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {}", tracer.display()))?;
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    // Installed after spawn so the tracer starts with default dispositions.
    // A signal arriving before this kills xtask, and PDEATHSIG the tracer.
    for sig in FORWARDED {
        install_forwarder(sig).context("installing signal handlers")?;
    }

    let status = child.wait().context("waiting for the tracer")?;
    CHILD.store(0, Ordering::SeqCst);

    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => {
            eprintln!("tracer was killed by signal {sig}");
            128 + sig
        }
        (None, None) => 1,
    })
}

fn install_forwarder(sig: c_int) -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the handler
    // has the SA_SIGINFO signature and is async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) = forward;
        action.sa_sigaction = handler as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn forward(sig: c_int, info: *mut libc::siginfo_t, _: *mut c_void) {
    // Signals the terminal generates (Ctrl-C, Ctrl-\, hangup) go to the whole
    // foreground process group and come with SI_KERNEL: the tracer already
    // has its own copy, and a second one might cut its shutdown short.
    // SAFETY: the kernel passes a valid siginfo to SA_SIGINFO handlers.
    if !info.is_null() && unsafe { (*info).si_code } == libc::SI_KERNEL {
        return;
    }
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe; pid is our unreaped child.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}
