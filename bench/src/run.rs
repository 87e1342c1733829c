//! One run of one configuration: the server, the client (wrapped by
//! strace when that is the observer), the observer, the load, the samples
//! and the observer's counters, then teardown.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::observer::{self, Observer, TracerKind};
use crate::procs::{self, OnParentDeath, Out, Proc};
use crate::{Config, RunResult, Settings, Workload};

pub struct Ctx<'a> {
    pub tracer: &'a Path,
    pub loadgen: &'a Path,
    /// Where JavaChurn.class is, for the java-churn workload.
    pub java_classes: Option<&'a Path>,
    pub tmp: &'a Path,
    pub settings: &'a Settings,
}

impl RunResult {
    pub fn new(index: usize, config: &Config, run: usize, accounting: bool) -> RunResult {
        RunResult {
            config: index,
            workload: config.workload.name().to_owned(),
            label: config.label(),
            run,
            accounting,
            ..RunResult::default()
        }
    }
}

/// Waits, after the load, until the observer has caught up with it (what
/// the load left in the ring buffer is drained, so that its CPU counts in
/// the load's window): until its CPU clock grows by less than 10 ms in
/// 100 ms, for at most 10 s. Returns how long it waited.
fn settle(pid: i32) -> f64 {
    let began = std::time::Instant::now();
    let mut last = procs::cpu_clock_seconds(pid);
    while began.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        let now = procs::cpu_clock_seconds(pid);
        match (last, now) {
            (Some(a), Some(b)) if b - a < 0.010 => break,
            (_, None) => break,
            _ => last = now,
        }
    }
    began.elapsed().as_secs_f64()
}

/// The observer at its ready line: where the load's share begins.
#[derive(Default)]
struct AtReady {
    cpu_s: Option<f64>,
    programs: Vec<procs::ProgRun>,
}

pub fn run_one(ctx: &Ctx, index: usize, config: &Config, run: usize, accounting: bool) -> RunResult {
    let mut r = RunResult::new(index, config, run, accounting);
    if let Err(e) = try_run(ctx, index, config, run, &mut r) {
        r.error = Some(format!("{e:#}"));
    }
    r
}

