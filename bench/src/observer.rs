//! What watches the load: nothing (the baseline), the tracer in one of its
//! configurations, or a peer tool. Each knows how to start, how to tell it
//! is ready, how to stop, and what it can say about the events it saw.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::procs::{Exit, OnParentDeath, Out, Proc};
use crate::scrape::{self, Scraper};

/// bpftrace's program: one line per state change. BEGIN runs once every
/// probe is attached, so its line says the tool is ready. Event lines start
/// with "E " so that the runner can count them without parsing.
pub const BPFTRACE_PROGRAM: &str = r#"BEGIN { printf("READY\n"); }
tracepoint:sock:inet_sock_set_state {
  printf("E %d %s %s:%d %s:%d %d -> %d\n", pid, comm, ntop(args->saddr), args->sport,
         ntop(args->daddr), args->dport, args->oldstate, args->newstate);
}"#;

#[derive(Clone, Debug)]
pub enum Observer {
    Baseline,
    Tracer(TracerKind),
    /// bcc's tcpstates (a Python script).
    Bcc(PathBuf),
    Bpftrace(PathBuf),
    /// `strace -f -o /dev/null` around the client.
    Strace(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TracerKind {
    /// `tracer live`, host-wide, text to /dev/null.
    Text,
    /// `tracer live --json`, to a file.
    Json,
    /// `tracer live --json --events`: every state change, accept and close
    /// as a JSON line too (full fidelity), to a file.
    Events,
    /// `tracer record -o FILE`.
    Record,
    /// `tracer live --json --pid PID` of an idle, unrelated process.
    PidFilter,
    /// `tracer live --json --no-stacks`: what the open stacks cost.
    NoStacks,
    /// `tracer live --json --stack-rate 0`: an open stack for every
    /// connect and accept, so that with [`TracerKind::NoStacks`] the cost of
    /// one stack walk can be told.
    AllStacks,
    /// `tracer live --json --pid CLIENT --no-stacks` and `... --stack-rate
    /// 0`: the two that tell what one of the client's stacks costs (with
    /// `--pid`, the server's accepts take none).
    ClientNoStacks,
    ClientAllStacks,
    /// `tracer daemon --listen 127.0.0.1:PORT`, its JSON lines to a file,
    /// scraped every 100 ms ([`crate::scrape`]) while the load runs.
    Daemon,
}

impl TracerKind {
    /// `tracer live --json` with some options, its output to a file.
    fn is_live_json(self) -> bool {
        !matches!(self, TracerKind::Text | TracerKind::Record)
    }

    /// Every event reaches userspace and is kept (`record`, `live
    /// --events`): held to the send-everything floor. The others only need
    /// what leaks, and are held to the count-in-the-kernel one.
    pub fn full_fidelity(self) -> bool {
        matches!(self, TracerKind::Events | TracerKind::Record)
    }
}

impl Observer {
    pub fn label(&self, leak_after: Option<&str>) -> String {
        let extra = leak_after.map(|l| format!(" --leak-after {l}")).unwrap_or_default();
        match self {
            Observer::Baseline => "baseline (no tracer)".into(),
            Observer::Tracer(TracerKind::Text) => format!("tracer live{extra} (text, host-wide)"),
            Observer::Tracer(TracerKind::Json) => format!("tracer live --json{extra}"),
            Observer::Tracer(TracerKind::Daemon) => format!("tracer daemon{extra} (scraped every 100 ms)"),
            Observer::Tracer(TracerKind::Events) => format!("tracer live --json --events{extra}"),
            Observer::Tracer(TracerKind::Record) => format!("tracer record{extra}"),
            Observer::Tracer(TracerKind::PidFilter) => format!("tracer live --json --pid <idle>{extra}"),
            Observer::Tracer(TracerKind::NoStacks) => format!("tracer live --json --no-stacks{extra}"),
            Observer::Tracer(TracerKind::AllStacks) => format!("tracer live --json --stack-rate 0{extra}"),
            Observer::Tracer(TracerKind::ClientNoStacks) => {
                format!("tracer live --json --pid <client> --no-stacks{extra}")
            }
            Observer::Tracer(TracerKind::ClientAllStacks) => {
                format!("tracer live --json --pid <client> --stack-rate 0{extra}")
            }
            Observer::Bcc(_) => "bcc tcpstates".into(),
            Observer::Bpftrace(_) => "bpftrace one-liner".into(),
            Observer::Strace(_) => "strace -f (client)".into(),
        }
    }

    /// A peer tool: its failures are reported but do not fail the bench.
    pub fn is_peer(&self) -> bool {
        matches!(self, Observer::Bcc(_) | Observer::Bpftrace(_) | Observer::Strace(_))
    }

    /// Runs eBPF programs, whose kernel time the accounting run measures.
    pub fn uses_ebpf(&self) -> bool {
        matches!(self, Observer::Tracer(_) | Observer::Bcc(_) | Observer::Bpftrace(_))
    }
}

/// A running observer (strace excepted: it runs as the client).
pub struct Running {
    pub proc: Proc,
    kind: Watch,
    /// The daemon's scraper, stopped before the daemon.
    scraper: Option<Scraper>,
    /// From spawn to ready.
    pub start_seconds: f64,
}

enum Watch {
    Tracer { kind: TracerKind, output: Option<PathBuf> },
    Peer,
}

/// What an observer says about the events, after it stopped.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub kernel_generated: Option<u64>,
    /// Everything the agent analysed (`stats.agent.events`): with sockets
    /// followed in the kernel, also what it read from the kernel's maps.
    pub received: Option<u64>,
    /// Records the agent took from the ring buffer (`stats.delivered`, where
    /// the tracer says; else `received`), and those it could not decode:
    /// with the drops, they add up to what the kernel generated.
    pub delivered: Option<u64>,
    pub decode_errors: Option<u64>,
    pub drops: Option<u64>,
    /// Hook runs the kernel skipped (`stats.kernel.hook_misses`): events
    /// never generated, so outside generated = delivered + dropped.
    pub hook_misses: Option<u64>,
    pub leaks_reported: Option<u64>,
    pub output_bytes: Option<u64>,
    /// Anything worth a note (hooks not attached, damaged recording).
    pub notes: Vec<String>,
}

pub struct Start<'a> {
    pub tracer: &'a Path,
    pub tmp: &'a Path,
    /// File name stem for this run's outputs.
    pub stem: &'a str,
    pub leak_after: Option<&'a str>,
    /// For `--pid`: the idle process.
    pub pid: Option<i32>,
}

