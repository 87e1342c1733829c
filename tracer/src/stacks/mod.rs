//! Captured stacks -> frames, done while the process is alive (by the time
//! a leak is reported or a recording is analysed it may be gone).
//!
//! Stacks arrive by value just ahead of their event: user stacks walked by
//! the eBPF side ([`walk`]), kernel stacks (`--kernel-stacks`) copied.
//! Each distinct content gets an id of the agent's, never reused, so no
//! cache can ever serve one stack for another. Native frames are named by
//! blazesym ([`native`]: ELF symbols, DWARF file:line, perf maps,
//! kallsyms), a JVM's Java frames by the JVM itself ([`crate::jvm`]).

mod catalog;
mod native;
mod process;
mod walk;

pub use catalog::StackCatalogue;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};

use serde::{Deserialize, Serialize};
use tracer_common::{Header, KSTACK_SENT, NO_STACK, STACKS_OFF, STACKS_SAMPLED_OUT, USTACK_WALKED};

use crate::decode::{KernelStack, WalkedStack};

/// What kind of code a frame is in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameKind {
    /// Machine code from a file (or a JVM stub): named by ELF/DWARF/perf map.
    #[default]
    Native,
    Kernel,
    /// A Java method run by HotSpot's interpreter.
    Interpreted,
    /// A Java method compiled by the JIT (C1/C2), or a native method's wrapper.
    Compiled,
    /// A Java method the JIT inlined into the compiled frame below it.
    Inlined,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    pub ip: String,
    /// Native: the function. Java: `package.Class.method(ParamTypes)`.
    pub symbol: Option<String>,
    /// The binary or library, where known.
    pub module: Option<String>,
    /// File offset of `ip` in `module`, for tools like addr2line.
    pub offset: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub kernel: bool,
    /// Recordings made before frames had a kind read as native.
    #[serde(default)]
    pub kind: FrameKind,
    /// Why this frame has no symbol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Frame {
    /// A frame that could not be named, and why.
    pub fn raw(ip: u64, kind: FrameKind, reason: String) -> Frame {
        Frame {
            ip: format!("{ip:#x}"),
            symbol: None,
            module: None,
            offset: None,
            file: None,
            line: None,
            kernel: kind == FrameKind::Kernel,
            kind,
            reason: Some(reason),
        }
    }

    pub fn is_java(&self) -> bool {
        matches!(
            self.kind,
            FrameKind::Interpreted | FrameKind::Compiled | FrameKind::Inlined
        )
    }
}

/// Identifies a captured stack: user stacks are per process, kernel stacks
/// (`pid` 0) are global.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StackKey {
    pub pid: u32,
    pub id: i32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StackInput {
    pub key: StackKey,
    pub frames: Result<Vec<Frame>, String>,
    /// Why the stack ends before its outermost frame, when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<String>,
}

/// Stacks waiting for the event they belong to (sent just after them).
const PENDING_CAP: usize = 1024;
/// Distinct stacks remembered (content -> id); cleared when full: ids are
/// never reused, so a forgotten stack is only symbolized again, under a
/// new id.
const IDS_CAP: usize = 65536;

/// Stack records by (tid, ktime_ns) of their event. Bounded: records whose
/// event never came (a counted ring-buffer drop) go first.
struct Pending<T> {
    by_event: HashMap<(u32, u64), T>,
    order: VecDeque<(u32, u64)>,
}

