//! The JVM's self-description for serviceability agents: `gHotSpotVMStructs`
//! (fields: offsets or static addresses), `gHotSpotVMTypes` (sizes and
//! superclasses) and `gHotSpotVMIntConstants`. Read once per process, so no
//! struct offset is ever hard-coded here.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context as _};

use super::{
    memory::{Memory, MemoryExt as _},
    symbols::Symbols,
};

/// No JDK has more than a few thousand entries; the cap stops a walk over
/// garbage that never meets the null terminator.
const MAX_ENTRIES: usize = 10_000;
const MAX_NAME: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub type_string: Option<String>,
    pub is_static: bool,
    /// Offset in the instance (non-static fields).
    pub offset: u64,
    /// Address of the variable (static fields).
    pub address: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Type {
    pub size: u64,
    pub superclass: Option<String>,
}

#[derive(Debug, Default)]
pub struct VmStructs {
    fields: HashMap<(String, String), Field>,
    types: HashMap<String, Type>,
    int_constants: HashMap<String, i32>,
}

impl VmStructs {
    pub fn read(mem: &dyn Memory, syms: &Symbols) -> anyhow::Result<Self> {
        let sym = |name: &str| -> anyhow::Result<u64> {
            let addr = *syms.get(name).ok_or_else(|| anyhow!("missing symbol {name}"))?;
            mem.u64(addr).with_context(|| format!("reading {name} at {addr:#x}"))
        };
        let mut vm = VmStructs::default();

        let stride = sym("gHotSpotVMStructEntryArrayStride")?;
        let [tn, fnm, ts, st, of, ad] = ["TypeName", "FieldName", "TypeString", "IsStatic", "Offset", "Address"]
            .map(|f| sym(&format!("gHotSpotVMStructEntry{f}Offset")));
        let (tn, fnm, ts, st, of, ad) = (tn?, fnm?, ts?, st?, of?, ad?);
        check_layout("struct", stride, &[tn, fnm, ts, of, ad], st)?;
        let base = sym("gHotSpotVMStructs")?;
        walk(mem, base, stride, tn, |e, type_name| {
            let field = mem.cstr(mem.u64(e.wrapping_add(fnm))?, MAX_NAME)?;
            let ts_ptr = mem.u64(e.wrapping_add(ts))?;
            let f = Field {
                type_string: if ts_ptr == 0 {
                    None
                } else {
                    Some(mem.cstr(ts_ptr, MAX_NAME)?)
                },
                is_static: mem.i32(e.wrapping_add(st))? != 0,
                offset: mem.u64(e.wrapping_add(of))?,
                address: mem.u64(e.wrapping_add(ad))?,
            };
            vm.fields.insert((type_name, field), f);
            Ok(())
        })
        .context("reading gHotSpotVMStructs")?;

        let stride = sym("gHotSpotVMTypeEntryArrayStride")?;
        let tn = sym("gHotSpotVMTypeEntryTypeNameOffset")?;
        let sup = sym("gHotSpotVMTypeEntrySuperclassNameOffset")?;
        let sz = sym("gHotSpotVMTypeEntrySizeOffset")?;
        check_layout("type", stride, &[tn, sup, sz], sz)?;
        let base = sym("gHotSpotVMTypes")?;
        walk(mem, base, stride, tn, |e, type_name| {
            let sup_ptr = mem.u64(e.wrapping_add(sup))?;
            let t = Type {
                size: mem.u64(e.wrapping_add(sz))?,
                superclass: if sup_ptr == 0 {
                    None
                } else {
                    Some(mem.cstr(sup_ptr, MAX_NAME)?)
                },
            };
            vm.types.insert(type_name, t);
            Ok(())
        })
        .context("reading gHotSpotVMTypes")?;

        let stride = sym("gHotSpotVMIntConstantEntryArrayStride")?;
        let nm = sym("gHotSpotVMIntConstantEntryNameOffset")?;
        let val = sym("gHotSpotVMIntConstantEntryValueOffset")?;
        check_layout("int constant", stride, &[nm], val)?;
        let base = sym("gHotSpotVMIntConstants")?;
        walk(mem, base, stride, nm, |e, name| {
            vm.int_constants.insert(name, mem.i32(e.wrapping_add(val))?);
            Ok(())
        })
        .context("reading gHotSpotVMIntConstants")?;

        if vm.fields.is_empty() || vm.types.is_empty() {
            bail!("the vmStructs tables are empty (JVM not initialized yet?)");
        }
        Ok(vm)
    }

    /// Offset of a non-static field, looked up in `ty` and then in its
    /// superclasses (e.g. `nmethod::_method` is declared on CompiledMethod).
    pub fn offset(&self, ty: &str, field: &str) -> Option<u64> {
        let mut ty = ty.to_string();
        for _ in 0..16 {
            if let Some(f) = self.fields.get(&(ty.clone(), field.to_string())) {
                return (!f.is_static).then_some(f.offset);
            }
            ty = self.types.get(&ty)?.superclass.clone()?;
        }
        None
    }

    /// Address of a static field's variable.
    pub fn static_address(&self, ty: &str, field: &str) -> Option<u64> {
        let f = self.fields.get(&(ty.to_string(), field.to_string()))?;
        (f.is_static && f.address != 0).then_some(f.address)
    }