const READY_TIMEOUT: Duration = Duration::from_secs(120);

pub fn start(obs: &Observer, s: &Start) -> Result<Option<Running>> {
    let began = std::time::Instant::now();
    let running = start_inner(obs, s)?;
    Ok(running.map(|r| Running {
        start_seconds: began.elapsed().as_secs_f64(),
        ..r
    }))
}

fn start_inner(obs: &Observer, s: &Start) -> Result<Option<Running>> {
    match obs {
        Observer::Baseline | Observer::Strace(_) => Ok(None),
        Observer::Tracer(kind) => start_tracer(*kind, s).map(Some),
        Observer::Bcc(path) => {
            let mut cmd = Command::new(path);
            // The header line, printed once the tracepoint is attached, is
            // how we know it is ready: Python must not sit on it in a buffer.
            cmd.env("PYTHONUNBUFFERED", "1");
            let mut p = Proc::spawn("tcpstates", cmd, false, Out::Tap(Some(b"ffff")), OnParentDeath::Kill)?;
            p.wait_until("its header line", READY_TIMEOUT, |p| p.stdout_line("SKADDR").is_some())?;
            Ok(Some(Running {
                proc: p,
                kind: Watch::Peer,
                scraper: None,
                start_seconds: 0.0,
            }))
        }
        Observer::Bpftrace(path) => {
            let mut cmd = Command::new(path);
            cmd.arg("-e").arg(BPFTRACE_PROGRAM);
            let mut p = Proc::spawn("bpftrace", cmd, false, Out::Tap(Some(b"E ")), OnParentDeath::Kill)?;
            p.wait_until("its READY line", READY_TIMEOUT, |p| p.stdout_line("READY").is_some())?;
            Ok(Some(Running {
                proc: p,
                kind: Watch::Peer,
                scraper: None,
                start_seconds: 0.0,
            }))
        }
    }
}

