//! One tracing session: the ring buffer drained into inputs, which are
//! recorded and fed to the engine, in order.

use std::{
    collections::{HashMap, HashSet},
    io::{self, IsTerminal, Write},
};

use tracer_common::STACK_CATALOGUED;

use super::{
    evidence_job::{spawn_evidence, wait_evidence, EvidenceJob},
    size, Output, EVIDENCE_EVERY, HOLD_CAP,
};
use crate::{
    clock,
    decode::{decode_record, Event, Record},
    engine::Engine,
    evidence::{self, Evidence, Wanted},
    input::{EndInput, EvidenceInput, Input, ProcessInput, StackInput, StatsInput},
    kernel::Kernel,
    procs::ProcNames,
    record::writer::{Recorder, Written},
    sink::Sink,
    stacks::{StackCatalogue, StackSymbolizer},
};

pub(super) struct Session {
    pub(super) engine: Engine,
    pub(super) sink: Box<dyn Sink>,
    pub(super) recorder: Option<Recorder>,
    pub(super) names: ProcNames,
    stacks: StackSymbolizer,
    /// With sockets followed in the kernel: the stacks their records refer
    /// to, the sockets read from the CLOSE_WAIT map (until they leave it),
    /// and the age at which they are read.
    pub(super) catalogue: StackCatalogue,
    pub(super) promoted: HashSet<u64>,
    /// Processes the kernel side was told run no JVM; checked now and then,
    /// and unmarked once gone.
    pub(super) native: HashSet<u32>,
    pub(super) native_checked_ns: u64,
    follow: Option<u64>,
    /// Inputs waiting to be recorded and analysed, in order.
    pub(super) inputs: Vec<Input>,
    /// Stacks named for the event being drained (reused buffer).
    pub(super) named: Vec<StackInput>,
    decode_errors: u64,
    /// Event records received from the ring buffer (delivered).
    delivered: u64,
    /// The recording reached its size limit.
    pub(super) full: bool,
    last_stats: Option<crate::kernel::KernelStats>,
    last_evidence_ns: u64,
    pub(super) evidence_job: Option<EvidenceJob>,
}

impl Session {
    /// `follow`: sockets are followed in the kernel, and read from its
    /// CLOSE_WAIT map once they have been there that long.
    pub(super) fn new(engine: Engine, sink: Box<dyn Sink>, recorder: Option<Recorder>, follow: Option<u64>) -> Self {
        Session {
            engine,
            sink,
            recorder,
            names: ProcNames::new(65536),
            stacks: StackSymbolizer::new(65536),
            catalogue: StackCatalogue::default(),
            promoted: HashSet::new(),
            native: HashSet::new(),
            native_checked_ns: 0,
            follow,
            inputs: Vec::new(),
            named: Vec::new(),
            decode_errors: 0,
            delivered: 0,
            full: false,
            last_stats: None,
            last_evidence_ns: 0,
            evidence_job: None,
        }
    }

