//! Tracing the kernel: `tracer live` (findings to stdout) and `tracer
//! record` (inputs to a file). Kernel events, the start-up snapshot, process
//! names, symbolized stacks and leak-time evidence become [`Input`]s; each
//! is recorded (if recording) and fed to the one [`Engine`].

mod evidence_job;
mod follow;
mod session;

use std::{
    collections::HashSet,
    io::{self, IsTerminal},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use netlink_packet_sock_diag::inet::StateFlags;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    time::{interval, Instant, MissedTickBehavior},
};
use tracer_common::tcp;

use evidence_job::wait_evidence;
use session::Session;

use crate::{
    cli::TraceArgs,
    clock::{self, WallClock},
    correlate::Correlator,
    engine::Engine,
    input::{ExitInput, Input, ProcessInput, SnapshotInput},
    kernel::{Kernel, LoadOptions},
    procs::{self},
    record::writer::{segment_path, Header, HeaderOptions, Recorder},
    sink::{self, Sink, Start},
    snapshot,
};

/// How often the ring buffer is drained and the sweep runs. Wakeups from
/// the kernel are batched, so this bounds reporting latency.
const TICK: Duration = Duration::from_millis(100);
/// Least time between two evidence gatherings (sock_diag + /proc scan).
const EVIDENCE_EVERY: Duration = Duration::from_secs(1);
/// Most inputs queued behind an evidence gathering (about 128 bytes each).
const HOLD_CAP: usize = 1 << 18;
/// Where sockets are followed in the kernel (records are rare): wake the
/// reader early once this much is waiting in the ring buffer.
const WAKEUP_FRACTION: u64 = 4;
/// Where every event is sent: how often the ring buffer is drained. The
/// kernel side never wakes the reader there: a wakeup from inside the
/// state hook raises an interrupt (irq_work) on its own CPU, whose exit
/// runs pending softirqs, whose state changes find the hook busy and are
/// skipped (`hook_misses`: 28 and 150 in two of three 3 s `--events`
/// churns with wakeups, 0 in three without). 10 ms of the bench's churn
/// is about 400 KB, a twentieth of the ring.
const FULL_DRAIN_EVERY: Duration = Duration::from_millis(10);
/// Ring buffer where every event is sent (`--events`, `record`): about
/// 60k events, a quarter of a second of the bench's churn.
const FULL_RING_BYTES: u32 = 8 << 20;
/// Ring buffer where sockets are followed in the kernel: what comes is
/// stacks for the catalogue, and the changes and closes of sockets that
/// stayed in CLOSE_WAIT. Its pages are all resident in the agent (mapped
/// twice), so its size is a third of the agent's memory on an idle host.
const FOLLOW_RING_BYTES: u32 = 4 << 20;
/// Most time between two updates of the daemon's health figures.
const DAEMON_STATUS_EVERY: Duration = Duration::from_secs(1);

/// Where findings go: stdout (`live`), or a file (`record`).
pub enum Output {
    Live {
        json: bool,
        events: bool,
    },
    Record {
        path: PathBuf,
        max_size: Option<u64>,
        /// `--rotate N`: the recording goes on in N files in turn.
        rotate: Option<u32>,
    },
    /// `tracer daemon`: findings on a board the HTTP server reads, each
    /// new leak and late close also a JSON line on stdout.
    Daemon {
        board: sink::metrics::SharedBoard,
    },
}

struct RawFdRef(RawFd);
impl AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