fn start_tracer(kind: TracerKind, s: &Start) -> Result<Running> {
    let mut cmd = Command::new(s.tracer);
    let output = match kind {
        TracerKind::Text => {
            cmd.arg("live");
            None
        }
        TracerKind::Record => {
            let path = s.tmp.join(format!("{}.rec", s.stem));
            cmd.arg("record").arg("-o").arg(&path);
            Some(path)
        }
        TracerKind::Daemon => {
            cmd.args(["daemon", "--listen"]);
            Some(s.tmp.join(format!("{}.jsonl", s.stem)))
        }
        _ => {
            cmd.args(["live", "--json"]);
            Some(s.tmp.join(format!("{}.jsonl", s.stem)))
        }
    };
    let port = if kind == TracerKind::Daemon {
        let port = scrape::free_port().context("finding a free port for the daemon")?;
        cmd.arg(format!("127.0.0.1:{port}"));
        Some(port)
    } else {
        None
    };
    if kind == TracerKind::Events {
        cmd.arg("--events");
    }
    if matches!(kind, TracerKind::NoStacks | TracerKind::ClientNoStacks) {
        cmd.arg("--no-stacks");
    }
    if matches!(kind, TracerKind::AllStacks | TracerKind::ClientAllStacks) {
        cmd.args(["--stack-rate", "0"]);
    }
    if matches!(
        kind,
        TracerKind::PidFilter | TracerKind::ClientNoStacks | TracerKind::ClientAllStacks
    ) {
        let pid = s.pid.context("no process for --pid")?;
        cmd.args(["--pid", &pid.to_string()]);
    }
    if let Some(l) = s.leak_after {
        cmd.args(["--leak-after", l]);
    }
    let out = match &output {
        Some(path) if kind.is_live_json() => {
            Out::File(File::create(path).with_context(|| format!("creating {}", path.display()))?)
        }
        _ => Out::Null,
    };
    // SIGTERM if we die: the tracer then detaches and exits cleanly.
    let mut p = Proc::spawn("tracer", cmd, false, out, OnParentDeath::Terminate)?;
    match kind {
        TracerKind::Text => p.wait_until("its 'tracer: watching' line", READY_TIMEOUT, |p| {
            p.stderr_line("tracer: watching").is_some()
        })?,
        TracerKind::Record => p.wait_until("its 'tracer: recording to' line", READY_TIMEOUT, |p| {
            p.stderr_line("tracer: recording to").is_some()
        })?,
        _ => {
            let path = output.clone().expect("json output");
            p.wait_until("its start line", READY_TIMEOUT, |_| first_line_is_start(&path))?
        }
    }
    Ok(Running {
        proc: p,
        kind: Watch::Tracer { kind, output },
        scraper: port.map(Scraper::start),
        start_seconds: 0.0,
    })
}

/// The JSON output's first line is complete and is the start object.
fn first_line_is_start(path: &Path) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 64];
    let Ok(mut f) = File::open(path) else { return false };
    let n = f.read(&mut buf).unwrap_or(0);
    let head = &buf[..n];
    // Written in one flush after the snapshot: once any of it is there,
    // the type is too.
    head.starts_with(br#"{"type":"start""#)
}

impl Running {
    pub fn is_tracer(&self) -> bool {
        matches!(self.kind, Watch::Tracer { .. })
    }

    /// SIGINT, as a user would. The tracer gets long (a slow shutdown is a
    /// finding, not a reason to kill it). bcc's tcpstates may never see its
    /// KeyboardInterrupt: raised inside a ctypes callback, it is printed and
    /// ignored while events keep coming; so peers get SIGTERM after 3 s.
    /// Returns how it ended and a note when SIGINT was not enough.
    pub fn stop(&mut self) -> Result<(Exit, Option<String>)> {
        let steps: &[(i32, Duration)] = match self.kind {
            Watch::Tracer { .. } => &[(libc::SIGINT, Duration::from_secs(120))],
            Watch::Peer => &[
                (libc::SIGINT, Duration::from_secs(3)),
                (libc::SIGTERM, Duration::from_secs(10)),
            ],
        };
        let scraped = self.scraper.take().map(|s| {
            let t = s.stop();
            match &t.first_error {
                None => format!("{} scrapes of /metrics, none failed", t.ok),
                Some(e) => format!("{} scrapes of /metrics, {} FAILED (first: {e})", t.ok, t.failed),
            }
        });
        let (exit, step) = self.proc.stop_with(steps)?;
        let note = (step > 0).then(|| format!("{} ignored SIGINT for 3 s; stopped with SIGTERM", self.proc.name));
        Ok((exit, note.into_iter().chain(scraped).reduce(|a, b| format!("{a}; {b}"))))
    }

