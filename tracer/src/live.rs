//! `tracer live`: kernel events and the start-up snapshot feed the
//! correlator; a clock drives the sweep; verdicts go to a sink.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    time::{interval, Instant, MissedTickBehavior},
};
use tracer_common::tcp;

use crate::{
    cli::LiveArgs,
    clock::{self, WallClock},
    correlate::{Comm, Correlator, Endpoints, LeakReport, StackRef, Verdict},
    decode::{decode, Event},
    evidence,
    kernel::{Kernel, LoadOptions},
    procs::{self, ProcCache},
    report::{self, Enrich, LeakOut},
    sink::{self, EventOut, Sink, Start, Status, Summary, SummaryStats},
    snapshot,
    stacks::StackStore,
};

/// How often the ring buffer is drained and the sweep runs. Wakeups from
/// the kernel are batched, so this bounds reporting latency.
const TICK: Duration = Duration::from_millis(100);
/// Wake the reader early once this much is waiting in the ring buffer.
const WAKEUP_FRACTION: u64 = 4;

struct RawFdRef(RawFd);
impl AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

pub async fn run(args: LiveArgs) -> Result<()> {
    if let Some(pid) = args.pid {
        if !procs::exists(pid) {
            bail!("no process with pid {pid} (check the number with `ps -p {pid}`)");
        }
    }
    crate::kernel::check_privileges()?;
    let wall = WallClock::now();
    let mut kernel = Kernel::load(&LoadOptions {
        filter_tgid: args.pid,
        ring_bytes: args.ring_bytes,
        wakeup_bytes: u64::from(args.ring_bytes) / WAKEUP_FRACTION,
        stack_entries: args.stack_entries,
    })?;
    // Open the pidfd before the snapshot so an exit in between is not lost.
    let pidfd = args.pid.map(pidfd_open).transpose()?;

    let leak_after_ns = args.leak_after.as_nanos() as u64;
    let mut corr = Correlator::new(leak_after_ns, args.pid, args.max_sockets);
    let preexisting = seed_from_snapshot(&mut kernel, &mut corr, args.pid)?;

    let stdout = io::stdout().lock();
    let mut sink: Box<dyn Sink> = if args.json {
        Box::new(sink::JsonSink::new(io::BufWriter::new(stdout)))
    } else {
        Box::new(sink::TextSink::new(io::BufWriter::new(stdout), io::stderr()))
    };
    let start_ns = clock::monotonic_ns();
    sink.start(&Start {
        hooks: kernel.hooks.clone(),
        filter_pid: args.pid,
        leak_after_ms: leak_after_ns / 1_000_000,
        preexisting_sockets: preexisting,
    })?;

    let mut live = Live {
        corr,
        procs: ProcCache::new(4096),
        stacks: StackStore::new(16384),
        verdicts: Vec::new(),
        decode_errors: 0,
        events: args.events,
        wall,
    };

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
    let mut status_tick = interval(args.status_interval);
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
                live.drain(&mut kernel, sink.as_mut())
            }
            _ = tick.tick() => {
                live.drain(&mut kernel, sink.as_mut())
                    .and_then(|()| live.sweep(&kernel, clock::monotonic_ns(), sink.as_mut()))
            }
            _ = status_tick.tick() => {
                live.status(&kernel, start_ns, sink.as_mut())
            }
            _ = &mut until_deadline => break "duration",
            _ = sigint.recv() => break "signal",
            _ = sigterm.recv() => break "signal",
            _ = &mut process_exited => {
                // Let the exit's own closes arrive before concluding.
                tokio::time::sleep(TICK).await;
                let r = live.drain(&mut kernel, sink.as_mut());
                if let Err(e) = r { break output_error(e)?; }
                sink.process_exit(args.pid.expect("pidfd implies --pid"))?;
                break "process_exit";
            }
        };
        if let Err(e) = result {
            break output_error(e)?;
        }
    };

    if reason != "output_closed" {
        live.drain(&mut kernel, sink.as_mut())
            .or_else(|e| output_error(e).map(|_| ()))?;
        let now = clock::monotonic_ns();
        live.sweep(&kernel, now, sink.as_mut())
            .or_else(|e| output_error(e).map(|_| ()))?;
        let leaks = live.leak_outs(&kernel, &live.corr.current_leaks(now));
        let summary = Summary {
            duration_ms: now.saturating_sub(start_ns) / 1_000_000,
            reason,
            groups: report::group(&leaks),
            leaks,
            stats: SummaryStats {
                kernel: kernel.stats()?,
                agent: live.corr.stats(),
                decode_errors: live.decode_errors,
            },
        };
        sink.summary(&summary).or_else(|e| output_error(e).map(|_| ()))?;
    }
    Ok(())
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

