//! `cargo xtask setup`: checks, and installs when missing, what building and
//! testing tracer needs beyond stable Rust. Every check is cheap, so the
//! other commands run it first; on a prepared machine it only prints `ok`.
//!
//! Order matters: the apt packages come first because bpf-linker is built
//! against (and dynamically linked to) LLVM from `llvm-22-dev`.

use std::env;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{self, cargo_bin_dirs, find_in, find_on_path, probe, run_step, run_step_quietly};

/// Pinned nightly for the eBPF crate (see tracer/build.rs): its LLVM must be
/// the one bpf-linker is built against, or bpf-linker cannot read its bitcode.
const NIGHTLY: &str = "nightly-2026-05-20";
/// LLVM major version shared by `NIGHTLY` and bpf-linker.
const LLVM_MAJOR: &str = "22";
const LLVM_PACKAGE: &str = "llvm-22-dev";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The cargo feature selecting bpf-linker's LLVM; must match `LLVM_MAJOR`.
const BPF_LINKER_FEATURE: &str = "llvm-22";
/// The JDK the JVM integration tests (tests/tests/java.rs) compile their
/// fixture with and run it on.
const JDK_PACKAGE: &str = "openjdk-17-jdk-headless";
/// The oldest `javac` accepted (a newer JDK already installed will do).
const JDK_MIN_MAJOR: u32 = 17;

/// What the other commands need from setup: a PATH on which the tools just
/// checked are found by children (cargo's build scripts call `rustup` and
/// `bpf-linker` by name).
pub struct Prepared {
    path: OsString,
}

impl Prepared {
    /// A command run from the workspace root with the prepared PATH.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("PATH", &self.path).current_dir(util::workspace_root());
        cmd
    }

    pub fn cargo(&self) -> Command {
        self.command(util::cargo_program())
    }
}

enum Check {
    Ok(String),
    Missing(String),
}

/// Checks a system package; may add the directory of what it found to PATH.
type CheckFn = fn(&mut SearchPath) -> Check;

/// PATH for children: tool directories we found off PATH go first (so a
/// stale bpf-linker earlier on PATH cannot win), system directories last.
struct SearchPath {
    front: Vec<PathBuf>,
    back: Vec<PathBuf>,
}

impl SearchPath {
    fn new() -> Self {
        // rustup and cargo-installed tools live in ~/.cargo/bin, which a
        // non-login CI shell may not have on PATH.
        let on_path = current_path();
        let back = cargo_bin_dirs().into_iter().filter(|d| !on_path.contains(d)).collect();
        SearchPath {
            front: Vec::new(),
            back,
        }
    }

    fn prepend(&mut self, dir: &Path) {
        self.front.retain(|d| d != dir);
        self.front.insert(0, dir.to_path_buf());
    }

    fn append(&mut self, dir: &Path) {
        if !current_path().iter().any(|d| d == dir) && !self.back.iter().any(|d| d == dir) {
            self.back.push(dir.to_path_buf());
        }
    }

    fn dirs(&self) -> Vec<PathBuf> {
        let middle = current_path().into_iter().filter(|d| !self.front.contains(d));
        self.front
            .iter()
            .cloned()
            .chain(middle)
            .chain(self.back.iter().filter(|d| !self.front.contains(d)).cloned())
            .collect()
    }

    fn find(&self, name: &str) -> Option<PathBuf> {
        find_in(name, self.dirs())
    }

    fn to_os_string(&self) -> Result<OsString> {
        env::join_paths(self.dirs()).context("building PATH")
    }
}

fn current_path() -> Vec<PathBuf> {
    env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default()
}

fn ok(name: &str, detail: &str) {
    eprintln!("ok {name} ({detail})");
}

pub fn run() -> Result<Prepared> {
    let mut path = SearchPath::new();
    ensure_apt_packages(&mut path)?;
    ensure_nightly(&mut path)?;
    ensure_bpf_linker(&mut path)?;
    Ok(Prepared {
        path: path.to_os_string()?,
    })
}

