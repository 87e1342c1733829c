//! Tracing the kernel: `tracer live` (findings to stdout) and `tracer
//! record` (inputs to a file). Kernel events, the start-up snapshot, process
//! names, symbolized stacks and leak-time evidence become [`Input`]s; each
//! is recorded (if recording) and fed to the one [`Engine`].

use std::{
    collections::{HashMap, HashSet},
    io::{self, IsTerminal, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    task::JoinHandle,
    time::{interval, Instant, MissedTickBehavior},
};
use tracer_common::tcp;

use crate::{
    cli::TraceArgs,
    clock::{self, WallClock},
    correlate::Correlator,
    decode::{decode_record, Event, Record},
    engine::Engine,
    evidence::{self, Evidence},
    input::{EndInput, EvidenceInput, ExitInput, Input, ProcessInput, SnapshotInput, StackInput, StatsInput},
    kernel::{Kernel, LoadOptions},
    procs::{self, ProcNames},
    record::writer::{Header, HeaderOptions, Recorder, Written},
    sink::{self, Sink, Start},
    snapshot,
    stacks::StackSymbolizer,
};

/// How often the ring buffer is drained and the sweep runs. Wakeups from
/// the kernel are batched, so this bounds reporting latency.
const TICK: Duration = Duration::from_millis(100);
/// Least time between two evidence gatherings (sock_diag + /proc scan).
const EVIDENCE_EVERY: Duration = Duration::from_secs(1);
/// Most inputs queued behind an evidence gathering (about 128 bytes each).
const HOLD_CAP: usize = 1 << 18;
/// Wake the reader early once this much is waiting in the ring buffer.
const WAKEUP_FRACTION: u64 = 4;

/// Where findings go: stdout (`live`), or a file (`record`).
pub enum Output {
    Live { json: bool, events: bool },
    Record { path: PathBuf, max_size: Option<u64> },
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
        Output::Record { path, max_size } => Some(Recorder::create(path, &header(&args, wall, *max_size))?),
        Output::Live { .. } => None,
    };
    let mut kernel = Kernel::load(&LoadOptions {
        filter_tgid: args.pid,
        ring_bytes: args.ring_bytes,
        wakeup_bytes: u64::from(args.ring_bytes) / WAKEUP_FRACTION,
        watch_entries: args.watch_entries,
        reported_entries: args.reported_entries,
        kernel_stacks: args.kernel_stacks,
        user_stacks: !args.no_stacks,
        stack_rate: args.stack_rate,
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
    };
    let mut s = Session {
        engine: Engine::new(
            Correlator::new(leak_after_ns, args.pid, args.max_sockets),
            wall,
            matches!(output, Output::Live { events: true, .. }),
        ),
        sink,
        recorder,
        names: ProcNames::new(65536),
        stacks: StackSymbolizer::new(65536),
        inputs: Vec::new(),
        named: Vec::new(),
        decode_errors: 0,
        full: false,
        last_stats: None,
        last_evidence_ns: 0,
        evidence_job: None,
    };

    let snap = snapshot_inputs(&mut kernel, args.pid)?;
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
    })?;
    if let Output::Record { path, .. } = &output {
        eprintln!(
            "tracer: recording to {} ({preexisting} sockets already open); Ctrl-C to stop",
            path.display()
        );
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
    let progress_every = match output {
        Output::Record { .. } if io::stderr().is_terminal() => Duration::from_secs(1),
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
            _ = tick.tick() => {
                let r = s.drain(&mut kernel).and_then(|()| s.tick(&kernel, clock::monotonic_ns()));
                for cookie in s.engine.take_reported() {
                    kernel.mark_reported(cookie);
                }
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
        eprintln!(
            "tracer: wrote {} ({}); analyse it with `tracer report {}`",
            path.display(),
            size(r.written),
            path.display()
        );
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
    (read("/proc/sys/kernel/hostname"), read("/proc/sys/kernel/osrelease"))
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
/// between the two reads is not lost.
fn snapshot_inputs(kernel: &mut Kernel, pid: Option<u32>) -> Result<SnapshotInput> {
    // Stamped *before* reading: every event after this stamp is applied on
    // top of the snapshot (replaying a change the dump already saw is
    // harmless; ignoring one it missed would keep a closed socket alive).
    let mut ns = clock::monotonic_ns();
    let mut snap = snapshot::take(pid).context("reading existing sockets (sock_diag)")?;
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
    }
    Ok(SnapshotInput { ns, sockets: snap })
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

/// An evidence gathering running on a worker thread: a sock_diag dump and
/// a scan of every process's fds take long on a big host, and the ring
/// buffer must keep being drained meanwhile.
struct EvidenceJob {
    /// The sweep time the gathering is for.
    ns: u64,
    handle: JoinHandle<HashMap<u64, Evidence>>,
}

fn spawn_evidence(cookies: HashSet<u64>, ns: u64) -> EvidenceJob {
    let handle = tokio::task::spawn_blocking(move || {
        // Lets a test show that a slow gathering does not stop the drain.
        #[cfg(debug_assertions)]
        if let Some(ms) = std::env::var("TRACER_TEST_EVIDENCE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
        evidence::gather(&cookies)
    });
    EvidenceJob { ns, handle }
}

/// The sweep time and result of the running evidence job, when it ends.
async fn wait_evidence(job: &mut Option<EvidenceJob>) -> (u64, HashMap<u64, Evidence>) {
    let Some(j) = job.as_mut() else {
        return std::future::pending().await;
    };
    let ns = j.ns;
    let found = (&mut j.handle).await.unwrap_or_else(|e| {
        log::warn!("gathering leak evidence failed: {e}");
        HashMap::new()
    });
    *job = None;
    (ns, found)
}

struct Session {
    engine: Engine,
    sink: Box<dyn Sink>,
    recorder: Option<Recorder>,
    names: ProcNames,
    stacks: StackSymbolizer,
    /// Inputs waiting to be recorded and analysed, in order.
    inputs: Vec<Input>,
    /// Stacks named for the event being drained (reused buffer).
    named: Vec<StackInput>,
    decode_errors: u64,
    /// The recording reached its size limit.
    full: bool,
    last_stats: Option<crate::kernel::KernelStats>,
    last_evidence_ns: u64,
    evidence_job: Option<EvidenceJob>,
}

impl Session {
    /// Records and analyses the queued inputs. While evidence is being
    /// gathered they stay queued (the ring buffer is still drained): the
    /// sweep the evidence is for must come before them, exactly as if the
    /// gathering had been instant, or a leak whose owner closes it or exits
    /// meanwhile would be reported neither as a leak nor as a late close.
    fn flush_inputs(&mut self) -> io::Result<()> {
        if self.evidence_job.is_some() {
            if self.inputs.len() < HOLD_CAP {
                return Ok(());
            }
            // Waiting longer would hold too much: the leaks due are
            // reported now, without the evidence.
            let job = self.evidence_job.take().expect("checked above");
            log::warn!(
                "leak evidence took too long to gather ({} events waited): leaks reported without it",
                self.inputs.len()
            );
            self.inputs.insert(0, Input::Tick(job.ns));
        }
        for input in self.inputs.drain(..) {
            if let Some(r) = self.recorder.as_mut() {
                // Once full, only the final counters and the End record go
                // in (room is kept), so the file still ends cleanly.
                if !self.full || matches!(input, Input::End(_) | Input::Stats(_)) {
                    if let Written::Full = r.write(&input)? {
                        self.full = true;
                    }
                }
            }
            self.engine.feed(&input, self.sink.as_mut())?;
        }
        self.sink.flush()
    }

    /// Reads everything waiting in the ring buffer. No allocation per
    /// event beyond the input queue, unless `--events` prints each one.
    fn drain(&mut self, kernel: &mut Kernel) -> io::Result<()> {
        kernel.flush_logs();
        loop {
            // The item borrows the ring buffer: decode (a copy) and let go.
            let decoded = match kernel.events.next() {
                Some(item) => decode_record(&item),
                None => break,
            };
            let mut ev = match decoded {
                Ok(Record::Event(ev)) => ev,
                Ok(Record::UserStack(w)) => {
                    self.stacks.walked(w);
                    continue;
                }
                Ok(Record::KernelStack(k)) => {
                    self.stacks.kernel_copied(k);
                    continue;
                }
                Err(e) => {
                    self.decode_errors += 1;
                    if self.decode_errors == 1 {
                        log::warn!("undecodable event: {e} (counted in the summary)");
                    }
                    continue;
                }
            };
            // Owners' names and stacks are read now, while they still run.
            let owner = match &ev {
                Event::State(s) => s.oldstate == tcp::CLOSE && s.newstate == tcp::SYN_SENT,
                Event::Accept(_) => true,
                Event::Close(_) => false,
            };
            if owner {
                let pid = ev.header().tgid;
                if let Some(info) = self.names.learn(pid) {
                    self.inputs.push(Input::Process(ProcessInput { pid, info }));
                }
            }
            if owner || matches!(ev, Event::Close(_)) {
                self.stacks.learn(ev.header_mut(), &mut self.named);
                self.inputs.extend(self.named.drain(..).map(Input::Stack));
            }
            self.inputs.push(Input::Kernel(ev));
            if self.inputs.len() >= 1024 {
                self.flush_inputs()?;
            }
        }
        self.flush_inputs()
    }

    /// Time passes. Evidence for the leaks about to be reported is read
    /// first (on a worker), so it is recorded ahead of the tick that
    /// reports them.
    fn tick(&mut self, kernel: &Kernel, now: u64) -> io::Result<()> {
        self.push_stats(kernel);
        // While evidence is being gathered the clock is not advanced, so
        // due leaks wait (and are reported together, with it) instead of
        // being reported without their evidence.
        if self.evidence_job.is_some() {
            return self.flush_inputs();
        }
        let due: HashSet<u64> = self.engine.due_leaks(now).into_iter().collect();
        if !due.is_empty() {
            // At most one gathering per EVIDENCE_EVERY.
            if now.saturating_sub(self.last_evidence_ns) >= EVIDENCE_EVERY.as_nanos() as u64 {
                self.last_evidence_ns = now;
                self.evidence_job = Some(spawn_evidence(due, now));
            }
            return self.flush_inputs();
        }
        self.advance_clock(now)
    }

    /// The evidence gathered for the sweep at `ns`: recorded, then the
    /// sweep that reports those leaks, then what was drained meanwhile.
    fn evidence_done(&mut self, (ns, found): (u64, HashMap<u64, Evidence>)) -> io::Result<()> {
        let mut first = Vec::with_capacity(1);
        if !found.is_empty() {
            first.push(Input::Evidence(EvidenceInput {
                ns,
                items: found.into_iter().collect(),
            }));
        }
        self.inputs.splice(0..0, first);
        self.advance_clock_before_queued(ns)
    }

    fn advance_clock(&mut self, now: u64) -> io::Result<()> {
        self.inputs.push(Input::Tick(now));
        self.after_tick(now)
    }

    /// A tick ahead of the inputs already queued (they came after it).
    fn advance_clock_before_queued(&mut self, ns: u64) -> io::Result<()> {
        let at = self
            .inputs
            .iter()
            .take_while(|i| matches!(i, Input::Evidence(_)))
            .count();
        self.inputs.insert(at, Input::Tick(ns));
        self.after_tick(ns)
    }

    fn after_tick(&mut self, now: u64) -> io::Result<()> {
        self.flush_inputs()?;
        // Right after the tick: every stack and name fed so far has had
        // its event fed too (they come just before it).
        self.forget_unreferenced(now);
        self.flush_inputs()?;
        if let Some(r) = self.recorder.as_mut() {
            r.flush()?;
        }
        Ok(())
    }

    /// Keeps the names and stacks caches bounded: what no tracked socket
    /// refers to is forgotten by the analysis and by the producers alike,
    /// which send it again if it is needed later.
    fn forget_unreferenced(&mut self, now: u64) {
        if let Some(f) = self.engine.unreferenced(now) {
            self.stacks.forget(&f.stacks);
            self.names.forget(&f.pids);
            self.inputs.push(Input::Forget(f));
        }
    }

    /// Gathers evidence here and now: only where nothing is left to drain.
    fn push_evidence(&mut self, cookies: HashSet<u64>, now: u64) {
        if cookies.is_empty() {
            return;
        }
        let items: Vec<_> = evidence::gather(&cookies).into_iter().collect();
        if !items.is_empty() {
            self.inputs.push(Input::Evidence(EvidenceInput { ns: now, items }));
        }
    }

    /// Kernel counters, as an input only when they changed (drops must be
    /// seen promptly, and marked in a recording where they happened).
    fn push_stats(&mut self, kernel: &Kernel) {
        if let Ok(k) = kernel.stats() {
            if Some(k) != self.last_stats {
                self.last_stats = Some(k);
                self.inputs.push(Input::Stats(StatsInput {
                    ns: clock::monotonic_ns(),
                    kernel: k,
                }));
            }
        }
    }

    fn status(&mut self, kernel: &Kernel, output: &Output) -> io::Result<()> {
        self.push_stats(kernel);
        self.flush_inputs()?;
        let mut st = self.engine.status(clock::monotonic_ns());
        let (held, cap) = self.stacks.held();
        st.stacks_held = Some(held);
        st.stacks_cap = Some(cap);
        match output {
            Output::Live { .. } => self.sink.status(&st)?,
            Output::Record { .. } => {
                let written = self.recorder.as_ref().map_or(0, |r| r.written);
                let line = format!(
                    "tracer: recording: {} events, {} sockets, {} leaked now, {} ring-buffer drops, {}",
                    st.events,
                    st.sockets_tracked,
                    st.leaks_now,
                    st.ringbuf_drops,
                    size(written)
                );
                let mut err = io::stderr();
                if err.is_terminal() {
                    write!(err, "\r{line}\x1b[K")?;
                } else {
                    writeln!(err, "{line}")?;
                }
            }
        }
        self.sink.flush()
    }

    async fn finish(&mut self, kernel: &mut Kernel, reason: &'static str) -> io::Result<()> {
        // Stop the producers; let a gathering under way end (the inputs
        // queued behind it go after its sweep); then take everything the
        // producers left.
        kernel.stop();
        if self.evidence_job.is_some() {
            let found = wait_evidence(&mut self.evidence_job).await;
            self.evidence_done(found)?;
        }
        self.drain(kernel)?;
        let now = clock::monotonic_ns();
        let mut cookies: HashSet<u64> = self.engine.current_leak_cookies().into_iter().collect();
        cookies.extend(self.engine.due_leaks(now));
        self.push_evidence(cookies, now);
        self.inputs.push(Input::Tick(now));
        self.push_stats(kernel);
        self.inputs.push(Input::End(EndInput {
            ns: now,
            reason: reason.into(),
        }));
        self.flush_inputs()?;
        if let Some(r) = self.recorder.as_mut() {
            r.flush()?;
            if io::stderr().is_terminal() {
                eprintln!();
            }
        }
        let summary = self.engine.summary(reason, self.decode_errors, self.sink.as_mut())?;
        self.sink.summary(&summary)
    }
}
