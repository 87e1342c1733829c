//! `cargo xtask vm --kernel 6.1 [-- CMD...]`: boots one of Debian's own
//! kernels under qemu (software emulation: the machines' /dev/kvm is a
//! paravirtual KVM under which stock kernels crawl or die) with this host's
//! root filesystem shared read-only (virtme-ng), runs CMD inside as root,
//! and exits with CMD's exit code. Without CMD it runs a tracer smoke
//! scenario: `tracer live --json` finding a fixture's leak.
//!
//! The kernel package is fetched with `apt-get download` (nothing is
//! installed into the host's /boot), unpacked under target/vm/, and its
//! modules indexed with `depmod -b`. virtme-ng comes from PyPI into a venv
//! under target/vm/.
//!
//! The host has no udev, so virtme-ng's guest init cannot find its
//! virtio-serial ports and runs the command on the console, which mixes
//! its output with the kernel's and loses lines at volume; and qemu's exit
//! code says nothing of the command's. So the command writes its output
//! and exit code into a directory the guest may write (target/vm/out),
//! which is what counts: no exit code there is a failure.

use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::setup::{self, Prepared};
use crate::util;

/// virtme-ng's release known to work here (PyPI).
const VIRTME_NG: &str = "virtme-ng==1.42";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Which kernel: 5.10 (Debian 11), 6.1 (Debian 12) or 6.12 (Debian 12
    /// backports).
    #[arg(long, value_name = "VERSION")]
    pub kernel: String,

    /// Guest memory.
    #[arg(long, default_value = "2G")]
    pub memory: String,

    /// The command to run in the guest (default: the smoke scenario).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

pub fn run(args: Args) -> Result<i32> {
    let env = setup::run()?;
    let guest = Guest::prepare(&env, &args.kernel, &args.memory)?;
    let cmd = if args.cmd.is_empty() {
        smoke_command(&env)?
    } else {
        shell_join(&args.cmd)
    };
    guest.run(&cmd)
}

/// A kernel ready to boot, and how.
pub struct Guest {
    vng: PathBuf,
    /// The unpacked kernel's image.
    kernel: PathBuf,
    memory: String,
    work: PathBuf,
}

impl Guest {
    /// Installs virtme-ng and fetches the kernel `version` (`setup` has
    /// installed qemu, busybox and kmod).
    pub fn prepare(env: &Prepared, version: &str, memory: &str) -> Result<Self> {
        anyhow::ensure!(
            util::is_root(),
            "booting a kernel under qemu here needs root (apt, /dev access)"
        );
        let work = util::target_dir(env.cargo())?.join("vm");
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        Ok(Self {
            vng: ensure_virtme_ng(&work)?,
            kernel: fetch_kernel(&work, version)?,
            memory: memory.to_string(),
            work,
        })
    }

    /// Boots the kernel, runs `cmd` (a shell command line) as root with
    /// the host's root filesystem read-only (and a tmpfs /tmp), and returns
    /// its exit code.
    pub fn run(&self, cmd: &str) -> Result<i32> {
        let out = self.work.join("out");
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        boot(self, &out, cmd)?;
        let log = out.join("log");
        match std::fs::read(&log) {
            Ok(text) => {
                println!("==> the command's output in the guest:");
                std::io::Write::write_all(&mut std::io::stdout(), &text)?;
            }
            Err(e) => eprintln!("warning: the guest left no output ({}: {e})", log.display()),
        }
        let code = std::fs::read_to_string(out.join("exit")).unwrap_or_default();
        code.trim().parse::<i32>().map_err(|_| {
            anyhow::anyhow!("the guest left no exit code: it did not boot, or the command hung or was killed")
        })
    }
}

/// virtme-ng in a venv of Debian's python3 (not a pyenv shim: programs
/// start slowly in a guest, and a shim takes seconds).
fn ensure_virtme_ng(work: &Path) -> Result<PathBuf> {
    let venv = work.join("venv");
    let vng = venv.join("bin").join("vng");
    if vng.is_file() {
        return Ok(vng);
    }
    util::run_step(
        "create a python venv for virtme-ng",
        Command::new("/usr/bin/python3").arg("-m").arg("venv").arg(&venv),
    )?;
    util::run_step(
        "install virtme-ng",
        Command::new(venv.join("bin").join("pip")).args(["install", "-q", VIRTME_NG]),
    )?;
    anyhow::ensure!(vng.is_file(), "virtme-ng installed no {}", vng.display());
    Ok(vng)
}

/// Debian suites that carry the kernels users run: bookworm (6.1),
/// bookworm-security (6.1 and 6.12 from backports), bullseye-security (5.10).
const SUITES: &str = "Types: deb\n\
URIs: http://deb.debian.org/debian\n\
Suites: bookworm\n\
Components: main\n\
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\
\n\
Types: deb\n\
URIs: http://deb.debian.org/debian-security\n\
Suites: bookworm-security bullseye-security\n\
Components: main\n\
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";

/// apt with a private state under `work`: the suites above, whatever the
/// host's own sources are, and nothing changed in the host's apt state.
fn private_apt(work: &Path, program: &str) -> Result<Command> {
    let dir = work.join("apt");
    let lists = dir.join("lists");
    std::fs::create_dir_all(lists.join("partial"))?;
    let sources = dir.join("kernels.sources");
    std::fs::write(&sources, SUITES)?;
    let mut c = Command::new(program);
    c.env("DEBIAN_FRONTEND", "noninteractive")
        .arg("-o")
        .arg(format!("Dir::State::Lists={}", lists.display()))
        .arg("-o")
        .arg(format!("Dir::Etc::SourceParts={}", dir.display()))
        .args(["-o", "Dir::Etc::SourceList=/dev/null"]);
    Ok(c)
}

/// The newest Debian package of `version`, downloaded and unpacked once;
/// the path of its kernel image.
fn fetch_kernel(work: &Path, version: &str) -> Result<PathBuf> {
    let name = match version {
        "5.10" => PackageName("linux-image-5.10.0-", "-amd64-unsigned"),
        "6.1" => PackageName("linux-image-6.1.0-", "-amd64-unsigned"),
        "6.12" => PackageName("linux-image-6.12.", "+deb12-amd64-unsigned"),
        other => bail!("no Debian kernel package known for {other:?}: use 5.10, 6.1 or 6.12"),
    };
    let existing = std::fs::read_dir(work)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| name.matches(n) && work.join(n).join("root/boot").is_dir())
        .max_by_key(|a| version_key(a));
    let package = match existing {
        // Unpacked before: no network needed (a newer package may exist).
        Some(p) => p,
        None => newest_package(work, &name)?,
    };
    let dir = work.join(&package);
    let root = dir.join("root");
    if !root.join("boot").is_dir() {
        std::fs::create_dir_all(&dir)?;
        util::run_step(
            &format!("download {package}"),
            private_apt(work, "apt-get")?
                .args(["download", &package])
                .current_dir(&dir),
        )?;
        let deb = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))?;
        let tmp = dir.join("root.partial");
        let _ = std::fs::remove_dir_all(&tmp);
        util::run_step(
            &format!("unpack {package}"),
            Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp),
        )?;
        std::fs::rename(&tmp, &root)?;
        let _ = std::fs::remove_file(&deb);
    }
    let release = std::fs::read_dir(root.join("lib/modules"))
        .context("the package has no lib/modules")?
        .flatten()
        .find_map(|e| e.file_name().into_string().ok())
        .context("the package has no module tree")?;
    // Debian's packages ship no modules.dep; virtme-ng loads 9p and virtio
    // from this tree.
    util::run_step_quietly(
        "index the kernel's modules",
        Command::new("depmod").arg("-b").arg(&root).arg(&release),
    )?;
    Ok(root.join("boot").join(format!("vmlinuz-{release}")))
}