/// System packages from apt. Checked together so that a non-root user gets
/// one command covering everything that needs root.
fn ensure_apt_packages(path: &mut SearchPath) -> Result<()> {
    // Each package with the extra `apt-get install` arguments it needs.
    let apt: [(&str, &[&str], CheckFn); 8] = [
        (LLVM_PACKAGE, &[], check_llvm),
        ("iproute2", &[], check_ss),
        (JDK_PACKAGE, &[], check_jdk),
        // Not its recommended prometheus-node-exporter: a second exporter,
        // started as a service where systemd runs, that no test uses.
        ("prometheus", &["--no-install-recommends"], check_prometheus),
        ("systemd", &[], check_systemd_analyze),
        // `cargo xtask test` boots other kernels (xtask/src/vm.rs): qemu,
        // busybox for virtme-ng's initramfs, depmod for the unpacked
        // modules (and modprobe inside the guest, for sock_diag's).
        ("qemu-system-x86", &["--no-install-recommends"], check_qemu),
        ("busybox-static", &[], check_busybox),
        ("kmod", &[], check_kmod),
    ];
    let mut missing = Vec::new();
    for (package, extra, check) in apt {
        match check(path) {
            Check::Ok(detail) => ok(package, &detail),
            Check::Missing(why) => {
                eprintln!("missing {package}: {why}");
                missing.push((package, extra, check));
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !util::is_root() {
        let list = missing.iter().map(|(p, ..)| *p).collect::<Vec<_>>().join(" ");
        bail!(
            "setup needs root to install {list}; run `sudo apt-get update && sudo apt-get install -y {list}`, then rerun `cargo xtask setup`"
        );
    }
    // Only refresh the package index when something is actually installed:
    // it is slow and needs the network.
    run_step("update apt package index", &mut apt_get(&["update"]))?;
    for (package, extra, check) in missing {
        let mut cmd = apt_get(&["install", "-y"]);
        cmd.args(extra).arg(package);
        eprintln!("installing {package}: {}", util::display(&cmd));
        run_step_quietly(&format!("install {package}"), &mut cmd)?;
        match check(path) {
            Check::Ok(detail) => eprintln!("installed {package} ({detail})"),
            Check::Missing(why) => {
                bail!("step 'install {package}' failed: still missing after install: {why}")
            }
        }
    }
    Ok(())
}

/// The pinned nightly with rust-src: aya-build runs
/// `cargo build -Z build-std=core` with it, which compiles `core` from source.
fn ensure_nightly(path: &mut SearchPath) -> Result<()> {
    let rustup = path.find("rustup").context(
        "rustup not found on PATH, in $CARGO_HOME/bin or in ~/.cargo/bin; install it from https://rustup.rs",
    )?;
    // aya-build calls `rustup run` by name.
    if let Some(dir) = rustup.parent() {
        path.append(dir);
    }
    match check_nightly(&rustup)? {
        Check::Ok(detail) => ok(NIGHTLY, &detail),
        Check::Missing(why) => {
            eprintln!("missing {NIGHTLY}: {why}");
            let mut cmd = Command::new(&rustup);
            if toolchain_installed(&rustup) {
                cmd.args(["component", "add", "rust-src", "--toolchain", NIGHTLY]);
            } else {
                // --no-self-update: installing a toolchain must not also
                // replace rustup itself as a side effect.
                cmd.args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])
                    .args(["--component", "rust-src", "--no-self-update"]);
            }
            cmd.env("PATH", path.to_os_string()?);
            eprintln!("installing {NIGHTLY}: {}", util::display(&cmd));
            run_step_quietly(&format!("install {NIGHTLY}"), &mut cmd)?;
            match check_nightly(&rustup)? {
                Check::Ok(detail) => eprintln!("installed {NIGHTLY} ({detail})"),
                Check::Missing(why) => {
                    bail!("step 'install {NIGHTLY}' failed: still missing after install: {why}")
                }
            }
        }
    }
    Ok(())
}

/// bpf-linker, built from source against the LLVM installed by apt.
fn ensure_bpf_linker(path: &mut SearchPath) -> Result<()> {
    match check_bpf_linker(path) {
        Check::Ok(detail) => ok("bpf-linker", &detail),
        Check::Missing(why) => {
            eprintln!("missing bpf-linker: {why}");
            // --force: when we get here an existing install is unusable (wrong
            // version, wrong LLVM, or it no longer runs), and without --force
            // cargo keeps a same-version install as it is.
            let mut cmd = Command::new(util::cargo_program());
            cmd.env("LLVM_PREFIX", LLVM_PREFIX)
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--locked", "--force", "--no-default-features"])
                .args(["--features", BPF_LINKER_FEATURE])
                .env("PATH", path.to_os_string()?);
            eprintln!("installing bpf-linker: {}", util::display(&cmd));
            run_step_quietly("install bpf-linker", &mut cmd)?;
            match check_bpf_linker(path) {
                Check::Ok(detail) => eprintln!("installed bpf-linker ({detail})"),
                Check::Missing(why) => {
                    bail!("step 'install bpf-linker' failed: still unusable after install: {why}")
                }
            }
        }
    }
    // Put the checked bpf-linker first for every child: another one earlier
    // on PATH would otherwise be the one the eBPF build links with.
    if let Some((bin, _)) = find_bpf_linker(path) {
        if let Some(dir) = bin.parent() {
            path.prepend(dir);
        }
    }
    Ok(())
}

pub(crate) fn apt_get(args: &[&str]) -> Command {
    let mut cmd = Command::new("apt-get");
    // Never prompt (no TTY in CI), and wait for the dpkg lock instead of
    // failing when a fresh machine runs unattended-upgrades at boot.
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-o", "DPkg::Lock::Timeout=300"])
        .args(args);
    cmd
}

/// llvm-22-dev provides llvm-config under a fixed prefix; bpf-linker's build
/// (llvm-sys) finds LLVM through it via LLVM_PREFIX.
fn check_llvm(_: &mut SearchPath) -> Check {
    let config = Path::new(LLVM_PREFIX).join("bin/llvm-config");
    if !config.exists() {
        return Check::Missing(format!("{} does not exist", config.display()));
    }
    let version = probe(Command::new(&config).arg("--version"));
    Check::Ok(match version {
        Some(v) => format!("{v}, {LLVM_PREFIX}"),
        None => config.display().to_string(),
    })
}

/// The integration tests compare the tracer's output with `ss`.
fn check_ss(path: &mut SearchPath) -> Check {
    // ss lives in /usr/sbin or /sbin on some systems, which a non-root PATH
    // may not contain.
    let sbin = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    let Some(ss) = find_on_path("ss").or_else(|| find_in("ss", sbin)) else {
        return Check::Missing("`ss` not found".into());
    };
    if let Some(dir) = ss.parent() {
        path.append(dir);
    }
    // `ss -V` prints e.g. "ss utility, iproute2-6.1.0".
    let version = probe(Command::new(&ss).arg("-V")).and_then(|v| v.rsplit(", ").next().map(str::to_owned));
    Check::Ok(match version {
        Some(v) => format!("{v}, {}", ss.display()),
        None => ss.display().to_string(),
    })
}

/// The deployment tests (tests/tests/deploy.rs) check the alert rules
/// with `promtool check rules` and `promtool test rules`, and the daemon's
/// tests scrape it with a real `prometheus` server: Debian's package
/// ships both.
fn check_prometheus(path: &mut SearchPath) -> Check {
    let Some(promtool) = find_on_path("promtool").or_else(|| find_in("promtool", [PathBuf::from("/usr/bin")])) else {
        return Check::Missing("`promtool` not found".into());
    };
    let Some(prometheus) = find_on_path("prometheus").or_else(|| find_in("prometheus", [PathBuf::from("/usr/bin")]))
    else {
        return Check::Missing("`prometheus` not found".into());
    };
    for bin in [&promtool, &prometheus] {
        if let Some(dir) = bin.parent() {
            path.append(dir);
        }
    }
    // "promtool, version 2.42.0+ds (branch: ..., revision: ...)".
    let version = probe(Command::new(&promtool).arg("--version")).and_then(|v| promtool_version(&v));
    Check::Ok(match version {
        Some(v) => format!("{v}, {}, {}", promtool.display(), prometheus.display()),
        None => format!("{}, {}", promtool.display(), prometheus.display()),
    })
}

/// The version in `promtool --version` output.
fn promtool_version(text: &str) -> Option<String> {
    let rest = text.lines().next()?.split_once("version ")?.1;
    rest.split_whitespace().next().map(str::to_owned)
}

fn check_qemu(path: &mut SearchPath) -> Check {
    check_binary(path, "qemu-system-x86_64")
}

fn check_busybox(path: &mut SearchPath) -> Check {
    check_binary(path, "busybox")
}

fn check_kmod(path: &mut SearchPath) -> Check {
    check_binary(path, "depmod")
}

/// A program that is there or not (its version does not matter).
fn check_binary(path: &mut SearchPath, name: &str) -> Check {
    let dirs = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    let Some(bin) = find_on_path(name).or_else(|| find_in(name, dirs)) else {
        return Check::Missing(format!("`{name}` not found"));
    };
    if let Some(dir) = bin.parent() {
        path.append(dir);
    }
    Check::Ok(bin.display().to_string())
}

/// The deployment tests check deploy/tracer.service with `systemd-analyze
/// verify`. A machine that boots systemd has it; a container image may not.
fn check_systemd_analyze(path: &mut SearchPath) -> Check {
    let dirs = ["/usr/bin", "/bin"].map(PathBuf::from);
    let Some(analyze) = find_on_path("systemd-analyze").or_else(|| find_in("systemd-analyze", dirs)) else {
        return Check::Missing("`systemd-analyze` not found".into());
    };
    if let Some(dir) = analyze.parent() {
        path.append(dir);
    }
    // "systemd 252 (252.38-1~deb12u1)".
    let version = probe(Command::new(&analyze).arg("--version")).and_then(|v| v.lines().next().map(str::to_owned));
    Check::Ok(match version {
        Some(v) => format!("{v}, {}", analyze.display()),
        None => analyze.display().to_string(),
    })
}

/// The JVM integration tests compile their fixture with `javac` and run it
/// with `java`: both must run, and `javac -version` must report
/// `JDK_MIN_MAJOR` or newer.
fn check_jdk(path: &mut SearchPath) -> Check {
    let Some(javac) = find_on_path("javac") else {
        return Check::Missing("`javac` not found on PATH".into());
    };
    // `javac 17.0.15`, on stdout since JDK 9 (on stderr before, which
    // `probe` drops: then the version is unreadable, and too old anyway).
    let Some(version) = probe(Command::new(&javac).arg("-version")) else {
        return Check::Missing(format!("`{} -version` did not run", javac.display()));
    };
    let Some(major) = javac_major(&version) else {
        return Check::Missing(format!(
            "cannot read the version in `{} -version`: {version:?}",
            javac.display()
        ));
    };
    if major < JDK_MIN_MAJOR {
        return Check::Missing(format!(
            "{} is {version}, need {JDK_MIN_MAJOR} or newer",
            javac.display()
        ));
    }
    if find_on_path("java").is_none() {
        return Check::Missing("`java` not found on PATH".into());
    }
    if let Some(dir) = javac.parent() {
        path.append(dir);
    }
    Check::Ok(format!("{version}, {}", javac.display()))
}

/// The major version in `javac -version` output: `javac 17.0.15` -> 17,
/// `javac 1.8.0_392` -> 8.
fn javac_major(text: &str) -> Option<u32> {
    let version = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("javac "))?
        .split_whitespace()
        .next()?;
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    match parts.next()?.parse().ok()? {
        1 => parts.next()?.parse().ok(),
        major => Some(major),
    }
}

