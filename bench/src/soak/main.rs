//! `tracer-soak`: the long run behind `cargo xtask soak`.
//!
//! Runs `tracer live --json --leak-after 1s --status-interval 5s`
//! host-wide for `--minutes` while, all at once:
//! - `loadgen` churns connections at a moderate, paced rate (the box is
//!   busy, the tracer not saturated), after opening `--idle` idle
//!   connections that stay open the whole run (a large tracked-socket
//!   count);
//! - thousands of short-lived `loadgen leak` processes each leak one socket
//!   (see leakers.rs), many alive at once, each alive well past
//!   `--leak-after` so that the tracer must report its leak while it lives.
//!
//! It samples the tracer's RSS every `--sample-secs` and reads its JSON
//! lines as they come; at the end it stops the tracer with SIGINT, reads its
//! summary, prints a table of figures against their criteria (stdout), and
//! writes them as JSON with `--json`. The exit code is non-zero when a
//! criterion fails, with one line per failure on stderr.

mod figures;
mod leakers;
mod output;
mod render;
mod rss;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::Value;

use figures::{Measured, Settings};
use leakers::{Plan, Spawner};
use output::Output;
use tracer_bench::procs::{self, OnParentDeath, Out, Proc};

/// The tracer's threshold, and how often it prints its status.
const LEAK_AFTER: &str = "1s";
const LEAK_AFTER_S: f64 = 1.0;
const STATUS_INTERVAL: &str = "5s";
/// How often progress goes to stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(
    name = "tracer-soak",
    about = "Run the tracer for minutes under churn, thousands of leaking processes and many idle sockets"
)]
struct Cli {
    /// The tracer binary (release build).
    #[arg(long, value_name = "PATH")]
    tracer: PathBuf,

    /// The load generator (default: `loadgen` next to this program).
    #[arg(long, value_name = "PATH")]
    loadgen: Option<PathBuf>,

    /// Minutes of load.
    #[arg(long, default_value_t = 5.0)]
    minutes: f64,

    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,

    /// Where the tracer's output and the leakers' log go.
    #[arg(long, value_name = "DIR", default_value = "target/soak")]
    work: PathBuf,

    /// Idle established connections held open the whole run (two sockets
    /// each).
    #[arg(long, default_value_t = 30_000)]
    idle: usize,

    /// Churn connections per second.
    #[arg(long, default_value_t = 2000.0)]
    churn_rate: f64,

    /// Leaking processes started per second.
    #[arg(long, default_value_t = 20.0)]
    leakers_per_sec: f64,

    /// Seconds each leaking process holds its socket in CLOSE_WAIT before
    /// it exits (more than the tracer's --leak-after of 1 s plus a margin).
    #[arg(long, default_value_t = 3.0)]
    hold: f64,

