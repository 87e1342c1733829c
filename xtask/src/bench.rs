//! `cargo xtask bench`: what the tracer costs a loopback connection churn,
//! side by side with peer tools, measured in one run. Builds the release
//! tracer and the bench crate, then runs `tracer-bench` (bench/src/main.rs),
//! which does the measuring and writes the table. See docs/bench.md.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::setup::{self, Prepared};
use crate::util::{self, probe, run_step, run_step_with_stdout};

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// 2 runs of 2 s per configuration, and no many-sockets workload.
    #[arg(long)]
    pub quick: bool,

    /// Runs per configuration (default 5; 2 with --quick).
    #[arg(long, value_name = "N")]
    pub runs: Option<u32>,

    /// Seconds of load per run (default 5; 2 with --quick).
    #[arg(long, value_name = "S")]
    pub seconds: Option<f64>,

    /// The markdown table (default target/bench/bench.md); the raw results
    /// go next to it as .json.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// First install the peer tools with apt: bpftrace, bcc's tcpstates
    /// (bpfcc-tools) and Debian's 6.1 kernel headers, linked as
    /// /lib/modules/$(uname -r)/build when that is missing.
    #[arg(long)]
    pub install_peers: bool,

    /// More options for tracer-bench, after `--` (for example
    /// `-- --threads 4 --no-peers`; see `target/release/tracer-bench --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "BENCH_ARGS")]
    pub bench_args: Vec<OsString>,
}

pub fn run(args: Args) -> Result<()> {
    let env = setup::run()?;
    run_prepared(&env, args)
}

/// The bench after setup (`cargo xtask test` has already done it).
pub fn run_prepared(env: &Prepared, args: Args) -> Result<()> {
    ensure!(
        util::is_root(),
        "the bench loads eBPF programs (the tracer and the peer tools): run it as root"
    );
    if args.install_peers {
        install_peers()?;
    }
    let release = util::build_release_bench(|| env.cargo(), &["tracer", "tracer-bench", "loadgen"])?;
    let target = release
        .parent()
        .expect("release is in the target directory")
        .to_path_buf();
    // Children run from the workspace root: make a relative --out relative
    // to where the user is.
    let out = match args.out {
        Some(p) if p.is_relative() => std::env::current_dir().context("current directory")?.join(p),
        Some(p) => p,
        None => target.join("bench").join("bench.md"),
    };
    let mut cmd = env.command(release.join("tracer-bench"));
    cmd.arg("--tracer")
        .arg(release.join("tracer"))
        .arg("--loadgen")
        .arg(release.join("loadgen"))
        .arg("--out")
        .arg(&out);
    if args.quick {
        cmd.arg("--quick");
    }
    if let Some(n) = args.runs {
        cmd.args(["--runs", &n.to_string()]);
    }
    if let Some(s) = args.seconds {
        cmd.args(["--seconds", &s.to_string()]);
    }
    cmd.args(&args.bench_args);
    run_step_with_stdout("bench", &mut cmd)
}

const TCPSTATES: &str = "/usr/sbin/tcpstates-bpfcc";