/// A kernel package's name: a fixed prefix, the ABI or patch number, a
/// fixed suffix.
struct PackageName(&'static str, &'static str);

impl PackageName {
    fn matches(&self, name: &str) -> bool {
        name.strip_prefix(self.0)
            .and_then(|rest| rest.strip_suffix(self.1))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }

    /// For `apt-cache search`, which takes a regular expression.
    fn pattern(&self) -> String {
        let escape = |s: &str| s.replace('.', r"\.").replace('+', r"\+");
        format!("^{}[0-9]+{}$", escape(self.0), escape(self.1))
    }
}

/// The newest package named like `name` in the suites above.
fn newest_package(work: &Path, name: &PackageName) -> Result<String> {
    util::run_step_quietly(
        "update the kernel suites' package index",
        private_apt(work, "apt-get")?.arg("update"),
    )?;
    let out = private_apt(work, "apt-cache")?
        .args(["search", "--names-only", &name.pattern()])
        .output()
        .context("running apt-cache")?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|n| name.matches(n))
        .collect();
    names.sort_by_key(|a| version_key(a));
    names
        .pop()
        .with_context(|| format!("the Debian archive has no package matching {}", name.pattern()))
}

/// Numeric parts of a package name, for "newest".
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The smoke scenario (see [`leak_scenario`]) with the binaries of a
/// fresh build.
fn smoke_command(env: &Prepared) -> Result<String> {
    util::run_step("build", env.cargo().args(["build", "--bins"]))?;
    let target = util::target_dir(env.cargo())?.join("debug");
    let tracer = target.join("tracer");
    let fixture = target.join("tcp-fixture");
    anyhow::ensure!(
        tracer.is_file() && fixture.is_file(),
        "step 'build' did not produce {} and {}",
        tracer.display(),
        fixture.display()
    );
    Ok(format!("uname -r; {}", leak_scenario(&tracer, &fixture, "true")))
}

