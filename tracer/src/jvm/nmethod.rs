//! Naming a pc in compiled code (an nmethod): the PcDesc recorded for that
//! exact return address and the chain of scopes it points to, which gives
//! the inlined methods, their bcis and so their lines.
//!
//! A return address into compiled code always has a PcDesc (every call
//! site records debug info). A pc without one did not come from a call, so
//! the frame-pointer walk that produced it has gone astray.

use super::{
    codecache::Blob,
    compressed::Reader,
    descriptor,
    layout::Layout,
    memory::{Memory, MemoryExt as _},
    method::read_method,
    JavaFrame, JavaFrameKind, JvmPc,
};

/// Bounds the scopes-pcs read (a huge nmethod has some 10^4 PcDescs).
const MAX_PCS_BYTES: u64 = 4 << 20;
/// Inlining depth: C2's MaxInlineLevel is 15, 64 leaves room for JDK changes.
const MAX_DEPTH: usize = 64;
/// Three UNSIGNED5 ints take at most 15 bytes.
const SCOPE_HEADER_BYTES: u64 = 15;

pub fn name(mem: &dyn Memory, l: &Layout, blob: &Blob, pc: u64) -> JvmPc {
    let method = match mem.u64(blob.addr.wrapping_add(l.nmethod_method)) {
        Ok(m) => m,
        Err(e) => return JvmPc::Broken(format!("nmethod {:#x}: {e}", blob.addr)),
    };
    let info = match read_method(mem, l, method) {
        Ok(i) => i,
        Err(why) => return JvmPc::Broken(format!("nmethod {:#x} at pc {pc:#x}: {why}", blob.addr)),
    };
    let outer = || info.frame(mem, None, JavaFrameKind::Compiled);
    // A native wrapper (the compiled stub that calls a `native` method)
    // has no Java scopes and no bci; its own frame always sets up rbp.
    if blob.name == "native nmethod" {
        return JvmPc::Java(vec![info.frame(mem, None, JavaFrameKind::NativeMethod)]);
    }
    let pcs = match scopes_pcs(mem, l, blob) {
        Ok(p) => p,
        Err(why) => {
            log::debug!("nmethod {:#x}: {why}", blob.addr);
            return JvmPc::Java(vec![outer()]);
        }
    };
    let Some(decode_offset) = find_pc_desc(l, &pcs, pc - blob.code_begin) else {
        // A frame being deoptimized returns into its nmethod's deopt
        // handler (the real return address is saved in the frame, out of
        // our sight): the method is known, the bci is not, the fp holds.
        if is_deopt_handler(mem, l, blob, pc) {
            return JvmPc::Java(vec![outer()]);
        }
        return JvmPc::Broken(format!(
            "return address {pc:#x} is not a call site of compiled method {}: \
             the frame-pointer chain is broken here",
            descriptor::symbol(&info.class, &info.name, &info.signature)
        ));
    };
    match scopes(mem, l, blob, decode_offset) {
        Ok(frames) if !frames.is_empty() => JvmPc::Java(frames),
        Ok(_) => JvmPc::Java(vec![outer()]),
        Err(why) => {
            log::debug!("nmethod {:#x}: scopes: {why}", blob.addr);
            JvmPc::Java(vec![outer()])
        }
    }
}

fn is_deopt_handler(mem: &dyn Memory, l: &Layout, blob: &Blob, pc: u64) -> bool {
    l.nmethod_deopt_handlers
        .iter()
        .any(|&off| mem.u64(blob.addr.wrapping_add(off)).is_ok_and(|h| h == pc))
}

/// The deopt handler of the nmethod holding `pc` (for tests that make up
/// a deoptimized return address).
#[cfg(test)]
pub fn deopt_handler(mem: &dyn Memory, l: &Layout, blob: &Blob) -> Option<u64> {
    let off = *l.nmethod_deopt_handlers.first()?;
    mem.u64(blob.addr.wrapping_add(off)).ok()
}

fn offset_field(mem: &dyn Memory, blob: &Blob, off: u64) -> Result<u64, String> {
    let v = mem
        .i32(blob.addr.wrapping_add(off))
        .map_err(|e| format!("nmethod {:#x}: {e}", blob.addr))?;
    u64::try_from(v).map_err(|_| format!("nmethod {:#x}: negative section offset {v}", blob.addr))
}