    /// Counters that need the stopped observer's output. `tracer` is used to
    /// read a recording back (`tracer report --json`).
    pub fn counters(&self, tracer: &Path) -> Result<Counters> {
        match &self.kind {
            Watch::Peer => {
                let tap = self.proc.stdout.as_ref().expect("peers are tapped");
                Ok(Counters {
                    received: Some(tap.events()),
                    // Lost-sample reports come on either stream.
                    drops: Some(tap.lost() + self.proc.stderr.lost()),
                    output_bytes: Some(tap.bytes()),
                    ..Counters::default()
                })
            }
            Watch::Tracer { kind, output } => {
                let Some(path) = output else {
                    return Ok(Counters::default());
                };
                let bytes = std::fs::metadata(path).map(|m| m.len()).ok();
                let (text, start) = match kind {
                    TracerKind::Record => (report_json(tracer, path)?, None),
                    _ => {
                        let (start, tail) = first_and_last(path, TAIL_BYTES)?;
                        // The summary is the last line; a summary longer
                        // than the tail (many leaks) needs the whole file.
                        let text = match summary_counters(&tail) {
                            Ok(_) => tail,
                            Err(_) => {
                                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
                            }
                        };
                        (text, start)
                    }
                };
                let mut c = summary_counters(&text)?;
                c.output_bytes = bytes;
                if let Some(start) = start {
                    c.notes.extend(detached_hooks(&start));
                }
                Ok(c)
            }
        }
    }
}

/// How much of the end of `live --json`'s output is read for the summary
/// (with `--events` the output is hundreds of MB).
const TAIL_BYTES: u64 = 8 << 20;

/// The first line of a file and its last `tail` bytes (from the start of a
/// line, unless the first line is cut).
fn first_and_last(path: &Path, tail: u64) -> Result<(Option<String>, String)> {
    use std::io::{BufRead, Read, Seek, SeekFrom};
    let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut first = String::new();
    std::io::BufReader::new(&mut f)
        .read_line(&mut first)
        .with_context(|| format!("reading {}", path.display()))?;
    let from = len.saturating_sub(tail);
    f.seek(SeekFrom::Start(from))
        .with_context(|| format!("reading {}", path.display()))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if from > 0 {
        // Start at a whole line.
        text = text
            .split_once('\n')
            .map(|(_, rest)| rest.to_owned())
            .unwrap_or_default();
    }
    let first = first.trim_end().to_owned();
    Ok(((!first.is_empty()).then_some(first), text))
}

/// `tracer report --json FILE`: replays the recording through the same
/// analysis; its summary carries the counters recorded at the end.
fn report_json(tracer: &Path, recording: &Path) -> Result<String> {
    let out_path = recording.with_extension("report.jsonl");
    let out = File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let mut cmd = Command::new(tracer);
    cmd.arg("report").arg("--json").arg(recording);
    let mut p = Proc::spawn("tracer report", cmd, false, Out::File(out), OnParentDeath::Kill)?;
    let exit = p.stop(None, Duration::from_secs(300))?;
    if !exit.success() {
        bail!("tracer report exited with {}{}", exit.describe(), p.stderr_tail());
    }
    let text = std::fs::read_to_string(&out_path).with_context(|| format!("reading {}", out_path.display()))?;
    let _ = std::fs::remove_file(&out_path);
    Ok(text)
}

