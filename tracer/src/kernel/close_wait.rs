//! The kernel's table of followed sockets now in CLOSE_WAIT (default
//! `live`; tracer-ebpf's `close_wait`), as the agent reads it: the slots'
//! keys mapped into its memory, scanned without a system call, and a
//! socket's change into CLOSE_WAIT read from its slot. Before Linux 5.12
//! the table is a hash map.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use tracer_common::{close_wait_home, group_slots, StateEvent};

/// `CW_KEYS` in this process's memory.
pub(super) struct MappedKeys {
    /// Keeps the map alive while it is mapped.
    _map: MapData,
    keys: *const u64,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is read-only here and lives as long as the value; the
// kernel side writes it concurrently, which `key` reads volatile.
unsafe impl Send for MappedKeys {}

impl MappedKeys {
    fn new(map: MapData, len: usize) -> Result<Self> {
        let bytes = (len * 8).next_multiple_of(page_size());
        // SAFETY: a fresh shared read-only mapping of the map's values;
        // checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the CLOSE_WAIT table's keys");
        }
        Ok(Self {
            _map: map,
            keys: ptr as *const u64,
            len,
            bytes,
        })
    }

    fn key(&self, index: usize) -> u64 {
        debug_assert!(index < self.len);
        // SAFETY: inside the mapping; the kernel side writes keys whole
        // (8-byte aligned stores and compare-and-swaps).
        unsafe { std::ptr::read_volatile(self.keys.add(index)) }
    }
}

impl Drop for MappedKeys {
    fn drop(&mut self) {
        // SAFETY: mapped in `new`, not referenced after this.
        unsafe { libc::munmap(self.keys as *mut libc::c_void, self.bytes) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

pub(super) enum CloseWaitTable {
    Slots {
        keys: MappedKeys,
        changes: Array<MapData, StateEvent>,
        mask: u32,
    },
    Hash(HashMap<MapData, u64, StateEvent>),
}

impl CloseWaitTable {
    /// From the loaded maps: `slots` says which table the kernel side uses
    /// (`CW_KEYS` holds `mask + 1` entries then).
    pub fn new(keys: Map, changes: Map, hash: Map, slots: bool, mask: u32) -> Result<Self> {
        if !slots {
            return Ok(Self::Hash(HashMap::try_from(hash)?));
        }
        let Map::Array(keys) = keys else {
            bail!("CW_KEYS is not an array map");
        };
        Ok(Self::Slots {
            keys: MappedKeys::new(keys, mask as usize + 1)?,
            changes: Array::try_from(changes)?,
            mask,
        })
    }

    /// The cookies of the sockets in the table now.
    pub fn cookies(&self) -> Vec<u64> {
        match self {
            Self::Slots { keys, .. } => (0..keys.len).map(|i| keys.key(i)).filter(|&k| k != 0).collect(),
            Self::Hash(h) => h.keys().flatten().collect(),
        }
    }

    /// The change into CLOSE_WAIT of the socket with `cookie`, if it is
    /// still there. A slot is read between two reads of its key, and its
    /// change taken only if it is that socket's (a slot just claimed may
    /// still hold its previous socket's).
    pub fn get(&self, cookie: u64) -> Option<StateEvent> {
        match self {
            Self::Slots { keys, changes, mask } => {
                group_slots(close_wait_home(cookie, *mask), *mask).find_map(|index| {
                    (keys.key(index as usize) == cookie).then_some(())?;
                    let change = changes.get(&index, 0).ok()?;
                    (keys.key(index as usize) == cookie && change.header.cookie == cookie).then_some(change)
                })
            }
            Self::Hash(h) => h.get(&cookie, 0).ok(),
        }
    }
}
