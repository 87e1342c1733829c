//! Finding libjvm.so in a process and the run-time addresses of the symbols
//! it exports for serviceability agents (`gHotSpotVM*`).
//!
//! Most of the `...Offset`/`...ArrayStride` companions live in `.bss` (they
//! are set by static initializers), so they have no file offset and sit in
//! an anonymous mapping. The load bias is therefore derived once from a
//! symbol that does have a file offset (`gHotSpotVMStructs`, in `.data`) and
//! the file-backed mapping holding it, then applied to every symbol's
//! virtual address.

use std::{collections::BTreeMap, fs, path::PathBuf};

use anyhow::{anyhow, bail, Context as _};
use blazesym::inspect::{
    source::{Elf, Source},
    Inspector,
};

/// Exported symbol name -> run-time address in the target.
pub type Symbols = BTreeMap<String, u64>;

/// The symbols the table readers need. The first one anchors the load bias.
pub const NEEDED: &[&str] = &[
    "gHotSpotVMStructs",
    "gHotSpotVMStructEntryArrayStride",
    "gHotSpotVMStructEntryTypeNameOffset",
    "gHotSpotVMStructEntryFieldNameOffset",
    "gHotSpotVMStructEntryTypeStringOffset",
    "gHotSpotVMStructEntryIsStaticOffset",
    "gHotSpotVMStructEntryOffsetOffset",
    "gHotSpotVMStructEntryAddressOffset",
    "gHotSpotVMTypes",
    "gHotSpotVMTypeEntryArrayStride",
    "gHotSpotVMTypeEntryTypeNameOffset",
    "gHotSpotVMTypeEntrySuperclassNameOffset",
    "gHotSpotVMTypeEntrySizeOffset",
    "gHotSpotVMIntConstants",
    "gHotSpotVMIntConstantEntryArrayStride",
    "gHotSpotVMIntConstantEntryNameOffset",
    "gHotSpotVMIntConstantEntryValueOffset",
];

/// One file-backed mapping of libjvm.so.
#[derive(Debug)]
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
}

/// libjvm.so as mapped by one process.
#[derive(Debug)]
pub struct LibJvm {
    /// Where to open the very file the process mapped (works across mount
    /// namespaces and for a deleted file).
    open_path: PathBuf,
    mappings: Vec<Mapping>,
}

/// Finds libjvm.so in `/proc/PID/maps`; `None` when the process has none.
pub fn find_libjvm(pid: u32) -> anyhow::Result<Option<LibJvm>> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).with_context(|| format!("reading /proc/{pid}/maps"))?;
    Ok(parse_maps(pid, &maps))
}

fn parse_maps(pid: u32, maps: &str) -> Option<LibJvm> {
    let mut lib: Option<LibJvm> = None;
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut it = line.split_whitespace();
        let (Some(range), Some(_perms), Some(offset), Some(_dev), Some(_inode)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let path = it.collect::<Vec<_>>().join(" ");
        let path = path.strip_suffix(" (deleted)").unwrap_or(&path);
        if !path.ends_with("/libjvm.so") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset)) = (
            u64::from_str_radix(start, 16),
            u64::from_str_radix(end, 16),
            u64::from_str_radix(offset, 16),
        ) else {
            continue;
        };
        let lib = lib.get_or_insert_with(|| {
            // map_files names the mapped inode itself; the root/ path is the
            // fallback where map_files is not readable.
            let by_inode = PathBuf::from(format!("/proc/{pid}/map_files/{range}"));
            let open_path = if fs::metadata(&by_inode).is_ok() {
                by_inode
            } else {
                PathBuf::from(format!("/proc/{pid}/root{path}"))
            };
            LibJvm {
                open_path,
                mappings: Vec::new(),
            }
        });
        lib.mappings.push(Mapping { start, end, offset });
    }
    lib
}

/// Resolves [`NEEDED`] to run-time addresses.
pub fn resolve(lib: &LibJvm) -> anyhow::Result<Symbols> {
    let inspector = Inspector::new();
    let src = Source::Elf(Elf::new(&lib.open_path));
    let found = inspector
        .lookup(&src, NEEDED)
        .map_err(|e| anyhow!("cannot read the symbols of {}: {e}", lib.open_path.display()))?;
    let mut virt = BTreeMap::new();
    let mut anchor = None;
    for (name, infos) in NEEDED.iter().zip(found) {
        let Some(info) = infos.first() else {
            bail!("libjvm.so does not export {name}");
        };
        if anchor.is_none() {
            anchor = info.file_offset.map(|off| (info.addr, off));
        }
        virt.insert((*name).to_string(), info.addr);
    }
    let (anchor_addr, anchor_off) = anchor.ok_or_else(|| anyhow!("{} has no file offset", NEEDED[0]))?;
    let bias = load_bias(&lib.mappings, anchor_addr, anchor_off)?;
    Ok(virt
        .into_iter()
        .map(|(name, addr)| (name, addr.wrapping_add(bias)))
        .collect())
}

/// Run-time address minus ELF virtual address, from a symbol whose file
/// offset lies in one of the mappings.
fn load_bias(mappings: &[Mapping], vaddr: u64, file_offset: u64) -> anyhow::Result<u64> {
    let m = mappings
        .iter()
        .find(|m| m.offset <= file_offset && file_offset - m.offset < m.end - m.start)
        .ok_or_else(|| anyhow!("no mapping of libjvm.so holds file offset {file_offset:#x}"))?;
    let runtime = m.start + (file_offset - m.offset);
    Ok(runtime.wrapping_sub(vaddr))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
7f78f7e00000-7f78f8051000 r--p 00000000 fe:00 315160 /usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so
7f78f8051000-7f78f8da4000 r-xp 00251000 fe:00 315160 /usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so
7f78f9025000-7f78f90dd000 r--p 01225000 fe:00 315160 /usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so
7f78f90dd000-7f78f9112000 rw-p 012dd000 fe:00 315160 /usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so
7f78f9112000-7f78f91a0000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
";

    #[test]
    fn finds_libjvm_mappings_and_bias() {
        let lib = parse_maps(7, MAPS).unwrap();
        assert_eq!(lib.mappings.len(), 4);
        // (pid 7's map_files entry does not exist here, hence the fallback.)
        assert!(lib.open_path.ends_with("lib/server/libjvm.so"), "{:?}", lib.open_path);
        // gHotSpotVMStructs of the JDK 17 this was taken from: .data, vaddr == file offset.
        let bias = load_bias(&lib.mappings, 0x12f89f8, 0x12f89f8).unwrap();
        assert_eq!(bias, 0x7f78f7e00000);
        assert!(load_bias(&lib.mappings, 0x5000_0000, 0x5000_0000).is_err());
        assert!(parse_maps(7, "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n").is_none());
    }
}