/// bpftrace, bcc's tools, and kernel headers for bcc. These machines run a
/// kernel without a headers package; tcpstates only reads tracepoint fields
/// (described by tracefs at run time), so Debian's 6.1 headers do, linked
/// the way Debian links them for its own kernels: /lib/modules/RELEASE/build
/// (the arch part) and /lib/modules/RELEASE/source (the common part).
/// bpftrace needs no headers (BTF), but reads them when `build` is there,
/// and fails when they are incomplete.
fn install_peers() -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading the kernel release")?
        .trim()
        .to_owned();
    let mut packages = Vec::new();
    if util::find_on_path("bpftrace").is_none() {
        packages.push("bpftrace".to_owned());
    }
    if !Path::new(TCPSTATES).is_file() {
        packages.push("bpfcc-tools".to_owned());
    }
    // Headers installed before (by us) are enough; else the newest.
    let need_headers = !headers_usable(&release);
    let mut headers = if need_headers { installed_headers() } else { None };
    if !packages.is_empty() || (need_headers && headers.is_none()) {
        ensure!(
            util::find_on_path("apt-get").is_some(),
            "--install-peers uses apt-get, which is not here; install bpftrace and bcc (tcpstates) by hand"
        );
        run_step("update apt package index", &mut setup::apt_get(&["update"]))?;
        if need_headers && headers.is_none() {
            let package = newest_headers_package()?;
            headers = Some(package.trim_start_matches("linux-headers-").to_owned());
            packages.push(package);
        }
        let mut args = vec!["install", "-y"];
        args.extend(packages.iter().map(String::as_str));
        run_step("install peers", &mut setup::apt_get(&args))?;
    }
    if let Some(abi) = headers {
        link_headers(&release, &abi)?;
    }
    eprintln!("ok peers (bpftrace, {TCPSTATES}, kernel headers for {release})");
    Ok(())
}

/// The headers bcc compiles against: `include/linux/kconfig.h` under
/// /lib/modules/RELEASE/build or its `source` sibling.
fn headers_usable(release: &str) -> bool {
    let dir = Path::new("/lib/modules").join(release);
    ["build", "source"]
        .iter()
        .any(|d| dir.join(d).join("include/linux/kconfig.h").is_file())
}

/// `6.1.0-N-amd64` of the newest Debian 6.1 headers already installed.
fn installed_headers() -> Option<String> {
    std::fs::read_dir("/lib/modules")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| {
            let abi: u32 = name.strip_prefix("6.1.0-")?.strip_suffix("-amd64")?.parse().ok()?;
            headers_usable(&name).then_some((abi, name))
        })
        .max()
        .map(|(_, name)| name)
}

/// Links /lib/modules/RELEASE/{build,source} where Debian links them for
/// its kernel ABI. Replaces only links that point into Debian 6.1 headers
/// (an earlier run of ours); anything else is left alone, with an error.
fn link_headers(release: &str, abi: &str) -> Result<()> {
    let from = Path::new("/lib/modules").join(abi);
    let to = Path::new("/lib/modules").join(release);
    std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
    for name in ["build", "source"] {
        let Ok(target) = std::fs::read_link(from.join(name)) else {
            continue;
        };
        let link = to.join(name);
        match std::fs::read_link(&link) {
            Ok(existing) if existing == target => continue,
            Ok(existing) if existing.starts_with("/usr/src/linux-headers-6.1.0-") => {
                std::fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
            }
            Ok(existing) => bail!(
                "{} points to {}; not touching it (bcc cannot use it)",
                link.display(),
                existing.display()
            ),
            Err(_) if link.symlink_metadata().is_ok() => {
                bail!("{} exists and is not a link; not touching it", link.display())
            }
            Err(_) => {}
        }
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
        eprintln!("linked {} -> {}", link.display(), target.display());
    }
    ensure!(
        headers_usable(release),
        "kernel headers for bcc are still incomplete under {}",
        to.display()
    );
    Ok(())
}

/// The highest `linux-headers-6.1.0-N-amd64` apt knows.
fn newest_headers_package() -> Result<String> {
    let list =
        probe(Command::new("apt-cache").args(["search", "--names-only", r"^linux-headers-6\.1\.0-[0-9]+-amd64$"]))
            .context("apt-cache search for linux-headers-6.1.0-*-amd64 failed")?;
    let best = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let abi = name.strip_prefix("linux-headers-6.1.0-")?.strip_suffix("-amd64")?;
            Some((abi.parse::<u32>().ok()?, name.to_owned()))
        })
        .max();
    match best {
        Some((_, name)) => Ok(name),
        None => bail!("apt knows no linux-headers-6.1.0-*-amd64 package (not Debian 12?)"),
    }
}
