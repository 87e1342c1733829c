//! `tracer-bench`: the runner behind `cargo xtask bench`.
//!
//! Runs the load generator (`loadgen`) under each configuration: no tracer,
//! the tracer in several modes, and peer tools where installed, interleaved
//! (A B C … A B C …) so that drift of the machine touches every
//! configuration alike. Per run: the server starts, the client opens its
//! idle connections (if any) and says READY, the observer starts and says it
//! is ready, the client is told to go, prints its rate, and holds its
//! connections until the observer has been sampled and stopped (SIGINT).
//! Then the client, the server and the helpers go.
//!
//! Prints a markdown table of medians and ratios to the baseline, writes it
//! to `--out` and every run's raw numbers as JSON next to it. Timing is
//! never asserted; the exit code is non-zero only when a run of the
//! baseline or of the tracer failed (peer tools are reported, not judged).

mod observer;
mod report;
mod run;
mod scrape;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

use observer::{Observer, TracerKind};
// At the root, so that the modules' `crate::procs` paths find it.
use run::{run_one, Ctx};
use tracer_bench::procs;

#[derive(Parser, Debug)]
#[command(
    name = "tracer-bench",
    about = "Measure what tracer costs a loopback TCP connection churn, next to peer tools"
)]
struct Cli {
    /// The tracer binary (release build).
    #[arg(long, value_name = "PATH")]
    tracer: PathBuf,

    /// The load generator (default: `loadgen` next to this program).
    #[arg(long, value_name = "PATH")]
    loadgen: Option<PathBuf>,

    /// 2 runs of 2 s each, and no many-sockets workload.
    #[arg(long)]
    quick: bool,

    /// Runs per configuration (default 5; 2 with --quick).
    #[arg(long, value_name = "N")]
    runs: Option<usize>,

    /// Seconds of load per run (default 5; 2 with --quick).
    #[arg(long, value_name = "S")]
    seconds: Option<f64>,

    /// Where the markdown table goes; the raw results go next to it (.json).
    #[arg(long, value_name = "FILE", default_value = "target/bench/bench.md")]
    out: PathBuf,

    /// Client threads, and server threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,

    /// Destination addresses (127.0.0.1 …) the connections are spread over.
    #[arg(long, default_value_t = 64)]
    addrs: usize,

    /// Idle connections opened before the many-sockets churn.
    #[arg(long, default_value_t = 100_000)]
    open: usize,

    /// Share of churn-leak connections left in CLOSE_WAIT, in percent.
    #[arg(long, default_value_t = 1.0)]
    leak_percent: f64,

    /// The tracer's --leak-after in the churn-leak workload (short, so that
    /// leaks are reported, with their evidence, within a run).
    #[arg(long, default_value = "1s")]
    leak_after: String,

    /// Leave out the peer tools even where installed.
    #[arg(long)]
    no_peers: bool,

    /// Only the configurations whose workload or label contains this text
    /// (and the baselines).
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,

    /// No extra accounting run per configuration with the kernel's eBPF
    /// run-time accounting on (then the eBPF CPU column is n/a).
    #[arg(long)]
    no_bpf_stats: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    Churn,
    ChurnLeak,
    ManySockets,
    /// The churn from a JVM (bench/java/JavaChurn.java), to measure what
    /// walking and naming a JVM's stacks costs.
    JavaChurn,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Churn => "churn",
            Workload::ChurnLeak => "churn-leak",
            Workload::ManySockets => "many-sockets",
            Workload::JavaChurn => "java-churn",
        }
    }
}

pub struct Config {
    pub workload: Workload,
    pub observer: Observer,
    /// The tracer's --leak-after, when not its default.
    pub leak_after: Option<String>,
}

impl Config {
    pub fn label(&self) -> String {
        self.observer.label(self.leak_after.as_deref())
    }
}

