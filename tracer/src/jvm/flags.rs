//! Reading a `-XX:` flag's value from the JVM's flag table
//! (`JVMFlag::flags`, `JVMFlag::numFlags`), which vmStructs describes.

use anyhow::{anyhow, bail};

use super::{
    memory::{Memory, MemoryExt as _},
    vmstructs::VmStructs,
};

/// JDK 17 has about 1,300 flags (product, diagnostic, experimental, develop).
const MAX_FLAGS: u64 = 10_000;

/// The value of the bool flag `name`; `Ok(None)` if the table has no such flag.
pub fn read_bool(mem: &dyn Memory, vm: &VmStructs, name: &str) -> anyhow::Result<Option<bool>> {
    let need = |v: Option<u64>, what: &str| v.ok_or_else(|| anyhow!("vmStructs lacks {what}"));
    let flags_var = need(vm.static_address("JVMFlag", "flags"), "JVMFlag::flags")?;
    let num_var = need(vm.static_address("JVMFlag", "numFlags"), "JVMFlag::numFlags")?;
    let size = need(vm.size("JVMFlag"), "sizeof(JVMFlag)")?;
    let name_off = need(vm.offset("JVMFlag", "_name"), "JVMFlag::_name")?;
    let addr_off = need(vm.offset("JVMFlag", "_addr"), "JVMFlag::_addr")?;

    let array = mem.u64(flags_var)?;
    let count = mem.u64(num_var)?;
    if array == 0 || count > MAX_FLAGS || size > 256 {
        bail!("implausible flag table: {count} flags of {size} bytes at {array:#x}");
    }
    // One read for the whole table; then only as many bytes of each name as
    // the wanted name has (plus its NUL) are compared.
    let table = mem.bytes(array, (count * size) as usize)?;
    let mut want = name.as_bytes().to_vec();
    want.push(0);
    for entry in table.chunks_exact(size as usize) {
        let word = |off: u64| -> Option<u64> {
            let off = usize::try_from(off).ok()?;
            Some(u64::from_le_bytes(
                entry.get(off..off.checked_add(8)?)?.try_into().ok()?,
            ))
        };
        let Some(name_ptr) = word(name_off).filter(|&p| p != 0) else {
            continue;
        };
        match mem.bytes(name_ptr, want.len()) {
            Ok(b) if b == want => {}
            _ => continue,
        }
        let value_ptr = word(addr_off).ok_or_else(|| anyhow!("JVMFlag::_addr outside the entry"))?;
        return Ok(Some(mem.u8(value_ptr)? != 0));
    }
    Ok(None)
}
