//! The kernel's table of followed sockets (default `live`; tracer-ebpf's
//! `socks`), as the agent reads it: a socket's opener from its slot (or
//! the overflow hash map), and the last close of a shared fd to it.

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap, MapData},
    Ebpf,
};
use tracer_common::{group_slots, sock_slot_home, SockRecord, Touch, SHARED_CLOSE};

pub(super) struct SocketTable {
    keys: Array<MapData, u64>,
    records: Array<MapData, SockRecord>,
    mask: u32,
    overflow: HashMap<MapData, u64, SockRecord>,
    shared_closes: HashMap<MapData, u64, Touch>,
}

impl SocketTable {
    /// Takes the table's maps from the loaded object; `mask`: its slots
    /// less one.
    pub fn take(ebpf: &mut Ebpf, mask: u32) -> Result<Self> {
        Ok(Self {
            keys: Array::try_from(ebpf.take_map("SOCK_KEYS").context("SOCK_KEYS map")?)?,
            records: Array::try_from(ebpf.take_map("SOCK_RECORDS").context("SOCK_RECORDS map")?)?,
            mask,
            overflow: HashMap::try_from(ebpf.take_map("SOCKS").context("SOCKS map")?)?,
            shared_closes: HashMap::try_from(ebpf.take_map("SHARED_CLOSES").context("SHARED_CLOSES map")?)?,
        })
    }

    /// What the kernel side keeps of a followed socket: its opener, and the
    /// last close of an fd to it that left it open.
    pub fn record(&self, skaddr: u64) -> (Option<SockRecord>, Option<Touch>) {
        let Some(r) = self.slot(skaddr).or_else(|| self.overflow.get(&skaddr, 0).ok()) else {
            return (None, None);
        };
        let close = (r.flags & SHARED_CLOSE != 0)
            .then(|| self.shared_closes.get(&skaddr, 0).ok())
            .flatten();
        (Some(r), close)
    }

    /// A socket's record in its slot, read between two reads of its key and
    /// read twice: a slot that changed meanwhile (the socket went, another
    /// took the slot) is not taken.
    fn slot(&self, skaddr: u64) -> Option<SockRecord> {
        group_slots(sock_slot_home(skaddr, self.mask), self.mask).find_map(|idx| {
            self.keys.get(&idx, 0).ok().filter(|&k| k == skaddr)?;
            let first = self.records.get(&idx, 0).ok()?;
            let again = self.records.get(&idx, 0).ok()?;
            self.keys.get(&idx, 0).ok().filter(|&k| k == skaddr)?;
            (again == first).then_some(first)
        })
    }
}
