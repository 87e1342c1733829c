//! Naming a `Method*`: class, name, descriptor and source file through
//! Method -> ConstMethod -> ConstantPool -> pool holder (Klass), and the
//! line of a bci from the compressed line-number table that follows the
//! bytecodes in the ConstMethod.
//!
//! The pointer comes from a stack slot or from code that may be being
//! unloaded, so every step is checked; a failure says which step.

use super::{compressed, descriptor, layout::Layout, memory::Memory, memory::MemoryExt as _, JavaFrame, JavaFrameKind};

/// The line-number table of a method with 64 KiB of bytecode fits in this.
const MAX_LINE_TABLE: u64 = 256 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodInfo {
    /// Dotted: `java.lang.Thread`.
    pub class: String,
    pub name: String,
    pub signature: String,
    pub file: Option<String>,
    const_method: u64,
    code_size: u16,
    line_table: Option<(u64, u64)>,
}

fn field<const N: usize>(buf: &[u8], off: u64) -> Option<[u8; N]> {
    let off = usize::try_from(off).ok()?;
    buf.get(off..off.checked_add(N)?)?.try_into().ok()
}

fn u16_at(buf: &[u8], off: u64) -> Option<u16> {
    field(buf, off).map(u16::from_le_bytes)
}

fn u64_at(buf: &[u8], off: u64) -> Option<u64> {
    field(buf, off).map(u64::from_le_bytes)
}

fn i32_at(buf: &[u8], off: u64) -> Option<i32> {
    field(buf, off).map(i32::from_le_bytes)
}

/// Metadata lives in metaspace, word aligned, far above the zero page.
fn plausible(ptr: u64) -> bool {
    ptr >= 0x10000 && ptr.is_multiple_of(8) && ptr < (1 << 56)
}