    /// Records and analyses the queued inputs. While evidence is being
    /// gathered they stay queued (the ring buffer is still drained): the
    /// sweep the evidence is for must come before them, exactly as if the
    /// gathering had been instant, or a leak whose owner closes it or exits
    /// meanwhile would be reported neither as a leak nor as a late close.
    pub(super) fn flush_inputs(&mut self) -> io::Result<()> {
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
    pub(super) fn drain(&mut self, kernel: &mut Kernel) -> io::Result<()> {
        kernel.flush_logs();
        loop {
            // The item borrows the ring buffer: decode (a copy) and let go.
            let decoded = match kernel.events.next() {
                Some(item) => decode_record(&item),
                None => break,
            };
            let mut ev = match decoded {
                Ok(Record::Event(ev)) => ev,
                Ok(Record::UserStack(w)) if w.header.ustack == STACK_CATALOGUED => {
                    let pid = w.header.tgid;
                    if self.catalogue.user(w, &mut self.stacks) {
                        kernel.mark_native(pid, true);
                        self.native.insert(pid);
                    }
                    continue;
                }
                Ok(Record::KernelStack(k)) if k.header.ustack == STACK_CATALOGUED => {
                    self.catalogue.kernel(k, &mut self.stacks);
                    continue;
                }
                Ok(Record::UserStack(w)) => {
                    self.stacks.walked(w);
                    continue;
                }
                Ok(Record::KernelStack(k)) => {
                    self.stacks.kernel_copied(k);
                    continue;
                }
                Ok(Record::CloseWait(change)) => {
                    self.delivered += 1;
                    self.promote(kernel, &change);
                    self.promoted.insert(change.header.cookie);
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
            self.delivered += 1;
            // Owners' names and stacks are read now, while they still run.
            let owner = ev.opens_socket();
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
    pub(super) fn tick(&mut self, kernel: &mut Kernel, now: u64) -> io::Result<()> {
        self.push_stats(kernel);
        // Followed sockets that stay in CLOSE_WAIT are read even while
        // evidence is gathered (their inputs wait in line with the rest):
        // one that stays past the threshold and closes meanwhile is then
        // still known, a leak and its late close.
        if let Some(promote_ns) = self.follow {
            self.read_close_wait(kernel, now, promote_ns);
        }
        // While evidence is being gathered the clock is not advanced, so
        // due leaks wait (and are reported together, with it) instead of
        // being reported without their evidence.
        if self.evidence_job.is_some() {
            return self.flush_inputs();
        }
        if self.follow.is_some() {
            // Fed now, so that those already due get their evidence.
            self.flush_inputs()?;
        }
        let due = self.engine.evidence_wanted(self.engine.due_leaks(now));
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
    /// sweep that reports those leaks, both ahead of what was drained
    /// meanwhile (it came after them).
    pub(super) fn evidence_done(&mut self, (ns, found): (u64, HashMap<u64, Evidence>)) -> io::Result<()> {
        let mut first = Vec::with_capacity(2);
        if !found.is_empty() {
            first.push(Input::Evidence(EvidenceInput {
                ns,
                items: found.into_iter().collect(),
            }));
        }
        first.push(Input::Tick(ns));
        self.inputs.splice(0..0, first);
        self.after_tick(ns)
    }

    fn advance_clock(&mut self, now: u64) -> io::Result<()> {
        self.inputs.push(Input::Tick(now));
        self.after_tick(now)
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
    fn push_evidence(&mut self, want: Wanted, now: u64) {
        if want.is_empty() {
            return;
        }
        let items: Vec<_> = evidence::gather(&want).into_iter().collect();
        if !items.is_empty() {
            self.inputs.push(Input::Evidence(EvidenceInput { ns: now, items }));
        }
    }

    /// Kernel counters, as an input only when they changed (drops must be
    /// seen promptly, and marked in a recording where they happened).
    fn push_stats(&mut self, kernel: &Kernel) {
        if let Ok(mut k) = kernel.stats() {
            // Agent-side losses of the same kind.
            k.stack_errors += self.catalogue.misses;
            if Some(k) != self.last_stats {
                self.last_stats = Some(k);
                self.inputs.push(Input::Stats(StatsInput {
                    ns: clock::monotonic_ns(),
                    kernel: k,
                }));
            }
        }
    }

    pub(super) fn status(&mut self, kernel: &Kernel, output: &Output) -> io::Result<()> {
        self.push_stats(kernel);
        self.flush_inputs()?;
        let mut st = self.engine.status(clock::monotonic_ns());
        let (held, cap) = self.stacks.held();
        st.stacks_held = Some(held);
        st.stacks_cap = Some(cap);
        match output {
            Output::Live { .. } | Output::Daemon { .. } => self.sink.status(&st)?,
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

    pub(super) async fn finish(&mut self, kernel: &mut Kernel, reason: &'static str) -> io::Result<()> {
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
        if let Some(promote_ns) = self.follow {
            self.read_close_wait(kernel, now, promote_ns);
        }
        let mut ids: HashSet<u64> = self.engine.current_leak_cookies().into_iter().collect();
        ids.extend(self.engine.due_leaks(now));
        let want = self.engine.evidence_wanted(ids);
        self.push_evidence(want, now);
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
        let mut summary = self.engine.summary(reason, self.decode_errors, self.sink.as_mut())?;
        summary.stats.delivered = Some(self.delivered);
        self.sink.summary(&summary)
    }
}
