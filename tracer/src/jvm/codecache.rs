//! Which code blob holds a pc: the segmented code cache's heaps
//! (`CodeCache::_heaps`), each with a segment map that leads from any
//! segment back to the start of its block (`CodeHeap::find_block_for`).

use super::{
    layout::Layout,
    memory::{Memory, MemoryExt as _},
};

/// Per segment-map byte: 0xFF marks an unused segment, 0 a block start,
/// anything else the number of segments to hop back.
const FREE_SENTINEL: u8 = 0xFF;
/// JDK 17 has at most three heaps (non-nmethods, profiled, non-profiled).
const MAX_HEAPS: i32 = 16;
/// A 2 GiB code cache of 64-byte segments takes at most 2^25 segments,
/// each hop goes back up to 254: this bounds the walk with room to spare.
const MAX_HOPS: u32 = 1 << 18;
const MAX_NAME: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub addr: u64,
    pub name: String,
    pub code_begin: u64,
    pub code_end: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Outside the code cache.
    Outside,
    Blob(Blob),
    /// In the code cache but no live blob could be found.
    Broken(String),
}

/// A code heap's fixed geometry (its reserved range does not move; the
/// committed end does and is read per lookup).
#[derive(Clone, Debug)]
struct Heap {
    addr: u64,
    low_boundary: u64,
    high_boundary: u64,
    memory_low: u64,
    segmap_low: u64,
    log2_segment_size: u32,
}

#[derive(Default)]
pub struct CodeCache {
    bounds: Option<(u64, u64)>,
    heaps: Option<Vec<Heap>>,
}

impl CodeCache {
    /// The code cache's bounds and heaps are set up once when the JVM
    /// starts; until then (zeros) nothing is cached and every pc is outside.
    /// Whether the bounds and heaps are known now.
    fn setup(&mut self, mem: &dyn Memory, l: &Layout) -> Result<bool, String> {
        if self.bounds.is_none() {
            let low = mem
                .u64(l.code_cache_low_bound)
                .map_err(|e| format!("CodeCache::_low_bound: {e}"))?;
            let high = mem
                .u64(l.code_cache_high_bound)
                .map_err(|e| format!("CodeCache::_high_bound: {e}"))?;
            if low == 0 || high <= low {
                return Ok(false);
            }
            self.bounds = Some((low, high));
        }
        if self.heaps.is_none() {
            let heaps = read_heaps(mem, l)?;
            if heaps.is_empty() {
                return Ok(false);
            }
            self.heaps = Some(heaps);
        }
        Ok(true)
    }

    #[cfg(test)]
    pub fn heap_count(&self) -> usize {
        self.heaps.as_ref().map_or(0, Vec::len)
    }

    pub fn find(&mut self, mem: &dyn Memory, l: &Layout, pc: u64) -> Lookup {
        match self.setup(mem, l) {
            Ok(true) => {}
            Ok(false) => return Lookup::Outside,
            Err(why) => return Lookup::Broken(why),
        }
        let (Some((low, high)), Some(heaps)) = (self.bounds, self.heaps.as_deref()) else {
            return Lookup::Outside;
        };
        if pc < low || pc >= high {
            return Lookup::Outside;
        }
        let Some(heap) = heaps.iter().find(|h| h.low_boundary <= pc && pc < h.high_boundary) else {
            return Lookup::Broken(format!("pc {pc:#x} is in the code cache but in none of its heaps"));
        };
        match find_blob(mem, l, heap, pc) {
            Ok(b) => Lookup::Blob(b),
            Err(why) => Lookup::Broken(why),
        }
    }
}

