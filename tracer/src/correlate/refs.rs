//! What the tracked sockets refer to: the owners, stacks and evidence that
//! their verdicts (a leak, a late close, the summary) will show. The
//! engine's caches keep these and may forget everything else.

use std::collections::HashSet;

use super::{Correlator, StackRef};

#[derive(Default)]
pub struct References {
    pub pids: HashSet<u32>,
    /// (pid, id) of user stacks, (0, id) of kernel stacks.
    pub stacks: HashSet<(u32, i32)>,
    pub cookies: HashSet<u64>,
}

impl References {
    fn add_stack(&mut self, r: &StackRef) {
        self.stacks.insert((r.pid, r.ustack));
        self.stacks.insert((0, r.kstack));
    }
}

impl Correlator {
    pub fn references(&self) -> References {
        let mut refs = References::default();
        for s in self.table.sockets.values() {
            refs.cookies.insert(s.cookie);
            if let Some(o) = &s.owner {
                refs.pids.insert(o.pid);
            }
            if let Some(r) = &s.open_stack {
                refs.add_stack(r);
            }
            if let Some(c) = &s.last_close {
                refs.pids.insert(c.pid);
                refs.add_stack(&c.stack);
            }
        }
        refs.pids.extend(self.table.quiet_holders());
        refs
    }
}