pub async fn run(args: TraceArgs, output: Output) -> Result<()> {
    if let Some(pid) = args.pid {
        if !procs::exists(pid) {
            bail!("no process with pid {pid} (check the number with `ps -p {pid}`)");
        }
    }
    let missing = crate::privileges::check()?;
    // Other missing capabilities are warned about once, where they cost
    // something; kernel stacks would only come unnamed, silently.
    if args.kernel_stacks && missing.contains(crate::privileges::Optional::Syslog) {
        log::warn!("kernel frames will not be named: kallsyms hides its addresses (grant CAP_SYSLOG)");
    }
    log::debug!("{missing}");
    raise_nofile();
    let wall = WallClock::now();
    let leak_after_ns = args.leak_after.as_nanos() as u64;
    // Create the file before the (slow) load, so a bad path fails fast.
    let recorder = match &output {
        Output::Record { path, max_size, rotate } => {
            Some(Recorder::create(path, &header(&args, wall, *max_size), *rotate)?)
        }
        Output::Live { .. } | Output::Daemon { .. } => None,
    };
    // Every event is sent only where every event is wanted: `--events`
    // prints them, a recording keeps them. Otherwise sockets are followed
    // in the kernel, and only those that stay in CLOSE_WAIT are read.
    let follow = (matches!(output, Output::Live { events: false, .. } | Output::Daemon { .. }) && !args.every_event)
        .then(|| follow::promote_after(leak_after_ns));
    let ring_bytes = args.ring_bytes.unwrap_or(if follow.is_some() {
        FOLLOW_RING_BYTES
    } else {
        FULL_RING_BYTES
    });
    let mut kernel = Kernel::load(&LoadOptions {
        filter_tgid: args.pid,
        ring_bytes,
        wakeup_bytes: if follow.is_some() {
            u64::from(ring_bytes) / WAKEUP_FRACTION
        } else {
            u64::MAX
        },
        watch_entries: args.watch_entries,
        reported_entries: args.reported_entries,
        close_wait_entries: args.close_wait_entries,
        socket_entries: args.socket_entries,
        kernel_stacks: args.kernel_stacks,
        user_stacks: !args.no_stacks,
        stack_rate: args.stack_rate,
        follow,
    })?;
    // Open the pidfd before the snapshot so an exit in between is not lost.
    let pidfd = args.pid.map(pidfd_open).transpose()?;

    let sink: Box<dyn Sink> = match &output {
        Output::Live { json: true, .. } => Box::new(sink::JsonSink::new(io::BufWriter::new(io::stdout()))),
        Output::Live { json: false, .. } => {
            Box::new(sink::TextSink::new(io::BufWriter::new(io::stdout()), io::stderr()))
        }
        // Recording shows progress, not findings (`tracer report` does).
        Output::Record { .. } => Box::new(sink::NullSink),
        Output::Daemon { board } => Box::new(sink::metrics::MetricsSink::new(
            board.clone(),
            io::LineWriter::new(io::stdout()),
        )),
    };
    let mut s = Session::new(
        Engine::new(
            Correlator::new(leak_after_ns, args.pid, args.max_sockets),
            wall,
            matches!(output, Output::Live { events: true, .. }),
        ),
        sink,
        recorder,
        follow,
    );

    let (snap, snapshot_error) = snapshot_inputs(&mut kernel, args.pid, follow.is_some())?;
    let preexisting = snap.sockets.len();
    for pid in snap
        .sockets
        .iter()
        .filter_map(|s| s.holder.map(|h| h.0))
        .collect::<HashSet<_>>()
    {
        if let Some(info) = s.names.learn(pid) {
            s.inputs.push(Input::Process(ProcessInput { pid, info }));
        }
    }
    s.inputs.push(Input::Snapshot(snap));
    s.flush_inputs()?;
    release_freed_memory();
    s.sink.start(&Start {
        hooks: kernel.hooks.clone(),
        filter_pid: args.pid,
        leak_after_ms: leak_after_ns / 1_000_000,
        preexisting_sockets: preexisting,
        kernel: Some(crate::kernel::release()),
        snapshot_error,
        fallbacks: kernel.fallbacks.clone(),
    })?;
    if let Output::Record { path, rotate, .. } = &output {
        let to = match rotate {
            None => path.display().to_string(),
            Some(_) => format!("{}.*", path.display()),
        };
        eprintln!("tracer: recording to {to} ({preexisting} sockets already open); Ctrl-C to stop");
    }

    // SAFETY (both): the fds belong to `kernel` and `pidfd`, declared
    // before these and therefore dropped after them; they stay open.
    let ring = unsafe { AsyncFd::register_with_interest(RawFdRef(kernel.ring_fd()), Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))
        .context("polling the ring buffer")?;
    let exit_fd = match &pidfd {
        Some(fd) => Some(
            unsafe { AsyncFd::register_with_interest(RawFdRef(fd.as_raw_fd()), Interest::READABLE) }
                .map_err(|e| io::Error::other(e.to_string()))
                .context("polling the pidfd")?,
        ),
        None => None,
    };
    let mut tick = interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let full_stream = follow.is_none();
    let mut drain_tick = interval(FULL_DRAIN_EVERY);
    drain_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let progress_every = match output {
        Output::Record { .. } if io::stderr().is_terminal() => Duration::from_secs(1),
        // The board's health figures are a scrape's: keep them fresh.
        Output::Daemon { .. } => args.status_interval.min(DAEMON_STATUS_EVERY),
        _ => args.status_interval,
    };
    let mut status_tick = interval(progress_every);
    status_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    status_tick.tick().await; // the first tick is immediate
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = args.duration.map(|d| Instant::now() + d);
    let until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);
    let process_exited = async {
        match &exit_fd {
            Some(fd) => {
                let _ = fd.readable().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(process_exited);

    let reason = loop {
        let result = tokio::select! {
            guard = ring.readable() => {
                if let Ok(mut g) = guard { g.clear_ready(); }
                s.drain(&mut kernel)
            }
            _ = drain_tick.tick(), if full_stream => s.drain(&mut kernel),
            _ = tick.tick() => {
                let r = s.drain(&mut kernel).and_then(|()| s.tick(&mut kernel, clock::monotonic_ns()));
                for cookie in s.engine.take_reported() {
                    kernel.mark_reported(cookie);
                }
                kernel.set_reported_count(s.engine.leaks_open());
                r
            }
            found = wait_evidence(&mut s.evidence_job), if s.evidence_job.is_some() => s.evidence_done(found),
            _ = status_tick.tick() => s.status(&kernel, &output),
            _ = &mut until_deadline => break "duration",
            _ = sigint.recv() => break "signal",
            _ = sigterm.recv() => break "signal",
            _ = &mut process_exited => {
                // Let the exit's own closes arrive before concluding.
                tokio::time::sleep(TICK).await;
                if let Err(e) = s.drain(&mut kernel) { break output_error(e)?; }
                let pid = args.pid.expect("pidfd implies --pid");
                s.inputs.push(Input::ProcessExit(ExitInput { ns: clock::monotonic_ns(), pid }));
                if let Err(e) = s.flush_inputs() { break output_error(e)?; }
                break "process_exit";
            }
        };
        if let Err(e) = result {
            break output_error(e)?;
        }
        if s.full {
            eprintln!(
                "tracer: the recording reached --max-size ({}); stopping",
                size(s.recorder.as_ref().map_or(0, |r| r.written))
            );
            break "max_size";
        }
    };

    if reason != "output_closed" {
        s.finish(&mut kernel, reason)
            .await
            .or_else(|e| output_error(e).map(|_| ()))?;
    }
    if let (Output::Record { path, .. }, Some(r)) = (&output, &s.recorder) {
        match r.current_segment() {
            None => eprintln!(
                "tracer: wrote {} ({}); analyse it with `tracer report {}`",
                path.display(),
                size(r.written),
                path.display()
            ),
            Some(last) => eprintln!(
                "tracer: wrote {} files up to {} ({} in all; the older ones beyond --rotate removed); analyse them with `tracer report {}.*`",
                last + 1,
                segment_path(path, last).display(),
                size(r.written),
                path.display()
            ),
        }
    }
    Ok(())
}

fn header(args: &TraceArgs, wall: WallClock, max_size: Option<u64>) -> Header {
    let uts = procfs_uname();
    Header {
        tracer_version: env!("CARGO_PKG_VERSION").into(),
        hostname: uts.0,
        kernel_release: uts.1,
        boot_to_wall_offset_ns: wall.offset_ns(),
        started_at: wall.format(clock::monotonic_ns()),
        options: HeaderOptions {
            pid: args.pid,
            leak_after_ms: args.leak_after.as_millis() as u64,
            max_size,
        },
    }
}

fn procfs_uname() -> (String, String) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    (read("/proc/sys/kernel/hostname"), crate::kernel::release())
}

fn size(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A closed stdout (`tracer live | head`) ends tracing quietly; any other
/// output error is an error.
fn output_error(e: io::Error) -> Result<&'static str> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok("output_closed")
    } else {
        Err(e).context("writing output")
    }
}