    /// Seconds between RSS samples.
    #[arg(long, default_value_t = 2.0)]
    sample_secs: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(failures) if failures.is_empty() => ExitCode::SUCCESS,
        Ok(failures) => {
            for why in failures {
                eprintln!("tracer-soak: FAILED: {why}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tracer-soak: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The RSS samples, taken on the main thread between other waits.
struct Sampler {
    pid: i32,
    go: Instant,
    every: Duration,
    next: Instant,
    rss: Vec<(f64, u64)>,
    /// The tracer's RSS was gone (it exited) at this time since go.
    gone_at: Option<f64>,
}

impl Sampler {
    fn due(&mut self) {
        if Instant::now() >= self.next {
            self.take();
            self.next += self.every;
        }
    }

    fn take(&mut self) {
        let t = self.go.elapsed().as_secs_f64();
        // A zombie has no VmRSS: None means the tracer has exited.
        match procs::rss_kib(self.pid) {
            Some(kib) => self.rss.push((t, kib)),
            None => {
                self.gone_at.get_or_insert(t);
            }
        }
    }
}

fn run(cli: &Cli) -> Result<Vec<String>> {
    let loadgen = tracer_bench::check_binaries(&cli.tracer, cli.loadgen.as_deref(), "the tracer loads eBPF programs")?;
    if !(cli.minutes.is_finite() && cli.minutes > 0.0) {
        bail!("--minutes must be positive");
    }
    if cli.hold.is_nan() || cli.hold < LEAK_AFTER_S + 1.0 {
        bail!("--hold must be at least the tracer's --leak-after ({LEAK_AFTER}) plus 1 s of margin");
    }
    if !(cli.leakers_per_sec > 0.0 && cli.churn_rate >= 0.0 && cli.sample_secs > 0.0) {
        bail!("--leakers-per-sec and --sample-secs must be positive, --churn-rate at least 0");
    }
    std::fs::create_dir_all(&cli.work).with_context(|| format!("creating {}", cli.work.display()))?;
    let settings = Settings {
        minutes: cli.minutes,
        leak_after: LEAK_AFTER.into(),
        status_interval: STATUS_INTERVAL.into(),
        idle_connections: cli.idle,
        churn_rate: cli.churn_rate,
        leakers_per_sec: cli.leakers_per_sec,
        hold_s: cli.hold,
    };
    let load = Duration::from_secs_f64(cli.minutes * 60.0);
    let reply = leakers::reply_server().context("starting the reply server")?;

    // The churn's server, then its client, which opens the idle connections
    // first and waits for "go".
    let (mut server, port) = tracer_bench::start_loadgen_server(&loadgen, 1, 64)?;
    // The churn lasts as long as the leaking processes do.
    let churn_s = load.as_secs_f64() + cli.hold + 1.0;
    let mut cmd = Command::new(&loadgen);
    cmd.args(["client", "--port", &port.to_string()])
        .args(["--addrs", "64", "--threads", "1", "--sync"])
        .args(["--rate", &cli.churn_rate.to_string()])
        .args(["--duration", &churn_s.to_string()]);
    if cli.idle > 0 {
        cmd.args(["--mode", "many-sockets", "--open", &cli.idle.to_string()]);
    }
    let mut client = Proc::spawn("loadgen client", cmd, true, Out::Tap(None), OnParentDeath::Kill)?;
    eprintln!("tracer-soak: opening {} idle connections", cli.idle);
    client.wait_until("READY", Duration::from_secs(600), |p| p.stderr_line("READY").is_some())?;

    // The tracer, to a file, ready before the load starts.
    let out_path = cli.work.join("tracer.jsonl");
    let file = File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let mut cmd = Command::new(&cli.tracer);
    cmd.args(["live", "--json", "--leak-after", LEAK_AFTER])
        .args(["--status-interval", STATUS_INTERVAL]);
    let spawned = Instant::now();
    // SIGTERM if we die: the tracer then detaches and exits cleanly.
    let mut tracer = Proc::spawn("tracer", cmd, false, Out::File(file), OnParentDeath::Terminate)?;
    let mut output = Output::open(&out_path, reply.to_string())?;
    tracer.wait_until("its start line", Duration::from_secs(180), |_| {
        let _ = output.poll();
        output.start.is_some()
    })?;
    eprintln!(
        "tracer-soak: tracer ready after {:.1}s; {:.1} min of load from now",
        spawned.elapsed().as_secs_f64(),
        cli.minutes
    );

    client.write_stdin("go\n")?;
    let go = Instant::now();
    let log_path = cli.work.join("leakers.log");
    let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let spawner = Spawner::start(Plan {
        loadgen: loadgen.clone(),
        connect: reply,
        rate: cli.leakers_per_sec,
        hold: Duration::from_secs_f64(cli.hold),
        log,
    });
    let every = Duration::from_secs_f64(cli.sample_secs);
    let mut sampler = Sampler {
        pid: tracer.pid,
        go,
        every,
        next: go,
        rss: Vec::new(),
        gone_at: None,
    };
    let mut next_progress = go + PROGRESS_EVERY;
    while go.elapsed() < load && sampler.gone_at.is_none() {
        sampler.due();
        output.poll().context("reading the tracer's output")?;
        if Instant::now() >= next_progress {
            next_progress += PROGRESS_EVERY;
            progress(go, load, &spawner, &output, &sampler);
        }
        thread::sleep(Duration::from_millis(100));
    }

    // No new leakers; the living ones end after their hold, then the churn
    // ends by itself (its --duration) and holds its idle connections.
    spawner.stop();
    while !spawner.is_finished() {
        sampler.due();
        thread::sleep(Duration::from_millis(100));
    }
    let tally = spawner.finish();
    let mut client_line = None;
    let churn_left = Duration::from_secs_f64(churn_s).saturating_sub(go.elapsed());
    client.wait_until("its result line", churn_left + Duration::from_secs(120), |p| {
        sampler.due();
        client_line = p.stdout_line("{");
        client_line.is_some()
    })?;
    // The last leakers' late closes, and one more status line.
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle {
        sampler.due();
        thread::sleep(Duration::from_millis(100));
    }
    sampler.take();
    let seconds = go.elapsed().as_secs_f64();

    let tracer_exit = match sampler.gone_at {
        Some(t) => Err(format!(
            "exited on its own {t:.0} s into the load{}",
            tracer.stderr_tail()
        )),
        None => tracer
            .stop(Some(libc::SIGINT), Duration::from_secs(120))
            .map(|exit| exit.describe())
            .map_err(|e| format!("{e:#}")),
    };
    output.poll().context("reading the tracer's output")?;
    client.close_stdin();
    let _ = client.stop(None, Duration::from_secs(300));
    let _ = server.stop(Some(libc::SIGTERM), Duration::from_secs(30));

    let figures = figures::judge(&Measured {
        settings: &settings,
        seconds,
        rss: &sampler.rss,
        output: &output,
        status_offset_s: go.duration_since(spawned).as_secs_f64(),
        tally: &tally,
        tracer_exit,
        client_result: client_line.and_then(|l| serde_json::from_str::<Value>(&l).ok()),
    });
    println!("{}", render::markdown(&figures));
    eprintln!(
        "tracer-soak: the tracer's output is in {}, the leakers' log in {}",
        out_path.display(),
        log_path.display()
    );
    if let Some(path) = &cli.json {
        write_json(path, &figures)?;
    }
    Ok(figures.failures)
}

fn progress(go: Instant, load: Duration, spawner: &Spawner, output: &Output, sampler: &Sampler) {
    let (started, alive) = spawner.progress();
    let last = output.statuses.last();
    eprintln!(
        "tracer-soak: {:.0}/{:.0} s: {started} leaking processes started ({alive} alive), {} leaks of theirs reported; \
         tracer RSS {} MiB, {} sockets tracked, {} ring-buffer drops",
        go.elapsed().as_secs_f64(),
        load.as_secs_f64(),
        output.leaker_leak_lines(),
        sampler
            .rss
            .last()
            .map_or("?".into(), |&(_, k)| format!("{:.1}", k as f64 / 1024.0)),
        last.and_then(|s| s.sockets_tracked).map_or("?".into(), |n| n.to_string()),
        last.and_then(|s| s.ringbuf_drops).map_or("?".into(), |n| n.to_string()),
    );
}

fn write_json(path: &Path, figures: &figures::Figures) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(figures)? + "\n";
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("tracer-soak: wrote {}", path.display());
    Ok(())
}