/// The PcDesc array, `[_scopes_pcs_offset, _dependencies_offset)`.
fn scopes_pcs(mem: &dyn Memory, l: &Layout, blob: &Blob) -> Result<Vec<u8>, String> {
    let start = offset_field(mem, blob, l.nmethod_scopes_pcs_offset)?;
    let end = offset_field(mem, blob, l.nmethod_dependencies_offset)?;
    if end < start || end - start > MAX_PCS_BYTES {
        return Err(format!("implausible scopes-pcs section [{start:#x}, {end:#x})"));
    }
    mem.bytes(blob.addr.wrapping_add(start), (end - start) as usize)
        .map_err(|e| format!("scopes pcs: {e}"))
}

/// The scope decode offset of the PcDesc for exactly `pc_offset`.
fn find_pc_desc(l: &Layout, pcs: &[u8], pc_offset: u64) -> Option<i32> {
    let i32_at = |d: &[u8], off: u64| -> Option<i32> {
        let off = usize::try_from(off).ok()?;
        Some(i32::from_le_bytes(d.get(off..off.checked_add(4)?)?.try_into().ok()?))
    };
    let size = usize::try_from(l.pc_desc_size).ok().filter(|&s| s > 0)?;
    let target = i32::try_from(pc_offset).ok()?;
    pcs.chunks_exact(size)
        .find(|d| i32_at(d, l.pc_desc_pc_offset) == Some(target))
        .and_then(|d| i32_at(d, l.pc_desc_scope_decode_offset))
}

/// Decodes the scope chain from `decode_offset`, innermost first; the
/// outermost is the nmethod's own method (Compiled), the rest Inlined.
fn scopes(mem: &dyn Memory, l: &Layout, blob: &Blob, decode_offset: i32) -> Result<Vec<JavaFrame>, String> {
    // Scopes data runs from _scopes_data_begin up to the scopes pcs;
    // metadata (Method* etc.) from _metadata_offset up to the scopes data.
    let data_begin = mem
        .u64(blob.addr.wrapping_add(l.nmethod_scopes_data_begin))
        .map_err(|e| format!("scopes data begin: {e}"))?;
    let data_end = blob
        .addr
        .wrapping_add(offset_field(mem, blob, l.nmethod_scopes_pcs_offset)?);
    let meta_begin = blob
        .addr
        .wrapping_add(offset_field(mem, blob, l.nmethod_metadata_offset)?);
    if !(blob.addr < meta_begin && meta_begin <= data_begin && data_begin <= data_end) {
        return Err(format!(
            "implausible sections: metadata {meta_begin:#x} scopes {data_begin:#x}..{data_end:#x}"
        ));
    }
    let mut frames = Vec::new();
    let mut offset = decode_offset;
    // Offset 0 is DebugInformationRecorder::serialized_null: no scope.
    while offset != 0 {
        if frames.len() >= MAX_DEPTH {
            return Err(format!("more than {MAX_DEPTH} scopes"));
        }
        let at = u64::try_from(offset)
            .ok()
            .map(|o| data_begin.wrapping_add(o))
            .filter(|&a| a < data_end)
            .ok_or_else(|| format!("scope offset {offset} outside the scopes data"))?;
        let len = (data_end - at).min(SCOPE_HEADER_BYTES) as usize;
        let bytes = mem.bytes(at, len).map_err(|e| format!("scope at {at:#x}: {e}"))?;
        let mut r = Reader::new(&bytes);
        let truncated = || format!("scope at {at:#x} is truncated");
        let sender = r.int().ok_or_else(truncated)?;
        let method_index = r.int().ok_or_else(truncated)?;
        let bci = (r.int().ok_or_else(truncated)? as i32).wrapping_add(l.invocation_entry_bci);
        // metadata_at(i) is metadata_begin()[i - 1]; 0 stands for null.
        let slot = u64::from(method_index)
            .checked_sub(1)
            .map(|i| meta_begin.wrapping_add(8 * i))
            .filter(|&s| s >= meta_begin && s.wrapping_add(8) <= data_begin)
            .ok_or_else(|| format!("scope at {at:#x} has bad method index {method_index}"))?;
        let method = mem.u64(slot).map_err(|e| format!("metadata slot {slot:#x}: {e}"))?;
        let info = read_method(mem, l, method)?;
        frames.push(info.frame(mem, Some(bci), JavaFrameKind::Inlined));
        offset = i32::try_from(sender).map_err(|_| format!("bad sender offset {sender}"))?;
    }
    if let Some(last) = frames.last_mut() {
        last.kind = JavaFrameKind::Compiled;
    }
    Ok(frames)
}