impl<T> Pending<T> {
    fn new() -> Self {
        Pending {
            by_event: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn insert(&mut self, h: &Header, v: T) {
        let key = (h.tid, h.ktime_ns);
        // Keys of records already taken are skipped on the way.
        while self.by_event.len() >= PENDING_CAP || self.order.len() >= 2 * PENDING_CAP {
            match self.order.pop_front() {
                Some(old) => {
                    self.by_event.remove(&old);
                }
                None => break,
            }
        }
        if self.by_event.insert(key, v).is_none() {
            self.order.push_back(key);
        }
    }

    fn take(&mut self, h: &Header) -> Option<T> {
        self.by_event.remove(&(h.tid, h.ktime_ns))
    }
}

/// Distinct stacks (pid, content hash) -> the id they were given; kernel
/// stacks under pid 0.
struct StackIds {
    by_content: HashMap<(u32, u64), i32>,
    /// The other way round, to forget by id.
    by_id: HashMap<i32, (u32, u64)>,
    next: i32,
    cap: usize,
}

impl StackIds {
    /// The id for a stack's content, and whether it is new (to be named).
    fn get(&mut self, key: (u32, u64)) -> (i32, bool) {
        if let Some(&id) = self.by_content.get(&key) {
            return (id, false);
        }
        if self.by_content.len() >= self.cap {
            self.by_content.clear();
            self.by_id.clear();
        }
        self.next = if self.next == i32::MAX { 0 } else { self.next + 1 };
        self.by_content.insert(key, self.next);
        self.by_id.insert(self.next, key);
        (self.next, true)
    }

    /// Forgets a stack: if its content comes again, it gets a new id and is
    /// named and sent again.
    fn forget(&mut self, id: i32) {
        if let Some(key) = self.by_id.remove(&id) {
            self.by_content.remove(&key);
        }
    }
}

/// Symbolizes each distinct stack once, while its process is alive, and
/// hands the result on as an input (so a recording carries it).
pub struct StackSymbolizer {
    native: native::NativeSymbolizer,
    procs: process::Processes,
    user_pending: Pending<WalkedStack>,
    kernel_pending: Pending<KernelStack>,
    ids: StackIds,
    hasher: foldhash::fast::FixedState,
}

impl StackSymbolizer {
    pub fn new(cap: usize) -> Self {
        StackSymbolizer {
            native: native::NativeSymbolizer::new(),
            procs: process::Processes::default(),
            user_pending: Pending::new(),
            kernel_pending: Pending::new(),
            ids: StackIds {
                by_content: HashMap::new(),
                by_id: HashMap::new(),
                next: 0,
                cap: IDS_CAP.min(cap),
            },
            hasher: foldhash::fast::FixedState::default(),
        }
    }

    /// Distinct stacks remembered now, and the bound.
    pub fn held(&self) -> (usize, usize) {
        (self.ids.by_content.len(), self.ids.cap)
    }

    /// Stacks the analysis no longer holds (nothing tracked refers to them).
    pub fn forget(&mut self, keys: &[StackKey]) {
        for k in keys {
            self.ids.forget(k.id);
        }
    }

    /// Whether `pid` runs a HotSpot JVM (None: the process is gone).
    pub fn runs_jvm(&mut self, pid: u32) -> Option<bool> {
        self.procs.get(pid, &[], 0).map(|c| c.jvm.is_some())
    }

    /// A user stack walked in eBPF; its event follows.
    pub fn walked(&mut self, w: WalkedStack) {
        let h = w.header;
        self.user_pending.insert(&h, w);
    }

    /// A kernel stack copied in eBPF; its event follows.
    pub fn kernel_copied(&mut self, k: KernelStack) {
        let h = k.header;
        self.kernel_pending.insert(&h, k);
    }

    /// Gives the event's stacks their ids (in `h.ustack`, `h.kstack`) and
    /// pushes inputs for those not seen yet. A stack whose record was lost
    /// keeps its `*_WALKED`/`*_SENT` marker, which says so.
    pub fn learn(&mut self, h: &mut Header, out: &mut Vec<StackInput>) {
        if h.ustack == USTACK_WALKED {
            if let Some(w) = self.user_pending.take(h) {
                h.ustack = self.user_stack(h.tgid, h.ktime_ns, &w, out);
            }
        }
        if h.kstack == KSTACK_SENT {
            if let Some(k) = self.kernel_pending.take(h) {
                h.kstack = self.kernel_stack(&k.ips, out);
            }
        }
    }

    fn kernel_stack(&mut self, ips: &[u64], out: &mut Vec<StackInput>) -> i32 {
        let (id, new) = self.ids.get((0, self.hasher.hash_one(ips)));
        if new {
            out.push(StackInput {
                key: StackKey { pid: 0, id },
                frames: Ok(self.native.kernel(ips)),
                truncated: None,
            });
        }
        id
    }

    fn user_stack(&mut self, pid: u32, captured_ns: u64, w: &WalkedStack, out: &mut Vec<StackInput>) -> i32 {
        // One look at the process serves both the identity and the naming.
        let pcs: Vec<u64> = w.frames.iter().map(|f| f.pc).collect();
        let mut ctx = self.procs.get(pid, &pcs, captured_ns);
        let key = (pid, content_hash(&self.hasher, w, ctx.as_deref_mut()));
        let (id, new) = self.ids.get(key);
        if !new {
            return id;
        }
        self.native.note_process(pid);
        let unwound = match ctx {
            Some(ctx) => walk::unwind(pid, w, ctx, &self.native),
            None => Err("the process exited before its stack was symbolized".into()),
        };
        out.push(StackInput {
            key: StackKey { pid, id },
            truncated: unwound.as_ref().ok().and_then(|u| u.truncated.clone()),
            frames: unwound.map(|u| u.frames),
        });
        id
    }
}

/// Identifies a stack by its return addresses; in a JVM also by the
/// interpreter slots of interpreted frames, since one interpreter address
/// runs every Java method. Other frames' slots are their locals and spills:
/// they would only make every capture look new (and every stack be named
/// again). Until the JVM's interpreter is located, the slots of every frame
/// in JIT code (anonymous executable memory) count.
fn content_hash(
    hasher: &foldhash::fast::FixedState,
    w: &WalkedStack,
    mut ctx: Option<&mut process::ProcessContext>,
) -> u64 {
    let frames = &w.frames;
    let mut h = hasher.build_hasher();
    w.end.hash(&mut h);
    // Of the words at sp only code addresses matter (the rest are the
    // wrapper's locals, new in every call).
    for &word in &w.sp_words {
        if ctx.as_ref().is_some_and(|c| c.exec_map(word).is_some()) {
            word.hash(&mut h);
        }
    }
    for (k, f) in frames.iter().enumerate() {
        f.pc.hash(&mut h);
        let Some(c) = ctx.as_deref_mut().filter(|_| k > 0) else {
            continue;
        };
        let owner = frames[k - 1].pc;
        let interpreted = match c.jvm().map(|j| j.is_interpreter(owner)) {
            None => false,
            Some(Some(known)) => known,
            Some(None) => c.exec_map(owner).is_none_or(|m| m.anonymous),
        };
        if interpreted {
            (f.method_slot, f.bcp_slot).hash(&mut h);
        }
    }
    h.finish()
}

/// What a failed or missing stack id means, in words.
pub fn stack_id_error(id: i32) -> String {
    match id {
        NO_STACK => "not captured for this event".into(),
        STACKS_OFF => "not captured: stacks were off (--no-stacks)".into(),
        STACKS_SAMPLED_OUT => {
            "not captured: the process opened sockets faster than its stack budget (--stack-rate); counted in stacks_sampled_out".into()
        }
        // Recordings made when kernel stacks were stack-map ids.
        x if x == -libc::EEXIST => "stack map full or hash collision: stack lost (counted in stack_errors)".into(),
        x if x == -libc::EFAULT => "stack could not be read".into(),
        x if x == -libc::ENOMEM => "stack map full: stack lost (counted in stack_errors)".into(),
        USTACK_WALKED | KSTACK_SENT => {
            "the stack sent for this event was not found (dropped while waiting for its event)".into()
        }
        x if x == -libc::ENOSPC => "no room in the ring buffer for the stack: stack lost (counted in stack_errors)".into(),
        x if x == -libc::EBUSY => {
            "the stack walk's scratch record was in use by a program this one preempted: stack lost (counted in stack_errors)".into()
        }
        x if x == -libc::ENOENT => {
            "the stack was forgotten before its socket mattered: stack lost (counted in stack_errors)".into()
        }
        x => format!("stack capture failed (errno {})", -x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forgotten stack is named and sent again under a new id when it
    /// comes back: an id is never served for other content, nor reused.
    #[test]
    fn forgotten_stacks_come_back_under_new_ids() {
        let mut ids = StackIds {
            by_content: HashMap::new(),
            by_id: HashMap::new(),
            next: 0,
            cap: 4,
        };
        let (a, new) = ids.get((7, 0xaaaa));
        assert!(new);
        assert_eq!(ids.get((7, 0xaaaa)), (a, false));
        ids.forget(a);
        let (a2, new) = ids.get((7, 0xaaaa));
        assert!(new && a2 != a, "a forgotten stack is new again, with a new id");
        // Full: forgets everything, and still never reuses an id.
        let more: Vec<i32> = (0..8).map(|i| ids.get((8, i)).0).collect();
        let mut all = more.clone();
        all.extend([a, a2]);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 10, "ids are never reused: {more:?}");
        assert!(ids.by_content.len() <= 4 && ids.by_id.len() == ids.by_content.len());
    }
}