/// The sockets that exist now. With `--pid`, they are also added to the
/// kernel's watch list, and read a second time so that a state change
/// between the two reads is not lost. With sockets followed in the kernel
/// (`follow`), those in CLOSE_WAIT are likewise added (so the kernel side
/// sends their leaving it, even when it saw them enter it, between
/// attaching and the snapshot) and read again: one that left CLOSE_WAIT
/// before it was added is dropped, or it would stay there for ever.
/// Without sock_diag (its modules not loadable) tracing goes on without
/// them, and the reason is returned.
fn snapshot_inputs(kernel: &mut Kernel, pid: Option<u32>, follow: bool) -> Result<(SnapshotInput, Option<String>)> {
    // Stamped *before* reading: every event after this stamp is applied on
    // top of the snapshot (replaying a change the dump already saw is
    // harmless; ignoring one it missed would keep a closed socket alive).
    let mut ns = clock::monotonic_ns();
    let mut snap = match snapshot::take(pid) {
        Ok(snap) => snap,
        Err(e) => {
            // Degrade, don't die: new sockets are still traced. The sink
            // says so (start line, banner).
            let why = format!("{e:#}; are the inet_diag and tcp_diag modules loadable?");
            if follow && pid.is_none() {
                // Nothing went into the watch list.
                kernel.set_snapshot_end(clock::monotonic_ns());
            }
            let none = SnapshotInput {
                ns,
                sockets: Vec::new(),
            };
            return Ok((none, Some(why)));
        }
    };
    if let Some(pid) = pid {
        for s in &snap {
            kernel.watch(s.cookie, pid);
        }
        let watched: HashSet<u64> = snap.iter().map(|s| s.cookie).collect();
        ns = clock::monotonic_ns();
        snap = snapshot::take(Some(pid))?
            .into_iter()
            .filter(|s| watched.contains(&s.cookie))
            .collect();
    } else if follow {
        // Every socket the dump found in CLOSE_WAIT entered it before now.
        let dumped = clock::monotonic_ns();
        for s in snap.iter().filter(|s| s.state == tcp::CLOSE_WAIT) {
            kernel.watch(s.cookie, 0);
        }
        kernel.set_snapshot_end(dumped);
        let still: HashSet<u64> = snapshot::dump_tcp(StateFlags::CLOSE_WAIT)
            .context("reading existing sockets (sock_diag)")?
            .into_iter()
            .map(|s| s.cookie)
            .collect();
        snap.retain(|s| s.state != tcp::CLOSE_WAIT || still.contains(&s.cookie));
    }
    Ok((SnapshotInput { ns, sockets: snap }, None))
}

/// The agent keeps an fd per cached process (`/proc/PID/mem`) besides its
/// maps, programs and the files it symbolizes: more than the usual soft
/// limit of 1024 on a busy host. The hard limit is the administrator's.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Gives the heap's free pages back to the kernel. Start-up parses the
/// kernel's BTF (tens of MiB) and may read a snapshot of 100k+ sockets,
/// then frees them; without this the freed pages stay resident for the
/// whole trace.
fn release_freed_memory() {
    // SAFETY: glibc's malloc_trim only returns free memory to the kernel.
    unsafe { libc::malloc_trim(0) };
}

fn pidfd_open(pid: u32) -> Result<OwnedFd> {
    // SAFETY: plain syscall; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("watching pid {pid} for exit"));
    }
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