/// Counters from the last `summary` line of the tracer's JSON output.
pub fn summary_counters(jsonl: &str) -> Result<Counters> {
    let line = jsonl
        .lines()
        .rev()
        .find(|l| l.starts_with(r#"{"type":"summary""#))
        .context("the tracer's output has no summary line")?;
    let v: Value = serde_json::from_str(line).context("parsing the tracer's summary")?;
    let stats = &v["stats"];
    let num = |p: &str| stats.pointer(p).and_then(Value::as_u64);
    let mut notes = Vec::new();
    if let Some(rec) = v.get("recording") {
        for d in rec["damage"].as_array().into_iter().flatten() {
            notes.push(format!("recording damage: {}", d.as_str().unwrap_or("?")));
        }
    }
    for (key, what) in [
        ("/kernel/stack_errors", "stacks lost"),
        ("/kernel/stacks_sampled_out", "open stacks sampled out (--stack-rate)"),
        ("/kernel/watch_full", "watch map full"),
        ("/kernel/owners_full", "owners not kept (socket map full)"),
        (
            "/kernel/hook_misses",
            "hook runs skipped by the kernel (program already running on that CPU)",
        ),
        ("/agent/untracked_table_full", "sockets untracked (table full)"),
        ("/decode_errors", "decode errors"),
    ] {
        if let Some(n) = num(key).filter(|n| *n > 0) {
            notes.push(format!("{what}: {n}"));
        }
    }
    Ok(Counters {
        kernel_generated: num("/kernel/generated"),
        drops: num("/kernel/ringbuf_drops"),
        hook_misses: num("/kernel/hook_misses"),
        received: num("/agent/events"),
        delivered: num("/delivered").or(num("/agent/events")),
        decode_errors: num("/decode_errors"),
        leaks_reported: num("/agent/leaks_reported"),
        output_bytes: None,
        notes,
    })
}

/// Hooks the start line says are not attached.
fn detached_hooks(start: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<Value>(start) else {
        return Vec::new();
    };
    v["hooks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["attached"] == Value::Bool(false))
        .map(|h| format!("hook {} not attached", h["hook"].as_str().unwrap_or("?")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = concat!(
        r#"{"type":"start","hooks":[{"hook":"inet_sock_set_state","attached":true},{"hook":"sys_exit_accept","attached":false}],"filter_pid":null,"leak_after_ms":5000,"preexisting_sockets":3}"#,
        "\n",
        r#"{"type":"status","time":"x","uptime_ms":1,"events":5,"sockets_tracked":1,"leaks_now":0,"ringbuf_drops":0}"#,
        "\n",
        r#"{"type":"summary","duration_ms":2305,"reason":"signal","leaks":[],"groups":[],"stats":{"kernel":{"generated":1000,"ringbuf_drops":7,"watch_full":0,"fd_unresolved":0,"close_range_truncated":0,"stack_errors":2},"agent":{"events":993,"sockets_tracked":3,"sockets_seen":3,"untracked_table_full":0,"leaks_reported":4,"late_closes":0,"resets":0},"decode_errors":0}}"#,
        "\n"
    );

    #[test]
    fn summary() {
        let c = summary_counters(OUTPUT).unwrap();
        assert_eq!(c.kernel_generated, Some(1000));
        assert_eq!(c.drops, Some(7));
        assert_eq!(c.received, Some(993));
        assert_eq!(
            c.delivered,
            Some(993),
            "without stats.delivered, what the agent analysed"
        );
        assert_eq!(c.decode_errors, Some(0));
        assert_eq!(c.leaks_reported, Some(4));
        assert_eq!(c.notes, vec!["stacks lost: 2".to_owned()]);
        assert!(summary_counters("{\"type\":\"start\"}\n").is_err());
    }

    #[test]
    fn summary_from_the_end_of_a_long_output() {
        let dir = std::env::temp_dir().join(format!("tracer-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.jsonl");
        let (start, rest) = OUTPUT.split_once('\n').unwrap();
        let events = r#"{"type":"event","kind":"state"}"#.to_owned() + "\n";
        std::fs::write(&path, format!("{start}\n{}{rest}", events.repeat(1000))).unwrap();
        let (first, tail) = first_and_last(&path, 4096).unwrap();
        assert_eq!(first.as_deref(), Some(start));
        assert!(tail.len() <= 4096 && tail.starts_with(r#"{"type":"event""#), "{tail}");
        assert_eq!(summary_counters(&tail).unwrap().received, Some(993));
        let (_, whole) = first_and_last(&path, 1 << 20).unwrap();
        assert!(whole.starts_with(start));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn delivered_apart_from_what_the_agent_analysed() {
        // Default live follows sockets in the kernel: the agent also reads
        // CLOSE_WAIT sockets from a map, so it analyses more than the ring
        // buffer delivered.
        let line = r#"{"type":"summary","stats":{"kernel":{"generated":180,"ringbuf_drops":0},"agent":{"events":262},"decode_errors":1,"delivered":179}}"#;
        let c = summary_counters(line).unwrap();
        assert_eq!(
            (c.kernel_generated, c.received, c.delivered),
            (Some(180), Some(262), Some(179))
        );
        assert_eq!(c.decode_errors, Some(1));
    }

    #[test]
    fn hooks() {
        let start = OUTPUT.lines().next().unwrap();
        assert_eq!(
            detached_hooks(start),
            vec!["hook sys_exit_accept not attached".to_owned()]
        );
    }
}
