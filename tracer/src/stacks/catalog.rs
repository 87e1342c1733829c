//! Stacks of sockets followed in the kernel (default `live`). The kernel
//! side sends each distinct stack content once per process, when it is
//! taken (the process may be gone when its socket matters), and the
//! socket's record keeps the content key. Named at once, like any stack;
//! looked up by key when a socket is read.

use std::collections::HashMap;

use tracer_common::{Header, StacksTaken, KSTACK_SENT, NO_STACK, STACK_CATALOGUED, USTACK_WALKED};

use super::{StackInput, StackSymbolizer};
use crate::decode::{KernelStack, WalkedStack};

/// Distinct (process, content key) pairs held. Beyond it the catalogue is
/// emptied, and the kernel side told to send every stack again.
const CATALOGUE_CAP: usize = 16384;

#[derive(Default)]
pub struct StackCatalogue {
    /// (pid, kernel content key) -> the symbolizer's id; pid 0 for kernel
    /// stacks.
    ids: HashMap<(u32, u64), i32>,
    /// The named stacks, by (pid, id).
    named: HashMap<(u32, i32), StackInput>,
    /// Keys a socket referred to that were not here (counted as lost).
    pub misses: u64,
    seen: std::collections::HashSet<u32>,
}

impl StackCatalogue {
    /// Whether the catalogue is full and must be emptied (with the
    /// kernel's list of what it holds) before the next stack.
    pub fn full(&self) -> bool {
        self.ids.len() >= CATALOGUE_CAP
    }

    pub fn clear(&mut self) {
        self.ids.clear();
        self.named.clear();
        // Bounded with the rest (a process seen again is only looked at
        // again: marking one that runs no JVM twice is harmless).
        self.seen.clear();
    }

    /// A user stack sent to the catalogue: named now, while its process is
    /// alive. Returns whether its process, seen for the first time, runs
    /// no JVM (the kernel side can then key its stacks by their return
    /// addresses alone).
    pub fn user(&mut self, w: WalkedStack, sym: &mut StackSymbolizer) -> bool {
        let pid = w.header.tgid;
        let key = (pid, w.header.skaddr);
        let mut h = w.header;
        h.ustack = USTACK_WALKED;
        h.kstack = NO_STACK;
        sym.walked(w);
        self.learn(key, h, sym, |h| h.ustack);
        if !self.seen.insert(pid) {
            return false;
        }
        sym.runs_jvm(pid) == Some(false)
    }

    /// Processes whose first stack was seen, until they are forgotten.
    pub fn forget_process(&mut self, pid: u32) {
        self.seen.remove(&pid);
    }

    /// A kernel stack sent to the catalogue.
    pub fn kernel(&mut self, k: KernelStack, sym: &mut StackSymbolizer) {
        let key = (0, k.header.skaddr);
        let mut h = k.header;
        h.ustack = NO_STACK;
        h.kstack = KSTACK_SENT;
        sym.kernel_copied(k);
        self.learn(key, h, sym, |h| h.kstack);
    }

    fn learn(&mut self, key: (u32, u64), mut h: Header, sym: &mut StackSymbolizer, id_of: impl Fn(&Header) -> i32) {
        let mut named = Vec::new();
        sym.learn(&mut h, &mut named);
        let id = id_of(&h);
        for input in named {
            self.named.insert((input.key.pid, input.key.id), input);
        }
        if id >= 0 {
            self.ids.insert(key, id);
        }
    }

    /// The ids for a socket record's stacks (into `h.ustack`/`h.kstack`),
    /// and their named stacks, to be fed just before its event.
    pub fn resolve(&mut self, pid: u32, taken: &StacksTaken, h: &mut Header, out: &mut Vec<StackInput>) {
        h.ustack = self.one(pid, taken.ustack, taken.ukey, out);
        h.kstack = self.one(0, taken.kstack, taken.kkey, out);
    }

    fn one(&mut self, pid: u32, status: i32, key: u64, out: &mut Vec<StackInput>) -> i32 {
        if status != STACK_CATALOGUED {
            return status;
        }
        let Some(&id) = self.ids.get(&(pid, key)) else {
            self.misses += 1;
            return -libc::ENOENT;
        };
        if let Some(input) = self.named.get(&(pid, id)) {
            out.push(input.clone());
        }
        id
    }
}
