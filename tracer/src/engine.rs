//! The analysis: inputs in, findings out. One code path for live tracing
//! and for recordings, so the same events give the same verdicts.

use std::{collections::HashMap, io};

use tracer_common::tcp;

use crate::{
    clock::WallClock,
    correlate::{Comm, Correlator, Endpoints, LeakReport, StackRef, Verdict},
    decode::Event,
    evidence::{Evidence, Wanted},
    findings::{self, Enrich, LeakOut, StackOut},
    input::{ForgetInput, Input, StackInput, StackKey},
    kernel::KernelStats,
    procs::ProcInfo,
    sink::{EventOut, Loss, Sink, Status, Summary, SummaryStats},
    stacks::stack_id_error,
};

/// Remembered process names, stacks and evidence beyond which those that no
/// tracked socket refers to are forgotten. What is referenced is kept (the
/// socket table's own bound, `--max-sockets`, bounds it), and the next
/// round waits until the caches have doubled, so a round costs O(1) per
/// insertion.
///
/// Names and stacks are sent once by their producer (the live agent), so
/// only the producer may decide to forget one: it then sends it again when
/// it is next needed. The live agent asks [`Engine::unreferenced`], tells
/// its producers, and feeds the decision back as an [`Input::Forget`],
/// which a recording keeps, so that a replay forgets exactly the same
/// (whatever its own `--pid` or `--leak-after`). Evidence is per socket:
/// forgotten here once its socket is gone.
const CACHE_CAP: usize = 2048;

pub struct Engine {
    corr: Correlator,
    names: HashMap<u32, ProcInfo>,
    stacks: HashMap<StackKey, StackInput>,
    evidence: HashMap<u64, Evidence>,
    verdicts: Vec<Verdict>,
    kernel_stats: KernelStats,
    print_events: bool,
    wall: WallClock,
    /// Cookies reported as leaked since the last `take_reported`.
    reported: Vec<u64>,
    start_ns: Option<u64>,
    now_ns: u64,
    /// Size of the names or stacks cache that triggers the next round of
    /// forgetting.
    cache_limit: usize,
}

impl Engine {
    pub fn new(corr: Correlator, wall: WallClock, print_events: bool) -> Self {
        Engine {
            corr,
            names: HashMap::new(),
            stacks: HashMap::new(),
            evidence: HashMap::new(),
            verdicts: Vec::new(),
            kernel_stats: KernelStats::default(),
            print_events,
            wall,
            reported: Vec::new(),
            start_ns: None,
            now_ns: 0,
            cache_limit: CACHE_CAP,
        }
    }

    /// Cookies of CLOSE_WAIT sockets that the sweep at `now_ns` will report:
    /// live tracing gathers their evidence first, so it can be recorded
    /// ahead of the tick that reports them.
    pub fn due_leaks(&self, now_ns: u64) -> Vec<u64> {
        self.corr.due(now_ns)
    }