fn read_heaps(mem: &dyn Memory, l: &Layout) -> Result<Vec<Heap>, String> {
    let err = |what: &str, e: std::io::Error| format!("reading {what}: {e}");
    let array = mem.u64(l.code_cache_heaps).map_err(|e| err("CodeCache::_heaps", e))?;
    if array == 0 {
        return Ok(Vec::new());
    }
    let len = mem
        .i32(array.wrapping_add(l.growable_array_len))
        .map_err(|e| err("_heaps length", e))?;
    if !(0..=MAX_HEAPS).contains(&len) {
        return Err(format!("CodeCache::_heaps has implausible length {len}"));
    }
    let data = mem
        .u64(array.wrapping_add(l.growable_array_data))
        .map_err(|e| err("_heaps data", e))?;
    let mut heaps = Vec::new();
    for i in 0..len as u64 {
        let addr = mem.u64(data.wrapping_add(8 * i)).map_err(|e| err("a CodeHeap*", e))?;
        let at = |off: u64| addr.wrapping_add(off);
        let vs = at(l.code_heap_memory);
        let rd = |a: u64| mem.u64(a).map_err(|e| err("a CodeHeap", e));
        let log2 = mem
            .i32(at(l.code_heap_log2_segment_size))
            .map_err(|e| err("CodeHeap::_log2_segment_size", e))?;
        let heap = Heap {
            addr,
            low_boundary: rd(vs.wrapping_add(l.virtual_space_low_boundary))?,
            high_boundary: rd(vs.wrapping_add(l.virtual_space_high_boundary))?,
            memory_low: rd(vs.wrapping_add(l.virtual_space_low))?,
            segmap_low: rd(at(l.code_heap_segmap).wrapping_add(l.virtual_space_low))?,
            log2_segment_size: u32::try_from(log2).unwrap_or(0),
        };
        if !(4..=16).contains(&heap.log2_segment_size) || heap.memory_low < heap.low_boundary {
            return Err(format!("CodeHeap {addr:#x} has implausible geometry: {heap:?}"));
        }
        heaps.push(heap);
    }
    Ok(heaps)
}

fn find_blob(mem: &dyn Memory, l: &Layout, heap: &Heap, pc: u64) -> Result<Blob, String> {
    // Only the committed part has segments (and readable memory).
    let committed_end = mem
        .u64(heap.addr.wrapping_add(l.code_heap_memory + l.virtual_space_high))
        .map_err(|e| format!("CodeHeap {:#x}: {e}", heap.addr))?;
    if pc < heap.memory_low || pc >= committed_end {
        return Err(format!("pc {pc:#x} is in an uncommitted part of a code heap"));
    }
    let mut seg = (pc - heap.memory_low) >> heap.log2_segment_size;
    let mut hops = 0;
    loop {
        let b = mem
            .u8(heap.segmap_low.wrapping_add(seg))
            .map_err(|e| format!("code heap segment map: {e}"))?;
        match b {
            FREE_SENTINEL => return Err(format!("pc {pc:#x} is in an unused code-heap segment")),
            0 => break,
            hop => {
                seg = seg
                    .checked_sub(u64::from(hop))
                    .ok_or_else(|| format!("code heap segment map runs off its start at pc {pc:#x}"))?;
            }
        }
        hops += 1;
        if hops > MAX_HOPS {
            return Err(format!(
                "code heap segment map does not lead to a block start for pc {pc:#x}"
            ));
        }
    }
    let block = heap.memory_low.wrapping_add(seg << heap.log2_segment_size);
    if let Some(used) = l.heap_block_used {
        let used = mem
            .u8(block.wrapping_add(used))
            .map_err(|e| format!("HeapBlock {block:#x}: {e}"))?;
        if used == 0 {
            return Err(format!("pc {pc:#x} is in a freed code-heap block"));
        }
    }
    let addr = block.wrapping_add(l.heap_block_size);
    let rd = |off: u64| {
        mem.u64(addr.wrapping_add(off))
            .map_err(|e| format!("CodeBlob {addr:#x}: {e}"))
    };
    let code_begin = rd(l.code_blob_code_begin)?;
    let code_end = rd(l.code_blob_code_end)?;
    if !(code_begin <= pc && pc < code_end) {
        return Err(format!(
            "pc {pc:#x} is outside the code [{code_begin:#x}, {code_end:#x}) of the blob at {addr:#x}"
        ));
    }
    let name_ptr = rd(l.code_blob_name)?;
    let name = mem
        .cstr(name_ptr, MAX_NAME)
        .map_err(|e| format!("CodeBlob {addr:#x} name: {e}"))?;
    Ok(Blob {
        addr,
        name,
        code_begin,
        code_end,
    })
}