fn try_run(ctx: &Ctx, index: usize, config: &Config, run: usize, r: &mut RunResult) -> Result<()> {
    let s = ctx.settings;
    let threads = s.threads.to_string();
    let addrs = s.addrs.to_string();

    // The server, and the port it listens on.
    let (mut server, port) = tracer_bench::start_loadgen_server(ctx.loadgen, s.threads, s.addrs)?;
    let port = port.to_string();

    // An idle, unrelated process for --pid.
    let idle = match config.observer {
        Observer::Tracer(TracerKind::PidFilter) => {
            let mut cmd = Command::new("sleep");
            cmd.arg("100000");
            Some(Proc::spawn("sleep", cmd, false, Out::Null, OnParentDeath::Kill)?)
        }
        _ => None,
    };

    // The client, wrapped by strace when that is the observer. It prepares
    // (idle connections), says READY and waits for a line on stdin.
    let seconds = format!("{}", s.seconds);
    let java_args = [
        "--port".to_owned(),
        port.clone(),
        "--addrs".to_owned(),
        addrs.clone(),
        "--threads".to_owned(),
        threads.clone(),
        "--duration".to_owned(),
        seconds.clone(),
    ];
    let mut client_args = vec![
        "client".to_owned(),
        "--port".to_owned(),
        port,
        "--addrs".to_owned(),
        addrs,
        "--threads".to_owned(),
        threads,
        "--mode".to_owned(),
        config.workload.name().to_owned(),
        "--duration".to_owned(),
        seconds,
        "--sync".to_owned(),
    ];
    match config.workload {
        Workload::Churn | Workload::JavaChurn => {}
        Workload::ChurnLeak => client_args.extend(["--leak-percent".to_owned(), s.leak_percent.to_string()]),
        Workload::ManySockets => client_args.extend(["--open".to_owned(), s.open.to_string()]),
    }
    let cmd = match (&config.observer, config.workload) {
        (_, Workload::JavaChurn) => {
            let classes = ctx.java_classes.context("java-churn without JavaChurn.class")?;
            let mut cmd = Command::new("java");
            // Frame pointers in compiled code, so the walk covers the
            // whole stack and its cost is the whole stack's.
            cmd.args(["-XX:+PreserveFramePointer", "-cp"])
                .arg(classes)
                .arg("JavaChurn")
                .args(&java_args);
            cmd
        }
        (Observer::Strace(strace), _) => {
            let mut cmd = Command::new(strace);
            cmd.args(["-f", "-o", "/dev/null"]).arg(ctx.loadgen).args(&client_args);
            cmd
        }
        _ => {
            let mut cmd = Command::new(ctx.loadgen);
            cmd.args(&client_args);
            cmd
        }
    };
    let mut client = Proc::spawn("loadgen client", cmd, true, Out::Tap(None), OnParentDeath::Kill)?;
    let prepare = if config.workload == Workload::ManySockets {
        Duration::from_secs(600)
    } else {
        Duration::from_secs(60)
    };
    client.wait_until("READY", prepare, |p| p.stderr_line("READY").is_some())?;

    // The observer, ready before the load starts.
    let stem = format!("c{index}-r{run}");
    let mut running = observer::start(
        &config.observer,
        &observer::Start {
            tracer: ctx.tracer,
            tmp: ctx.tmp,
            stem: &stem,
            leak_after: config.leak_after.as_deref(),
            pid: match config.observer {
                Observer::Tracer(TracerKind::ClientNoStacks | TracerKind::ClientAllStacks) => Some(client.pid),
                _ => idle.as_ref().map(|p| p.pid),
            },
        },
    )?;

    // What start-up cost, to tell the load's share apart.
    let at_ready = running.as_ref().map(|o| AtReady {
        cpu_s: procs::cpu_clock_seconds(o.proc.pid),
        programs: if r.accounting {
            procs::bpf_programs(o.proc.pid).unwrap_or_default()
        } else {
            Vec::new()
        },
    });
    client.write_stdin("go\n")?;
    let mut line = None;
    let limit = Duration::from_secs_f64(s.seconds) + Duration::from_secs(120);
    client.wait_until("its result line", limit, |p| {
        line = p.stdout_line("{");
        line.is_some()
    })?;
    let result: Value =
        serde_json::from_str(line.as_deref().expect("checked")).context("parsing the client's result")?;
    r.connections = result["connections"].as_u64();
    r.seconds = result["seconds"].as_f64();
    r.conn_per_sec = result["conn_per_sec"].as_f64();
    r.client_errors = result["errors"].as_u64();
    r.leaked_open = result["leaked_open"].as_u64();
    r.idle_open = result["idle_open"].as_u64();
    if let Some(n) = r.client_errors.filter(|n| *n > 0) {
        r.notes.push(format!("client: {n} connection errors"));
    }

    // Sample, then stop the observer (strace: the client is the observer).
    let mut outcome = Ok(());
    if let Some(obs) = running.as_mut() {
        r.agent_start_s = Some(obs.start_seconds);
        r.settle_s = Some(settle(obs.proc.pid));
        let sample = obs.proc.sample();
        r.agent_cpu_s = sample.cpu_seconds;
        r.agent_peak_rss_kib = sample.peak_rss_kib;
        let cpu_now = procs::cpu_clock_seconds(obs.proc.pid);
        let programs = if r.accounting {
            procs::bpf_programs(obs.proc.pid)
        } else {
            None
        };
        if let Some(progs) = &programs {
            r.bpf_cpu_s = Some(progs.iter().map(|p| p.run_time_ns as f64 / 1e9).sum());
            r.bpf_runs = Some(progs.iter().map(|p| p.run_cnt).sum());
        }
        let ready = at_ready.unwrap_or_default();
        if let Some(progs) = &programs {
            r.bpf_programs = procs::prog_delta(&ready.programs, progs);
            r.bpf_cpu_load_s = Some(r.bpf_programs.iter().map(|p| p.run_time_ns as f64 / 1e9).sum());
        }
        r.agent_cpu_load_s = cpu_now.zip(ready.cpu_s).map(|(a, b)| a - b);
        let (exit, note) = obs.stop()?;
        r.agent_cpu_total_s = Some(exit.cpu_seconds());
        r.agent_cpu_after_ready_s = ready.cpu_s.map(|b| (exit.cpu_seconds() - b).max(0.0));
        r.notes.extend(note);
        // A peer's exit status after our signal is its own business.
        if !exit.success() && obs.is_tracer() {
            outcome = Err(anyhow::anyhow!(
                "{} exited with {} after SIGINT{}",
                obs.proc.name,
                exit.describe(),
                obs.proc.stderr_tail()
            ));
        } else {
            let c = obs.counters(ctx.tracer)?;
            r.kernel_generated = c.kernel_generated;
            r.received = c.received;
            r.delivered = c.delivered;
            r.decode_errors = c.decode_errors;
            r.drops = c.drops;
            r.hook_misses = c.hook_misses;
            // Generated = delivered + undecodable + dropped, exactly,
            // whatever the mode sends per connection; a surplus means the
            // counters disagree.
            r.missing = match (c.kernel_generated, c.delivered, c.drops) {
                (Some(g), Some(dl), Some(d)) => {
                    let got = dl + c.decode_errors.unwrap_or(0) + d;
                    if got > g {
                        r.notes.push(format!(
                            "the agent's counters exceed the kernel's: {g} generated, {dl} delivered + {} undecodable + {d} dropped",
                            c.decode_errors.unwrap_or(0)
                        ));
                    }
                    Some(g.saturating_sub(got))
                }
                _ => None,
            };
            r.leaks_reported = c.leaks_reported;
            r.output_bytes = c.output_bytes;
            r.notes.extend(c.notes);
        }
    } else if matches!(config.observer, Observer::Strace(_)) {
        let sample = client.sample();
        r.agent_cpu_s = sample.cpu_seconds;
        r.agent_peak_rss_kib = sample.peak_rss_kib;
    }

    // Let the client go (it closes its connections), then the server.
    client.close_stdin();
    let exit = client.stop(None, Duration::from_secs(300))?;
    if matches!(config.observer, Observer::Strace(_)) {
        r.agent_cpu_total_s = Some(exit.cpu_seconds());
    }
    if !exit.success() && outcome.is_ok() {
        outcome = Err(anyhow::anyhow!(
            "the client exited with {}{}",
            exit.describe(),
            client.stderr_tail()
        ));
    }
    let _ = server.stop(Some(libc::SIGTERM), Duration::from_secs(30));
    drop(idle);
    for ext in ["jsonl", "rec"] {
        let _ = std::fs::remove_file(ctx.tmp.join(format!("{stem}.{ext}")));
    }
    outcome
}