/// One run of one configuration: what the client measured and what the
/// observer said. Everything optional: a run may fail part way.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunResult {
    pub config: usize,
    pub workload: String,
    pub label: String,
    pub run: usize,
    pub connections: Option<u64>,
    pub seconds: Option<f64>,
    pub conn_per_sec: Option<f64>,
    pub client_errors: Option<u64>,
    pub leaked_open: Option<u64>,
    pub idle_open: Option<u64>,
    pub kernel_generated: Option<u64>,
    /// What the agent analysed (`stats.agent.events`).
    pub received: Option<u64>,
    /// What it took from the ring buffer (`stats.delivered`, else
    /// `received`), and what of that it could not decode.
    pub delivered: Option<u64>,
    pub decode_errors: Option<u64>,
    pub drops: Option<u64>,
    /// Hook runs the kernel skipped (see `observer::Counters`).
    pub hook_misses: Option<u64>,
    /// Generated, but neither delivered (decoded or not) nor counted as
    /// dropped.
    pub missing: Option<u64>,
    pub leaks_reported: Option<u64>,
    pub output_bytes: Option<u64>,
    /// utime + stime from /proc just before SIGINT.
    pub agent_cpu_s: Option<f64>,
    /// From wait4: the whole life, shutdown included.
    pub agent_cpu_total_s: Option<f64>,
    /// From the ready line to the exit (wait4): agent_cpu_load_s and the
    /// shutdown (a fixed cost per run, left out of the headline).
    pub agent_cpu_after_ready_s: Option<f64>,
    /// VmHWM just before SIGINT.
    pub agent_peak_rss_kib: Option<u64>,
    /// From the observer's start to its ready line (eBPF load, snapshot).
    pub agent_start_s: Option<f64>,
    /// After the load, until the observer had caught up with it (its CPU
    /// nearly idle), before it was sampled.
    pub settle_s: Option<f64>,
    /// Kernel time in the observer's eBPF programs, just before SIGINT
    /// (charged to whatever task hit the hook, not to the agent).
    pub bpf_cpu_s: Option<f64>,
    pub bpf_runs: Option<u64>,
    /// The same two, counted from the observer's ready line only (the load,
    /// without the start-up); agent_cpu_load_s to the nanosecond (its CPU
    /// clock), and the agent's share of the headline.
    pub agent_cpu_load_s: Option<f64>,
    pub bpf_cpu_load_s: Option<f64>,
    /// Each eBPF program the observer held, by its name from the kernel, and
    /// what it ran from the ready line to just before SIGINT (accounting
    /// runs only): the eBPF share of the headline, per hook.
    pub bpf_programs: Vec<procs::ProgRun>,
    pub notes: Vec<String>,
    pub error: Option<String>,
    /// Run with the kernel's eBPF accounting on, for the eBPF CPU column
    /// only: the accounting slows every hook, so its throughput is not
    /// counted.
    pub accounting: bool,
}

/// Settings of this bench run, as written in the report.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub quick: bool,
    pub runs: usize,
    pub seconds: f64,
    pub threads: usize,
    pub addrs: usize,
    pub open: usize,
    pub leak_percent: f64,
    pub leak_after: String,
    pub bpf_stats: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tracer-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ok(false): the table was written but a run of the baseline or the