    pub fn size(&self, ty: &str) -> Option<u64> {
        self.types.get(ty).map(|t| t.size).filter(|&s| s > 0)
    }

    pub fn int_constant(&self, name: &str) -> Option<i32> {
        self.int_constants.get(name).copied()
    }

    #[cfg(test)]
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.fields.len(), self.types.len(), self.int_constants.len())
    }
}

/// Rejects entry layouts that would make the walk read nonsense: the
/// companions are plain numbers read from the target.
fn check_layout(what: &str, stride: u64, ptr_offsets: &[u64], last: u64) -> anyhow::Result<()> {
    let too_far = ptr_offsets.iter().any(|&o| o.saturating_add(8) > stride) || last.saturating_add(4) > stride;
    if !(8..=256).contains(&stride) || too_far {
        bail!("implausible {what} entry layout: stride {stride}, offsets {ptr_offsets:?}/{last}");
    }
    Ok(())
}

/// Calls `f(entry_address, name)` for each entry until the null name.
fn walk(
    mem: &dyn Memory,
    base: u64,
    stride: u64,
    name_off: u64,
    mut f: impl FnMut(u64, String) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    if base == 0 {
        bail!("table pointer is null");
    }
    for i in 0..MAX_ENTRIES as u64 {
        let e = base.wrapping_add(i * stride);
        let name_ptr = mem.u64(e.wrapping_add(name_off))?;
        if name_ptr == 0 {
            return Ok(());
        }
        f(e, mem.cstr(name_ptr, MAX_NAME)?)?;
    }
    bail!("no end after {MAX_ENTRIES} entries")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made two-entry struct table (stride 48, JDK 17's layout) plus
    /// one type and one constant, to pin down the walk and the superclass
    /// lookup independently of any JVM.
    #[test]
    fn walks_hand_built_tables() {
        use crate::jvm::memory::Memory;
        struct Flat(Vec<u8>);
        impl Memory for Flat {
            fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
                let a = addr as usize;
                let src = self.0.get(a..a + buf.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }
        let mut m = vec![0u8; 4096];
        let put = |m: &mut Vec<u8>, at: usize, v: u64| m[at..at + 8].copy_from_slice(&v.to_le_bytes());
        let puts = |m: &mut Vec<u8>, at: usize, s: &str| m[at..at + s.len()].copy_from_slice(s.as_bytes());
        puts(&mut m, 3000, "CompiledMethod\0_method\0Method*\0nmethod\0X\0");
        // Companion "symbols" at 0..200 (8 bytes each).
        let mut syms = Symbols::new();
        let layout = [
            ("gHotSpotVMStructs", 1000),
            ("gHotSpotVMStructEntryArrayStride", 48),
            ("gHotSpotVMStructEntryTypeNameOffset", 0),
            ("gHotSpotVMStructEntryFieldNameOffset", 8),
            ("gHotSpotVMStructEntryTypeStringOffset", 16),
            ("gHotSpotVMStructEntryIsStaticOffset", 24),
            ("gHotSpotVMStructEntryOffsetOffset", 32),
            ("gHotSpotVMStructEntryAddressOffset", 40),
            ("gHotSpotVMTypes", 2000),
            ("gHotSpotVMTypeEntryArrayStride", 48),
            ("gHotSpotVMTypeEntryTypeNameOffset", 0),
            ("gHotSpotVMTypeEntrySuperclassNameOffset", 8),
            ("gHotSpotVMTypeEntrySizeOffset", 40),
            ("gHotSpotVMIntConstants", 2500),
            ("gHotSpotVMIntConstantEntryArrayStride", 16),
            ("gHotSpotVMIntConstantEntryNameOffset", 0),
            ("gHotSpotVMIntConstantEntryValueOffset", 8),
        ];
        for (i, (name, value)) in layout.iter().enumerate() {
            put(&mut m, i * 8, *value);
            syms.insert(name.to_string(), i as u64 * 8);
        }
        // Struct entry: CompiledMethod::_method, Method*, offset 112.
        put(&mut m, 1000, 3000);
        put(&mut m, 1008, 3015);
        put(&mut m, 1016, 3023);
        put(&mut m, 1032, 112);
        // Type entries: nmethod (super CompiledMethod) size 352; CompiledMethod size 192.
        put(&mut m, 2000, 3031);
        put(&mut m, 2008, 3000);
        put(&mut m, 2040, 352);
        put(&mut m, 2048, 3000);
        put(&mut m, 2088, 192);
        // Int constant X = -1.
        put(&mut m, 2500, 3039);
        m[2508..2512].copy_from_slice(&(-1i32).to_le_bytes());

        let vm = VmStructs::read(&Flat(m.clone()), &syms).unwrap();
        assert_eq!(vm.counts(), (1, 2, 1));
        assert_eq!(vm.offset("nmethod", "_method"), Some(112));
        assert_eq!(vm.offset("nmethod", "_nope"), None);
        assert_eq!(vm.static_address("CompiledMethod", "_method"), None);
        assert_eq!(vm.size("nmethod"), Some(352));
        assert_eq!(vm.int_constant("X"), Some(-1));

        // A stride of 0 would never advance: refused, not looped on.
        put(&mut m, 8, 0);
        assert!(VmStructs::read(&Flat(m), &syms).is_err());
    }
}