/// Feeds the correlator the sockets that exist now. With `--pid`, they are
/// also added to the kernel's watch list, and read a second time so that a
/// state change between the two reads is not lost.
fn seed_from_snapshot(kernel: &mut Kernel, corr: &mut Correlator, pid: Option<u32>) -> Result<usize> {
    let mut snap = snapshot::take(pid).context("reading existing sockets (sock_diag)")?;
    if let Some(pid) = pid {
        for s in &snap {
            kernel.watch(s.cookie, pid)?;
        }
        let watched: std::collections::HashSet<u64> = snap.iter().map(|s| s.cookie).collect();
        snap = snapshot::take(Some(pid))?
            .into_iter()
            .filter(|s| watched.contains(&s.cookie))
            .collect();
    }
    let now = clock::monotonic_ns();
    for s in &snap {
        corr.on_snapshot(s, now);
    }
    Ok(snap.len())
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

struct Live {
    corr: Correlator,
    procs: ProcCache,
    stacks: StackStore,
    verdicts: Vec<Verdict>,
    decode_errors: u64,
    events: bool,
    wall: WallClock,
}

impl Live {
    /// Reads everything waiting in the ring buffer. No allocation per
    /// event unless `--events` asked for every event to be printed.
    fn drain(&mut self, kernel: &mut Kernel, sink: &mut dyn Sink) -> io::Result<()> {
        kernel.flush_logs();
        loop {
            // The item borrows the ring buffer: decode (a copy) and let go.
            let decoded = match kernel.events.next() {
                Some(item) => decode(&item),
                None => break,
            };
            let ev = match decoded {
                Ok(ev) => ev,
                Err(e) => {
                    self.decode_errors += 1;
                    if self.decode_errors == 1 {
                        log::warn!("undecodable event: {e} (counted in the summary)");
                    }
                    continue;
                }
            };
            // Owners' command lines and stacks are read now, while the
            // processes still run.
            match &ev {
                Event::State(s) if s.oldstate == tcp::CLOSE && s.newstate == tcp::SYN_SENT => {
                    self.procs.learn(s.header.tgid);
                    self.stacks.learn(kernel, StackRef::of(&s.header));
                }
                Event::Accept(f) => {
                    self.procs.learn(f.header.tgid);
                    self.stacks.learn(kernel, StackRef::of(&f.header));
                }
                Event::Close(f) => self.stacks.learn(kernel, StackRef::of(&f.header)),
                Event::State(_) => {}
            }
            if self.events {
                sink.event(&self.event_out(&ev))?;
            }
            self.corr.on_event(&ev, &mut self.verdicts);
            self.emit(kernel, sink)?;
        }
        sink.flush()
    }

    fn sweep(&mut self, kernel: &Kernel, now_ns: u64, sink: &mut dyn Sink) -> io::Result<()> {
        self.corr.sweep(now_ns, &mut self.verdicts);
        self.emit(kernel, sink)?;
        sink.flush()
    }

    /// User-facing views of `leaks`, with evidence read from the kernel now.
    fn leak_outs(&mut self, kernel: &Kernel, leaks: &[LeakReport]) -> Vec<LeakOut> {
        let cookies = leaks.iter().map(|l| l.cookie).collect();
        let evidence = evidence::gather(&cookies, &mut self.procs);
        let mut e = Enrich {
            procs: &mut self.procs,
            stacks: &mut self.stacks,
            kernel,
            evidence: &evidence,
        };
        leaks.iter().map(|l| LeakOut::new(l, &mut e)).collect()
    }

    fn emit(&mut self, kernel: &Kernel, sink: &mut dyn Sink) -> io::Result<()> {
        if self.verdicts.is_empty() {
            return Ok(());
        }
        let verdicts = std::mem::take(&mut self.verdicts);
        // Evidence for all new leaks of this batch in one pass.
        let new_leaks: Vec<LeakReport> = verdicts
            .iter()
            .filter_map(|v| match v {
                Verdict::Leak(l) => Some(l.clone()),
                Verdict::LateClose { .. } => None,
            })
            .collect();
        let mut outs = self.leak_outs(kernel, &new_leaks).into_iter();
        let no_evidence = std::collections::HashMap::new();
        for v in &verdicts {
            match v {
                Verdict::Leak(_) => sink.leak(&outs.next().expect("one view per leak"))?,
                Verdict::LateClose {
                    leak,
                    closed_after_ns,
                    aborted,
                } => {
                    let mut e = Enrich {
                        procs: &mut self.procs,
                        stacks: &mut self.stacks,
                        kernel,
                        evidence: &no_evidence,
                    };
                    sink.late_close(&LeakOut::new(leak, &mut e), closed_after_ns / 1_000_000, *aborted)?
                }
            }
        }
        self.verdicts = verdicts;
        self.verdicts.clear();
        Ok(())
    }

    fn status(&mut self, kernel: &Kernel, start_ns: u64, sink: &mut dyn Sink) -> io::Result<()> {
        let now = clock::monotonic_ns();
        let stats = self.corr.stats();
        sink.status(&Status {
            time: self.wall.format(now),
            uptime_ms: now.saturating_sub(start_ns) / 1_000_000,
            events: stats.events,
            sockets_tracked: stats.sockets_tracked,
            leaks_now: self.corr.current_leaks(now).len(),
            ringbuf_drops: kernel.stats().map(|k| k.ringbuf_drops).unwrap_or(0),
        })?;
        sink.flush()
    }

    fn event_out(&self, ev: &Event) -> EventOut {
        let h = ev.header();
        let mut out = EventOut {
            time: self.wall.format(h.ktime_ns),
            kind: "state",
            cookie: h.cookie,
            task_pid: h.tgid,
            task_tid: h.tid,
            task_comm: Comm(h.comm).as_str().into_owned(),
            old_state: None,
            new_state: None,
            local: None,
            remote: None,
            fd: None,
        };
        match ev {
            Event::State(s) => {
                let ep = Endpoints::from_event(s);
                out.old_state = Some(tcp::name(s.oldstate));
                out.new_state = Some(tcp::name(s.newstate));
                out.local = Some(ep.local.to_string());
                out.remote = Some(ep.remote.to_string());
            }
            Event::Accept(f) => {
                out.kind = "accept";
                out.fd = Some(f.fd);
            }
            Event::Close(f) => {
                out.kind = "close";
                out.fd = Some(f.fd);
            }
        }
        out
    }
}