fn toolchain_installed(rustup: &Path) -> bool {
    probe(Command::new(rustup).args(["toolchain", "list"])).is_some_and(|list| {
        list.lines().any(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|t| t.starts_with(&format!("{NIGHTLY}-")) || t == NIGHTLY)
        })
    })
}

fn check_nightly(rustup: &Path) -> Result<Check> {
    // `component list` fails for a toolchain that is not installed, and never
    // installs one itself (unlike `rustup run` with auto-install).
    let components = probe(Command::new(rustup).args(["component", "list", "--installed", "--toolchain", NIGHTLY]));
    let Some(components) = components else {
        return Ok(Check::Missing("toolchain not installed".into()));
    };
    if !components.lines().any(|c| c.trim().starts_with("rust-src")) {
        return Ok(Check::Missing("component rust-src not installed".into()));
    }
    let verbose = probe(Command::new(rustup).args(["run", NIGHTLY, "rustc", "-vV"])).context(format!(
        "`rustup run {NIGHTLY} rustc -vV` failed although the toolchain is installed"
    ))?;
    let release = field(&verbose, "release: ").unwrap_or("?");
    let llvm = field(&verbose, "LLVM version: ").unwrap_or("?");
    // Not fixable by installing anything: the pin itself would be wrong.
    if llvm.split('.').next() != Some(LLVM_MAJOR) {
        bail!("{NIGHTLY} uses LLVM {llvm}, but bpf-linker is built against LLVM {LLVM_MAJOR}; fix the pins");
    }
    Ok(Check::Ok(format!("rustc {release}, LLVM {llvm}, rust-src")))
}

