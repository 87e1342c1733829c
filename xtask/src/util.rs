//! Helpers shared by the commands: where things are, how children are run,
//! and how a command line is shown to the user.

use std::env;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The workspace root. xtask lives directly under it, and every cargo child
/// runs from there so that the root's `default-members` apply even when
/// `cargo xtask` is invoked from a subdirectory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent directory")
}

/// The cargo that runs us (cargo exports `CARGO` to `cargo run` children),
/// so children use the same toolchain as `cargo xtask` itself.
pub fn cargo_program() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Where `cargo install` and rustup put binaries. In a CI shell that never
/// sourced `~/.cargo/env` these directories are not on PATH.
pub fn cargo_bin_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME").filter(|h| !h.is_empty()) {
        let dir = PathBuf::from(home).join(".cargo").join("bin");
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

/// First executable file called `name` in `dirs`.
pub fn find_in(name: &str, dirs: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    dirs.into_iter()
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// First `name` on PATH, like `command -v`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    find_in(name, env::split_paths(&path))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a probe (`--version` and the like) quietly and returns its trimmed
/// stdout, or None if it could not run or failed. Probes never install
/// anything (RUSTUP_AUTO_INSTALL=0) and never read stdin.
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .env("RUSTUP_AUTO_INSTALL", "0")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs one step of a task: shows the command, runs it without stdin (CI has
/// none, and nothing here may prompt), and turns a failure into an error that
/// names the step.
///
/// The child's stdout goes to our stderr: everything xtask prints before the
/// tracer starts is progress, and `cargo xtask run -- ... > out` must capture
/// only what the tracer writes.
pub fn run_step(step: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("==> {}", display(cmd));
    run_step_quietly(step, cmd)
}

/// [`run_step`] for a command the caller has already shown (setup's
/// `installing <name>: <command>` lines).
pub fn run_step_quietly(step: &str, cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    let stderr = io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stderr")?;
    cmd.stdin(Stdio::null()).stdout(stderr);
    check_status(step, &shown, cmd)
}

/// Like [`run_step`] but keeps the child's stdout (test results belong there).
pub fn run_step_with_stdout(step: &str, cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    eprintln!("==> {shown}");
    cmd.stdin(Stdio::null());
    check_status(step, &shown, cmd)
}

fn check_status(step: &str, shown: &str, cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| {
        let program = cmd.get_program().to_string_lossy().into_owned();
        format!("step '{step}' failed: could not start {program} (for `{shown}`)")
    })?;
    if !status.success() {
        bail!("step '{step}' failed: `{shown}` exited with {status}");
    }
    Ok(())
}

/// The command as a shell line: explicitly set variables (except PATH, which
/// is only ever our PATH plus tool directories), program, arguments.
pub fn display(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        let value = value?;
        (key != "PATH" && key != "RUSTUP_AUTO_INSTALL").then(|| format!("{}={}", key.to_string_lossy(), quote(value)))
    });
    // The cargo we run is a toolchain's full path; `cargo` reads better and
    // means the same when pasted into a shell in this workspace.
    let program = if cmd.get_program() == cargo_program() {
        "cargo".to_owned()
    } else {
        quote(cmd.get_program())
    };
    let program = std::iter::once(program);
    let args = cmd.get_args().map(quote);
    envs.chain(program).chain(args).collect::<Vec<_>>().join(" ")
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `target_directory` from `cargo metadata`: honours CARGO_TARGET_DIR and
/// `build.target-dir` exactly as the build did, unlike guessing `target/`.
pub fn target_dir(mut cargo: Command) -> Result<PathBuf> {
    let out = cargo
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata exited with {}", out.status);
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata output")?;
    let dir = meta["target_directory"]
        .as_str()
        .context("cargo metadata output has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// Builds the release `tracer` and the bench crate, and returns the release
/// directory once each of `bins` is there.
pub fn build_release_bench(cargo: impl Fn() -> Command, bins: &[&str]) -> Result<PathBuf> {
    run_step(
        "build",
        cargo().args(["build", "--release", "-p", "tracer", "-p", "tracer-bench"]),
    )?;
    let release = target_dir(cargo())?.join("release");
    for bin in bins {
        anyhow::ensure!(
            release.join(bin).is_file(),
            "step 'build' failed: {} was not produced",
            release.join(bin).display()
        );
    }
    Ok(release)
}
