//! Struct field offsets for the eBPF programs, read from the running
//! kernel's BTF. This is CO-RE done by the agent: the programs are compiled
//! once and told at load time where each field lives on this kernel.

use anyhow::{anyhow, bail, Context as _, Result};
use btf_rs::{Btf, Type};
use tracer_common::KernelOffsets;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

pub fn load_btf() -> Result<Btf> {
    if !std::path::Path::new(VMLINUX_BTF).exists() {
        bail!(
            "this kernel exposes no BTF ({VMLINUX_BTF} is missing); tracer needs Linux {} or newer built with CONFIG_DEBUG_INFO_BTF=y (see README, Requirements)",
            super::verifier::MIN_KERNEL
        );
    }
    // Parse from memory: reading the file through btf-rs costs ~100k seeks.
    let bytes = std::fs::read(VMLINUX_BTF).with_context(|| format!("cannot read {VMLINUX_BTF}"))?;
    Btf::from_bytes(&bytes).map_err(|e| anyhow!("cannot parse {VMLINUX_BTF}: {e}"))
}

/// Resolves every offset the programs use, or says which one is missing.
pub fn resolve(btf: &Btf) -> Result<KernelOffsets> {
    let f = |s: &str, m: &str| field_offset(btf, s, m).with_context(|| format!("kernel BTF: {s}.{m}"));
    Ok(KernelOffsets {
        skc_daddr: f("sock_common", "skc_daddr")?,
        skc_rcv_saddr: f("sock_common", "skc_rcv_saddr")?,
        skc_dport: f("sock_common", "skc_dport")?,
        skc_num: f("sock_common", "skc_num")?,
        skc_family: f("sock_common", "skc_family")?,
        skc_v6_daddr: f("sock_common", "skc_v6_daddr")?,
        skc_v6_rcv_saddr: f("sock_common", "skc_v6_rcv_saddr")?,
        skc_cookie: f("sock_common", "skc_cookie")?,
        // `struct sock` starts with its `sock_common`, so sock_common
        // offsets apply to a `struct sock *` as they are.
        sk_protocol: f("sock", "sk_protocol")?,
        tcp_rcv_nxt: f("tcp_sock", "rcv_nxt")?,
        tcp_copied_seq: f("tcp_sock", "copied_seq")?,
        task_files: f("task_struct", "files")?,
        files_fdt: f("files_struct", "fdt")?,
        fdt_max_fds: f("fdtable", "max_fds")?,
        fdt_fd: f("fdtable", "fd")?,
        file_f_op: f("file", "f_op")?,
        file_private_data: f("file", "private_data")?,
        socket_file: f("socket", "file")?,
        socket_sk: f("socket", "sk")?,
        skc_state: f("sock_common", "skc_state")?,
        file_ref: field_offset(btf, "file", "f_ref")
            .or_else(|_| field_offset(btf, "file", "f_count"))
            .context("kernel BTF: file.f_ref / file.f_count")?,
        file_ref_one: u32::from(field_offset(btf, "file", "f_ref").is_err()),
        task_stack: f("task_struct", "stack")?,
        thread_size: thread_size(btf),
        socket_file_ops: kallsyms_address("socket_file_ops").unwrap_or(0),
    })
}

/// x86_64's `THREAD_SIZE`: 16 KiB, doubled under KASAN (whose functions
/// the BTF then lists). Only the fallback for kernels without
/// `bpf_task_pt_regs` uses it.
fn thread_size(btf: &Btf) -> u32 {
    let kasan = btf.resolve_types_by_name("kasan_report").is_ok_and(|t| !t.is_empty());
    16384 << u32::from(kasan)
}

/// Byte offset of `member` in `struct name`, looking through anonymous
/// unions and structs (most `sock_common` fields live in those).
pub fn field_offset(btf: &Btf, name: &str, member: &str) -> Result<u32> {
    let types = btf.resolve_types_by_name(name).map_err(|e| anyhow!("{e}"))?;
    let st = types
        .iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(|| anyhow!("no struct {name}"))?;
    find_member(btf, st, member, 0, 0)?.ok_or_else(|| anyhow!("no member {member}"))
}

fn find_member(btf: &Btf, st: &btf_rs::Struct, member: &str, base_bits: u32, depth: u32) -> Result<Option<u32>> {
    if depth > 8 {
        return Ok(None);
    }
    for m in &st.members {
        let bits = base_bits + m.bit_offset();
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == member {
            if !bits.is_multiple_of(8) {
                bail!("{member} is a bitfield");
            }
            return Ok(Some(bits / 8));
        }
        if name.is_empty() {
            // Anonymous union/struct: search inside it.
            let inner = btf.resolve_chained_type(m).map_err(|e| anyhow!("{e}"))?;
            if let Type::Struct(s) | Type::Union(s) = &inner {
                if let Some(off) = find_member(btf, s, member, bits, depth + 1)? {
                    return Ok(Some(off));
                }
            }
        }
    }
    Ok(None)
}

/// A data symbol's address from /proc/kallsyms, if visible (root and
/// `kptr_restrict` permitting; otherwise the file shows zeros).
fn kallsyms_address(symbol: &str) -> Option<u64> {
    use std::io::BufRead;
    // Streamed: the whole file is ~8 MiB, and it is read while the parsed
    // BTF is alive, where the agent's memory peaks.
    let file = std::io::BufReader::new(std::fs::File::open("/proc/kallsyms").ok()?);
    file.lines().map_while(Result::ok).find_map(|line| {
        let mut it = line.split_whitespace();
        let addr = it.next()?;
        let _kind = it.next()?;
        (it.next()? == symbol && it.next().is_none())
            .then(|| u64::from_str_radix(addr, 16).ok())
            .flatten()
            .filter(|&a| a != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the real kernel's BTF when it exists; the layout facts checked
    /// here hold on every kernel this tool supports.
    #[test]
    fn resolves_sock_common_fields() {
        let btf = match load_btf() {
            Ok(b) => b,
            // Without BTF the tracer cannot run at all: in CI that is a
            // failure, never a silent pass.
            Err(e) if std::env::var_os("CI").is_some() => panic!("no usable {VMLINUX_BTF} under CI: {e:#}"),
            Err(_) => {
                eprintln!("skipping: no {VMLINUX_BTF}");
                return;
            }
        };
        let o = resolve(&btf).expect("all offsets resolve");
        // skc_daddr and skc_rcv_saddr are the first fields of sock_common.
        assert_eq!(o.skc_daddr, 0);
        assert_eq!(o.skc_rcv_saddr, 4);
        assert_eq!(o.skc_dport + 2, o.skc_num);
        assert!(o.skc_v6_daddr > o.skc_family);
        assert!(o.sk_protocol > o.skc_cookie);
    }
}