fn field<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(prefix)).map(str::trim)
}

/// Every bpf-linker we might use, in the order children would see them:
/// PATH first, then cargo's bin directories. Returns the first one with the
/// pinned version, or the first one found at all (with its version, if it
/// runs) to explain what is wrong with it.
fn find_bpf_linker(path: &SearchPath) -> Option<(PathBuf, Option<String>)> {
    let mut first = None;
    for dir in path.dirs() {
        let bin = dir.join("bpf-linker");
        if !bin.is_file() {
            continue;
        }
        // "bpf-linker 0.13.0"
        let version =
            probe(Command::new(&bin).arg("--version")).and_then(|v| v.split_whitespace().nth(1).map(str::to_owned));
        if version.as_deref() == Some(BPF_LINKER_VERSION) {
            return Some((bin, version));
        }
        first.get_or_insert((bin, version));
    }
    first
}

fn check_bpf_linker(path: &SearchPath) -> Check {
    let Some((bin, version)) = find_bpf_linker(path) else {
        return Check::Missing("not found on PATH, in $CARGO_HOME/bin or in ~/.cargo/bin".into());
    };
    match version.as_deref() {
        None => return Check::Missing(format!("{} does not run (is its LLVM library missing?)", bin.display())),
        Some(v) if v != BPF_LINKER_VERSION => {
            return Check::Missing(format!("{} is version {v}, need {BPF_LINKER_VERSION}", bin.display()))
        }
        Some(_) => {}
    }
    if let Some(features) = installed_features(&bin) {
        if !features.iter().any(|f| f == BPF_LINKER_FEATURE) {
            return Check::Missing(format!(
                "{} was installed without feature {BPF_LINKER_FEATURE} (features: [{}]), so it uses another LLVM",
                bin.display(),
                features.join(", ")
            ));
        }
    }
    Check::Ok(format!("{BPF_LINKER_VERSION}, {}", bin.display()))
}