    /// Leaks reported since the last call (live tracing tells the kernel,
    /// so their late close is captured with a stack).
    pub fn take_reported(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.reported)
    }

    /// Leaks reported and not (yet) seen closed; never fewer than there
    /// are (a leak stops counting only at its late close).
    pub fn leaks_open(&self) -> u64 {
        let st = self.corr.stats();
        st.leaks_reported.saturating_sub(st.late_closes)
    }

    /// The sockets `ids` as evidence gathering looks for them.
    pub fn evidence_wanted(&self, ids: impl IntoIterator<Item = u64>) -> Wanted {
        let mut want = Wanted::default();
        for id in ids {
            want.add(id, self.corr.socket(id).and_then(|s| s.endpoints));
        }
        want
    }

    pub fn current_leak_cookies(&self) -> Vec<u64> {
        self.corr.current_leaks(self.now_ns).iter().map(|l| l.cookie).collect()
    }

    pub fn feed(&mut self, input: &Input, sink: &mut dyn Sink) -> io::Result<()> {
        match input {
            Input::Kernel(ev) => {
                self.advance(ev.header().ktime_ns);
                if self.print_events {
                    sink.event(&self.event_out(ev))?;
                }
                self.corr.on_event(ev, &mut self.verdicts);
            }
            Input::Process(p) => {
                self.names.insert(p.pid, p.info.clone());
            }
            Input::Stack(s) => {
                self.stacks.insert(s.key, s.clone());
            }
            Input::Snapshot(s) => {
                self.advance(s.ns);
                self.corr.reserve_snapshot(s.sockets.len());
                for sock in &s.sockets {
                    self.corr.on_snapshot(sock, s.ns);
                }
            }
            Input::Evidence(e) => {
                self.evidence.extend(e.items.iter().cloned());
            }
            Input::Tick(ns) => {
                self.advance(*ns);
                self.corr.sweep(*ns, &mut self.verdicts);
                self.emit(sink)?;
                self.forget_evidence();
            }
            Input::Stats(s) => {
                self.advance(s.ns);
                let before = self.kernel_stats;
                self.kernel_stats = s.kernel;
                let k = s.kernel;
                if k.lost_more_than(&before) {
                    sink.loss(&Loss {
                        time: self.wall.format(s.ns),
                        kernel: k,
                        new_ringbuf_drops: k.ringbuf_drops.saturating_sub(before.ringbuf_drops),
                    })?;
                }
            }
            Input::ProcessExit(e) => {
                self.advance(e.ns);
                self.emit(sink)?;
                sink.process_exit(e.pid)?;
            }
            Input::End(e) => self.advance(e.ns),
            Input::Forget(f) => self.forget(f),
        }
        self.emit(sink)
    }

    fn advance(&mut self, ns: u64) {
        self.start_ns.get_or_insert(ns);
        self.now_ns = self.now_ns.max(ns);
    }

    fn emit(&mut self, sink: &mut dyn Sink) -> io::Result<()> {
        if self.verdicts.is_empty() {
            return Ok(());
        }
        let verdicts = std::mem::take(&mut self.verdicts);
        for v in &verdicts {
            match v {
                Verdict::Leak(l) => {
                    self.reported.push(l.cookie);
                    sink.leak(&self.leak_out(l))?
                }
                Verdict::LateClose {
                    leak,
                    closed_after_ns,
                    aborted,
                } => sink.late_close(&self.leak_out(leak), closed_after_ns / 1_000_000, *aborted)?,
            }
        }
        self.verdicts = verdicts;
        self.verdicts.clear();
        Ok(())
    }

    fn leak_out(&self, l: &LeakReport) -> LeakOut {
        LeakOut::new(
            l,
            &Enrich {
                names: &self.names,
                evidence: &self.evidence,
                stacks: &|r| self.frames(r),
            },
        )
    }

    /// User frames then kernel frames, why there is no user stack, and why
    /// the user stack is cut short.
    fn frames(&self, r: Option<StackRef>) -> StackOut {
        let Some(r) = r else {
            return StackOut {
                error: Some("the socket predates the tracer".into()),
                ..StackOut::default()
            };
        };
        let get = |key: StackKey| -> Result<&StackInput, String> {
            if key.id < 0 {
                return Err(stack_id_error(key.id));
            }
            self.stacks.get(&key).ok_or_else(|| "stack was not recorded".into())
        };
        let mut out = StackOut::default();
        match get(StackKey {
            pid: r.pid,
            id: r.ustack,
        }) {
            Ok(s) => match &s.frames {
                Ok(f) => {
                    out.frames.extend(f.iter().cloned());
                    out.truncated = s.truncated.clone();
                }
                Err(e) => out.error = Some(e.clone()),
            },
            Err(e) => out.error = Some(e),
        }
        if let Ok(Ok(f)) = get(StackKey { pid: 0, id: r.kstack }).map(|s| &s.frames) {
            out.frames.extend(f.iter().cloned());
        }
        out
    }

    /// Where things stand at `now_ns` (the agent's clock: the analysis may
    /// be behind it while inputs wait for evidence).
    pub fn status(&self, now_ns: u64) -> Status {
        let stats = self.corr.stats();
        let now_ns = now_ns.max(self.now_ns);
        Status {
            time: self.wall.format(now_ns),
            uptime_ms: now_ns.saturating_sub(self.start_ns.unwrap_or(now_ns)) / 1_000_000,
            events: stats.events,
            sockets_tracked: stats.sockets_tracked,
            leaks_now: self.corr.current_leaks(now_ns).len(),
            ringbuf_drops: self.kernel_stats.ringbuf_drops,
            stacks_held: None,
            stacks_cap: None,
        }
    }

    /// Final sweep and the summary.
    pub fn summary(&mut self, reason: &'static str, decode_errors: u64, sink: &mut dyn Sink) -> io::Result<Summary> {
        let now = self.now_ns;
        self.corr.sweep(now, &mut self.verdicts);
        self.emit(sink)?;
        let leaks: Vec<LeakOut> = self.corr.current_leaks(now).iter().map(|l| self.leak_out(l)).collect();
        Ok(Summary {
            duration_ms: now.saturating_sub(self.start_ns.unwrap_or(now)) / 1_000_000,
            recording: None,
            reason,
            groups: findings::group(&leaks),
            leaks,
            stats: SummaryStats {
                kernel: self.kernel_stats,
                agent: self.corr.stats(),
                decode_errors,
                delivered: None,
            },
        })
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

impl Engine {
    /// Names and stacks no tracked socket refers to, once the caches have
    /// reached their limit; to be forgotten by their producer and then
    /// here ([`Engine::forget`]). Only between ticks: every stack and name
    /// fed has had its event fed too (they come just before it), so the
    /// references are complete.
    pub fn unreferenced(&mut self, ns: u64) -> Option<ForgetInput> {
        if self.names.len().max(self.stacks.len()) < self.cache_limit {
            return None;
        }
        let refs = self.corr.references();
        let pids: Vec<u32> = self.names.keys().filter(|p| !refs.pids.contains(p)).copied().collect();
        let stacks: Vec<StackKey> = self
            .stacks
            .keys()
            .filter(|k| !refs.stacks.contains(&(k.pid, k.id)))
            .copied()
            .collect();
        let left = (self.names.len() - pids.len()).max(self.stacks.len() - stacks.len());
        self.cache_limit = CACHE_CAP.max(2 * left);
        Some(ForgetInput { ns, pids, stacks })
    }

    fn forget(&mut self, f: &ForgetInput) {
        for pid in &f.pids {
            self.names.remove(pid);
        }
        for key in &f.stacks {
            self.stacks.remove(key);
        }
    }

    /// Evidence of sockets that are gone, once there is much of it.
    fn forget_evidence(&mut self) {
        if self.evidence.len() < CACHE_CAP {
            return;
        }
        let refs = self.corr.references();
        self.evidence.retain(|cookie, _| refs.cookies.contains(cookie));
    }

    /// Entries in the names and stacks caches.
    #[cfg(test)]
    pub fn cached(&self) -> (usize, usize) {
        (self.names.len(), self.stacks.len())
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