/// `tracer live --json` traces while a fixture client leaks two sockets to
/// a fixture server: succeeds if the tracer exits 0, reports both leaks,
/// and the shell condition `check` holds (it may read the tracer's
/// output, /tmp/out.jsonl, and stderr, /tmp/err.txt). The client holds
/// its sockets until stdin ends: a pipe that stays open, as a background
/// job's stdin is /dev/null.
pub fn leak_scenario(tracer: &Path, fixture: &Path, check: &str) -> String {
    let (t, f) = (tracer.display(), fixture.display());
    format!(
        "{t} live --json --leak-after 1s --duration 25s > /tmp/out.jsonl 2> /tmp/err.txt & tp=$!; \
         for i in $(seq 300); do grep -q '\"type\":\"start\"' /tmp/out.jsonl 2>/dev/null && break; sleep 0.3; done; \
         {f} server --listen 127.0.0.1:7777 --reply 26 > /dev/null & sp=$!; sleep 1; \
         sleep 60 | {f} client --connect 127.0.0.1:7777 --count 2 --mode leak --hold-secs 60 > /dev/null & \
         wait $tp; rc=$?; kill $sp; echo \"scenario: tracer exited with $rc\"; cat /tmp/err.txt; head -c 600 /tmp/out.jsonl; echo; \
         n=$(grep -c '\"type\":\"leak\".*:7777' /tmp/out.jsonl); \
         echo \"scenario: $n leaks to 127.0.0.1:7777 reported\"; test \"$rc\" = 0 && test \"$n\" = 2 && {check}"
    )
}

pub fn shell_join(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Boots the guest's kernel and runs `cmd` (a shell command line) in it,
/// its output and exit code into `out` (a directory the guest may write).
///
/// The console goes to our stdout for boot diagnostics only: it is lossy
/// at volume, and qemu's own exit code says nothing of the command's.
fn boot(guest: &Guest, out: &Path, cmd: &str) -> Result<()> {
    let o = out.display();
    // In a file: virtme-ng passes --exec on the kernel command line, whose
    // 2048 bytes a long command overflows (the kernel then panics at boot).
    let script = out.join("script.sh");
    std::fs::write(&script, format!("({cmd}) > {o}/log 2>&1; echo $? > {o}/exit\n"))
        .with_context(|| format!("writing {}", script.display()))?;
    let mut c = Command::new(&guest.vng);
    c.arg("--run")
        .arg(&guest.kernel)
        .args([
            "--force-9p",
            "--user",
            "root",
            "--disable-kvm",
            "--cpus",
            "2",
            "--verbose",
        ])
        .args(["--memory", &guest.memory])
        .arg("--rwdir")
        .arg(out)
        .arg("--exec")
        .arg(format!("sh {}", script.display()))
        // One host thread runs both vCPUs. With one thread per vCPU (qemu's
        // default), a vCPU could run code the other had just patched
        // (static keys flip when tracepoints attach) from a stale
        // translation: 6.12 died of a stray int3 in
        // syscall_exit_to_user_mode_prepare ("Oops: int3") in CI.
        .arg("--qemu-opts=-accel tcg,thread=single")
        .env(
            "PATH",
            format!(
                "{}:{}",
                guest.vng.parent().expect("venv bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdin(Stdio::null())
        // Its own process group, which the watchdog kills whole: vng
        // starts virtme-run, which execs qemu.
        .process_group(0);
    // The console comes on either stream depending on virtme-ng's mode:
    // both into one pipe (qemu reopens its outputs with truncation, so a
    // pipe, never a file).
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    c.stdout(writer.try_clone().context("duplicating a pipe")?)
        .stderr(writer);
    eprintln!("==> booting {} under qemu (TCG)", guest.kernel.display());
    let mut child = c.spawn().context("starting virtme-ng (vng)")?;
    // Our copies of the write end must go, or the read never ends.
    drop(c);
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    watchdog(child.id(), finished.clone());
    for line in BufReader::new(reader).lines() {
        println!("{}", line.context("reading the guest's console")?);
    }
    let status = child.wait().context("waiting for qemu")?;
    finished.store(true, std::sync::atomic::Ordering::Relaxed);
    eprintln!("==> qemu exited: {status}");
    Ok(())
}

/// Longest a guest may run: a kernel that hangs (or panics before its
/// `panic=` option is read) would otherwise hold CI until its limit.
const GUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Kills virtme-ng's process group (qemu) if it outlives [`GUEST_TIMEOUT`].
fn watchdog(pid: u32, finished: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        while !finished.load(std::sync::atomic::Ordering::Relaxed) {
            if started.elapsed() > GUEST_TIMEOUT {
                eprintln!("error: the guest ran for over {GUEST_TIMEOUT:?}: killing qemu");
                // SAFETY: plain syscall; the pid is our child's, not reaped
                // yet (`finished` is set only after the wait).
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
                return;
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    });
}