/// The features bpf-linker was `cargo install`ed with, from cargo's install
/// record next to the binary. None when it was not installed that way (then
/// the version check is all we can do).
fn installed_features(bin: &Path) -> Option<Vec<String>> {
    let cargo_home = bin.parent()?.parent()?;
    let record = std::fs::read(cargo_home.join(".crates2.json")).ok()?;
    let record: serde_json::Value = serde_json::from_slice(&record).ok()?;
    let (_, entry) = record["installs"]
        .as_object()?
        .iter()
        .find(|(key, _)| key.starts_with(&format!("bpf-linker {BPF_LINKER_VERSION} ")))?;
    let features = entry["features"].as_array()?;
    Some(features.iter().filter_map(|f| f.as_str().map(str::to_owned)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promtool_versions() {
        assert_eq!(
            promtool_version(
                "promtool, version 2.42.0+ds (branch: debian/sid, revision: 2.42.0+ds-5+b5)\n  build user: x"
            )
            .as_deref(),
            Some("2.42.0+ds")
        );
        assert_eq!(promtool_version("promtool"), None);
    }

    #[test]
    fn javac_versions() {
        assert_eq!(javac_major("javac 17.0.15"), Some(17));
        assert_eq!(javac_major("javac 21"), Some(21));
        assert_eq!(javac_major("javac 1.8.0_392"), Some(8));
        assert_eq!(
            javac_major("Picked up JAVA_TOOL_OPTIONS: -Xss1m\njavac 17.0.2"),
            Some(17)
        );
        assert_eq!(javac_major("error"), None);
    }
}