/// A `Symbol`'s bytes as text.
pub fn read_symbol(mem: &dyn Memory, l: &Layout, sym: u64) -> Result<String, String> {
    if !plausible(sym) {
        return Err(format!("bad Symbol* {sym:#x}"));
    }
    let len = mem
        .u16(sym + l.symbol_length)
        .map_err(|e| format!("Symbol {sym:#x}: {e}"))?;
    let body = mem
        .bytes(sym + l.symbol_body, usize::from(len))
        .map_err(|e| format!("Symbol {sym:#x} body: {e}"))?;
    // Symbols are modified UTF-8; lossy is fine for names.
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Reads and checks a `Method*`.
pub fn read_method(mem: &dyn Memory, l: &Layout, method: u64) -> Result<MethodInfo, String> {
    if !plausible(method) {
        return Err(format!("bad Method* {method:#x}"));
    }
    let cm = mem
        .u64(method + l.method_const_method)
        .map_err(|e| format!("Method {method:#x}: {e}"))?;
    if !plausible(cm) {
        return Err(format!("Method {method:#x} has bad ConstMethod* {cm:#x}"));
    }
    let cm_hdr = mem
        .bytes(cm, l.const_method_size as usize)
        .map_err(|e| format!("ConstMethod {cm:#x}: {e}"))?;
    let short = || format!("ConstMethod {cm:#x}: field outside sizeof(ConstMethod)");
    let cp = u64_at(&cm_hdr, l.const_method_constants).ok_or_else(short)?;
    let flags = u16_at(&cm_hdr, l.const_method_flags).ok_or_else(short)?;
    let code_size = u16_at(&cm_hdr, l.const_method_code_size).ok_or_else(short)?;
    let name_index = u16_at(&cm_hdr, l.const_method_name_index).ok_or_else(short)?;
    let sig_index = u16_at(&cm_hdr, l.const_method_signature_index).ok_or_else(short)?;
    let words = i32_at(&cm_hdr, l.const_method_words).ok_or_else(short)?;
    if !plausible(cp) {
        return Err(format!("ConstMethod {cm:#x} has bad ConstantPool* {cp:#x}"));
    }

    let cp_hdr = mem
        .bytes(cp, l.constant_pool_size as usize)
        .map_err(|e| format!("ConstantPool {cp:#x}: {e}"))?;
    let short = || format!("ConstantPool {cp:#x}: field outside sizeof(ConstantPool)");
    let holder = u64_at(&cp_hdr, l.constant_pool_holder).ok_or_else(short)?;
    let cp_len = i32_at(&cp_hdr, l.constant_pool_length).ok_or_else(short)?;
    if !plausible(holder) {
        return Err(format!("ConstantPool {cp:#x} has bad pool holder {holder:#x}"));
    }
    if let Some(off) = l.instance_klass_constants {
        let back = mem.u64(holder + off).map_err(|e| format!("Klass {holder:#x}: {e}"))?;
        if back != cp {
            return Err(format!("Klass {holder:#x} does not own ConstantPool {cp:#x}"));
        }
    }
    let slot_symbol = |index: u16| -> Result<String, String> {
        if index == 0 || i32::from(index) >= cp_len {
            return Err(format!("constant pool index {index} outside 1..{cp_len}"));
        }
        let slot = cp + l.constant_pool_size + 8 * u64::from(index);
        let sym = mem.u64(slot).map_err(|e| format!("constant pool slot {index}: {e}"))?;
        read_symbol(mem, l, sym & !1)
    };

    let klass_name = mem
        .u64(holder + l.klass_name)
        .map_err(|e| format!("Klass {holder:#x}: {e}"))?;
    let class = read_symbol(mem, l, klass_name)?.replace('/', ".");
    let name = slot_symbol(name_index)?;
    let signature = slot_symbol(sig_index)?;
    if class.is_empty() || name.is_empty() || !signature.starts_with('(') {
        return Err(format!(
            "Method {method:#x} names are not sane: {class:?} {name:?} {signature:?}"
        ));
    }
    let file = l
        .constant_pool_source_file
        .and_then(|off| u16_at(&cp_hdr, off))
        .filter(|&i| i != 0)
        .and_then(|i| slot_symbol(i).ok());

    let has_table = l.has_linenumber_table.is_some_and(|bit| flags & bit != 0);
    let table_start = cm + l.const_method_size + u64::from(code_size);
    let table_end = cm + u64::try_from(words).unwrap_or(0) * 8;
    let line_table =
        (has_table && table_end > table_start).then(|| (table_start, (table_end - table_start).min(MAX_LINE_TABLE)));
    Ok(MethodInfo {
        class,
        name,
        signature,
        file,
        const_method: cm,
        code_size,
        line_table,
    })
}

impl MethodInfo {
    /// The bci that an interpreter frame's bcp slot points at, if it lies
    /// in this method's bytecodes.
    pub fn bci_from_bcp(&self, l: &Layout, bcp: u64) -> Option<i32> {
        let code_base = self.const_method + l.const_method_size;
        let bci = bcp.checked_sub(code_base)?;
        (bci < u64::from(self.code_size)).then_some(bci as i32)
    }

    /// The frame of this method at `bci`.
    pub fn frame(&self, mem: &dyn Memory, bci: Option<i32>, kind: JavaFrameKind) -> JavaFrame {
        JavaFrame {
            symbol: descriptor::symbol(&self.class, &self.name, &self.signature),
            class: self.class.clone(),
            method: self.name.clone(),
            signature: self.signature.clone(),
            file: self.file.clone(),
            line: bci.and_then(|b| self.line(mem, b)),
            bci,
            kind,
        }
    }

    /// Source line of `bci`; `None` without a table or for a bci outside
    /// the bytecodes (e.g. the method-entry pseudo bci -1).
    pub fn line(&self, mem: &dyn Memory, bci: i32) -> Option<u32> {
        let (start, len) = self.line_table?;
        if bci < 0 || bci >= i32::from(self.code_size) {
            return None;
        }
        let table = mem.bytes(start, len as usize).ok()?;
        compressed::line_for_bci(&table, bci)
    }
}