/// tracer failed.
fn run(cli: Cli) -> Result<bool> {
    let loadgen = tracer_bench::check_binaries(
        &cli.tracer,
        cli.loadgen.as_deref(),
        "the tracer and the peer tools load eBPF programs",
    )?;
    let settings = Settings {
        quick: cli.quick,
        runs: cli.runs.unwrap_or(if cli.quick { 2 } else { 5 }).max(1),
        seconds: cli.seconds.unwrap_or(if cli.quick { 2.0 } else { 5.0 }),
        threads: cli.threads.max(1),
        addrs: cli.addrs,
        open: cli.open,
        leak_percent: cli.leak_percent,
        leak_after: cli.leak_after.clone(),
        bpf_stats: false,
    };
    if !(settings.seconds.is_finite() && settings.seconds > 0.0) {
        bail!("--seconds must be positive");
    }

    let (peers, skipped) = if cli.no_peers {
        (Vec::new(), vec!["peer tools: left out (--no-peers)".to_owned()])
    } else {
        detect_peers()
    };
    let out_dir = cli
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let tmp = out_dir.join(format!("tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut skipped = skipped;
    let java_classes = match compile_java(&tmp) {
        Ok(c) => Some(c),
        Err(why) => {
            skipped.push(why);
            None
        }
    };
    let mut configs = configurations(&settings, peers, java_classes.is_some());
    if let Some(only) = &cli.only {
        configs.retain(|c| {
            matches!(c.observer, Observer::Baseline) || c.label().contains(only) || c.workload.name().contains(only)
        });
    }
    let settings = Settings {
        bpf_stats: !cli.no_bpf_stats,
        ..settings
    };

    let ctx = Ctx {
        tracer: &cli.tracer,
        loadgen: &loadgen,
        java_classes: java_classes.as_deref(),
        tmp: &tmp,
        settings: &settings,
    };
    let started = SystemTime::now();
    for s in &skipped {
        eprintln!("tracer-bench: skipping {s}");
    }
    eprintln!(
        "tracer-bench: {} configurations × {} runs × {} s, interleaved",
        configs.len(),
        settings.runs,
        settings.seconds
    );

    // Throughput runs go without the kernel's eBPF accounting: it adds two
    // clock reads to every program run, which cost the churn ~7% in
    // throughput (measured: 0.78 with it, 0.85 without). One extra run per
    // eBPF configuration, with it, fills the eBPF CPU column.
    let accounted: Vec<usize> = if settings.bpf_stats {
        (0..configs.len())
            .filter(|&i| configs[i].observer.uses_ebpf())
            .collect()
    } else {
        Vec::new()
    };
    let total = configs.len() * settings.runs + accounted.len();
    let mut results = Vec::with_capacity(total);
    let report_progress = |config: &Config, r: &RunResult, n: usize| {
        let what = if r.accounting {
            "accounting run".to_owned()
        } else {
            format!("run {}/{}", r.run + 1, settings.runs)
        };
        eprintln!(
            "[{n}/{total}] {} · {} · {what}: {}",
            config.workload.name(),
            config.label(),
            progress(r)
        );
    };
    // Interleaved within each workload (ratios compare within one), one
    // workload after the other: tearing down many-sockets' 200k sockets or
    // churn-leak's CLOSE_WAIT backlog must not land in another workload's
    // runs at some positions of a round and not at others.
    let mut workloads: Vec<Workload> = Vec::new();
    for c in &configs {
        if !workloads.contains(&c.workload) {
            workloads.push(c.workload);
        }
    }
    for workload in workloads {
        for run in 0..settings.runs {
            for (i, config) in configs.iter().enumerate().filter(|(_, c)| c.workload == workload) {
                let r = run_one(&ctx, i, config, run, false);
                report_progress(config, &r, results.len() + 1);
                results.push(r);
            }
        }
    }
    for &i in &accounted {
        let config = &configs[i];
        // Held for this run only: accounting is on exactly as long as it.
        let r = match procs::enable_bpf_stats() {
            Ok(_stats) => run_one(&ctx, i, config, settings.runs, true),
            Err(e) => RunResult {
                error: Some(format!("cannot enable eBPF run-time stats: {e}")),
                ..RunResult::new(i, config, settings.runs, true)
            },
        };
        report_progress(config, &r, results.len() + 1);
        results.push(r);
    }
    let _ = std::fs::remove_dir_all(&tmp);

    let machine = report::Machine::probe();
    let rows = report::rows(&configs, &results);
    let headline = report::headline(&configs, &results, &rows);
    let md = report::markdown(&report::Document {
        started,
        machine: &machine,
        settings: &settings,
        headline: &headline,
        rows: &rows,
        skipped: &skipped,
        results: &results,
    });
    let json = serde_json::json!({
        "started": report::utc(started),
        "machine": machine,
        "settings": settings,
        "skipped": skipped,
        "headline": {
            "references": report::REFERENCES,
            "rows": headline,
        },
        "rows": rows,
        "runs": results,
    });
    std::fs::write(&cli.out, &md).with_context(|| format!("writing {}", cli.out.display()))?;
    let json_path = cli.out.with_extension("json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("{md}");
    eprintln!("tracer-bench: wrote {} and {}", cli.out.display(), json_path.display());

    let failed = results
        .iter()
        .filter(|r| r.error.is_some() && !r.accounting && !configs[r.config].observer.is_peer())
        .count();
    if failed > 0 {
        eprintln!("tracer-bench: {failed} run(s) of the baseline or the tracer failed (see the table's notes)");
    }
    Ok(failed == 0)
}

fn progress(r: &RunResult) -> String {
    if let Some(e) = &r.error {
        return format!("FAILED: {e}");
    }
    let mut s = format!("{:.0} conn/s", r.conn_per_sec.unwrap_or(0.0));
    if let Some(cpu) = r.agent_cpu_s {
        s += &format!(", agent CPU {cpu:.2} s");
    }
    if let Some(cpu) = r.bpf_cpu_s {
        s += &format!(", eBPF CPU {cpu:.2} s");
    }
    if let (Some(g), Some(rx)) = (r.kernel_generated, r.received) {
        s += &format!(", events {g} generated / {rx} received");
    } else if let Some(rx) = r.received {
        s += &format!(", {rx} events received");
    }
    if let Some(d) = r.drops.filter(|d| *d > 0) {
        s += &format!(", {d} DROPPED");
    }
    if let Some(m) = r.missing.filter(|m| *m > 0) {
        s += &format!(", {m} MISSING");
    }
    s
}

/// The configurations, in the order they run within each round.
fn configurations(s: &Settings, peers: Vec<Observer>, java: bool) -> Vec<Config> {
    let plain = |workload, observer| Config {
        workload,
        observer,
        leak_after: None,
    };
    let mut v = vec![
        plain(Workload::Churn, Observer::Baseline),
        plain(Workload::Churn, Observer::Tracer(TracerKind::Text)),
        plain(Workload::Churn, Observer::Tracer(TracerKind::Json)),
        plain(Workload::Churn, Observer::Tracer(TracerKind::Daemon)),
        plain(Workload::Churn, Observer::Tracer(TracerKind::Events)),
        plain(Workload::Churn, Observer::Tracer(TracerKind::Record)),
        plain(Workload::Churn, Observer::Tracer(TracerKind::PidFilter)),
        plain(Workload::Churn, Observer::Tracer(TracerKind::NoStacks)),
        plain(Workload::Churn, Observer::Tracer(TracerKind::AllStacks)),
    ];
    v.extend(peers.into_iter().map(|p| plain(Workload::Churn, p)));
    v.push(plain(Workload::ChurnLeak, Observer::Baseline));
    v.push(Config {
        workload: Workload::ChurnLeak,
        observer: Observer::Tracer(TracerKind::Json),
        leak_after: Some(s.leak_after.clone()),
    });
    if java {
        v.push(plain(Workload::JavaChurn, Observer::Baseline));
        v.push(plain(Workload::JavaChurn, Observer::Tracer(TracerKind::ClientNoStacks)));
        v.push(plain(
            Workload::JavaChurn,
            Observer::Tracer(TracerKind::ClientAllStacks),
        ));
    }
    if !s.quick {
        v.push(plain(Workload::ManySockets, Observer::Baseline));
        v.push(plain(Workload::ManySockets, Observer::Tracer(TracerKind::Json)));
    }
    v
}

/// Compiles bench/java/JavaChurn.java into `dir` for the java-churn
/// workload; Err says why it is left out.
fn compile_java(dir: &Path) -> Result<PathBuf, String> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("java")
        .join("JavaChurn.java");
    let classes = dir.join("java");
    let out = Command::new("javac")
        .arg("-d")
        .arg(&classes)
        .arg(&source)
        .output()
        .map_err(|e| format!("java-churn: javac not runnable ({e}); `cargo xtask setup` installs a JDK"))?;
    if !out.status.success() {
        return Err(format!(
            "java-churn: javac {} failed: {}",
            source.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(classes)
}

/// The peer tools found, and why the others are left out.
fn detect_peers() -> (Vec<Observer>, Vec<String>) {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let tcpstates = Path::new("/usr/sbin/tcpstates-bpfcc");
    let modules = PathBuf::from(format!("/lib/modules/{release}"));
    let build = modules.join("build");
    // What bcc includes first; split Debian headers have it in `source`.
    let headers = ["build", "source"]
        .iter()
        .any(|d| modules.join(d).join("include/linux/kconfig.h").is_file());
    if !tcpstates.is_file() {
        skipped.push(format!(
            "bcc tcpstates: {} not installed (Debian package bpfcc-tools; `cargo xtask bench --install-peers`)",
            tcpstates.display()
        ));
    } else if !headers {
        skipped.push(format!(
            "bcc tcpstates: no kernel headers at {} (bcc compiles against them; `cargo xtask bench --install-peers` links Debian's linux-headers-6.1.0-*-amd64 there)",
            build.display()
        ));
    } else {
        found.push(Observer::Bcc(tcpstates.to_path_buf()));
    }
    match which("bpftrace") {
        Some(p) => found.push(Observer::Bpftrace(p)),
        None => skipped.push("bpftrace: not installed (`cargo xtask bench --install-peers`)".to_owned()),
    }
    match which("strace") {
        Some(p) => found.push(Observer::Strace(p)),
        None => skipped.push("strace -f: strace not installed (`apt-get install strace`)".to_owned()),
    }
    (found, skipped)
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
