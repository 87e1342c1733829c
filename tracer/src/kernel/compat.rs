//! What the running kernel's BPF lacks, and the fallback the programs take
//! for each (`tracer_common::COMPAT_*`). The eBPF object carries both paths;
//! the choice is a load-time constant, so the verifier only sees the one
//! taken.
//!
//! Helpers that any tracepoint program may call are probed before loading
//! (a two-instruction program each, as libbpf does). The cookie helper is
//! offered to `tp_btf` programs only, which cannot be probed without a
//! target, and an unknown instruction has no probe either: those two are
//! found by the state hook's own rejection, which the loader answers by
//! loading again with the fallback (see `Kernel::load`).

use aya::{
    programs::ProgramType,
    sys::{is_helper_supported, BpfHelper},
};
use serde::Serialize;
use tracer_common::{COMPAT_IDS, COMPAT_NO_CMPXCHG, COMPAT_NO_LOOP, COMPAT_NO_PT_REGS, COMPAT_NO_TASK_BTF};

/// One fallback: what the kernel lacks, since when it exists, and what
/// taking the fallback changes.
pub struct Fallback {
    pub bit: u32,
    pub lacks: &'static str,
    pub since: &'static str,
    pub instead: &'static str,
    /// The helper to probe for, where one can be.
    probe: Option<BpfHelper>,
}

pub const FALLBACKS: &[Fallback] = &[
    Fallback {
        bit: COMPAT_IDS,
        lacks: "bpf_get_socket_cookie for tracing programs",
        since: "5.12",
        instead: "a socket is known by its address until sock_diag names its cookie (leaks show the cookie ss shows)",
        probe: None,
    },
    Fallback {
        bit: COMPAT_NO_CMPXCHG,
        lacks: "BPF_ATOMIC compare-and-exchange",
        since: "5.12",
        instead: "followed sockets are kept in a hash map (slower than the lock-free table)",
        probe: None,
    },
    Fallback {
        bit: COMPAT_NO_TASK_BTF,
        lacks: "bpf_get_current_task_btf",
        since: "5.11",
        instead: "the task's files are walked with probe reads",
        probe: Some(BpfHelper::BPF_FUNC_get_current_task_btf),
    },
    Fallback {
        bit: COMPAT_NO_PT_REGS,
        lacks: "bpf_task_pt_regs",
        since: "5.15",
        instead: "user registers are read from the top of the task's kernel stack",
        probe: Some(BpfHelper::BPF_FUNC_task_pt_regs),
    },
    Fallback {
        bit: COMPAT_NO_LOOP,
        lacks: "bpf_loop",
        since: "5.17",
        instead: "close_range is not followed (its closes are seen only as state changes)",
        probe: Some(BpfHelper::BPF_FUNC_loop),
    },
];

/// A fallback in use, as the `start` output shows it.
#[derive(Clone, Debug, Serialize)]
pub struct FallbackStatus {
    /// What the kernel lacks, and the release that brought it.
    pub lacks: String,
    /// What the tracer does instead.
    pub instead: &'static str,
}

/// The fallbacks a helper probe says are needed (see the module's doc for
/// the others). A probe that cannot tell assumes the helper is there: the
/// program's own rejection then says what is missing.
pub fn probe() -> u32 {
    FALLBACKS
        .iter()
        .filter_map(|f| {
            let helper = f.probe?;
            match is_helper_supported(ProgramType::TracePoint, helper) {
                Ok(true) => None,
                Ok(false) => Some(f.bit),
                Err(e) => {
                    log::debug!("probing {}: {e}", f.lacks);
                    None
                }
            }
        })
        .fold(0, |bits, b| bits | b)
}

/// The fallbacks in `bits`, for the `start` output.
pub fn statuses(bits: u32) -> Vec<FallbackStatus> {
    FALLBACKS
        .iter()
        .filter(|f| bits & f.bit != 0)
        .map(|f| FallbackStatus {
            lacks: format!("{} (Linux {}+)", f.lacks, f.since),
            instead: f.instead,
        })
        .collect()
}

/// `ja +0`: an instruction that does nothing.
const NOP: [u8; 8] = [0x05, 0, 0, 0, 0, 0, 0, 0];

/// The eBPF object for a kernel without BPF_ATOMIC compare-and-exchange
/// ([`COMPAT_NO_CMPXCHG`]). 5.10's verifier rejects such an instruction
/// anywhere in a program, before it looks at which instructions can run
/// ("BPF_STX uses reserved fields", 0 processed). The programs reach theirs
/// only where the kernel has it (behind the load-time constant), so each
/// becomes a no-op, as libbpf's loader rewrites what an old kernel cannot
/// take. Only the plain atomic add (`imm` 0), which every kernel knows, is
/// left.
pub fn without_new_atomics(object: &[u8]) -> anyhow::Result<Vec<u8>> {
    use object::{Object as _, ObjectSection as _, SectionKind};
    let file = object::File::parse(object)?;
    let mut out = object.to_vec();
    let mut rewritten = 0;
    for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        let Some((offset, size)) = section.file_range() else {
            continue;
        };
        let code = &mut out[offset as usize..(offset + size) as usize];
        for insn in code.chunks_exact_mut(8) {
            if is_new_atomic(insn) {
                insn.copy_from_slice(&NOP);
                rewritten += 1;
            }
        }
    }
    log::debug!("{rewritten} BPF_ATOMIC instructions beyond the plain add made no-ops");
    Ok(out)
}

/// A BPF_ATOMIC instruction (class STX, mode ATOMIC; 32 or 64 bits) with an
/// operation other than the plain add.
fn is_new_atomic(insn: &[u8]) -> bool {
    const STX_ATOMIC_W: u8 = 0xc3;
    const STX_ATOMIC_DW: u8 = 0xdb;
    let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
    matches!(insn[0], STX_ATOMIC_W | STX_ATOMIC_DW) && imm != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_atomics_beyond_the_add_become_no_ops() {
        // r0 = cmpxchg_64(r1 + 0, r0, r9), as the socket table's claim is built.
        assert!(is_new_atomic(&[0xdb, 0x91, 0, 0, 0xf1, 0, 0, 0]));
        // lock *(u64 *)(r0 + 0) += r1: every kernel's atomic add.
        assert!(!is_new_atomic(&[0xdb, 0x10, 0, 0, 0, 0, 0, 0]));
        // 32-bit fetch-add.
        assert!(is_new_atomic(&[0xc3, 0x10, 0, 0, 0x01, 0, 0, 0]));
        // r1 = *(u64 *)(r0 + 0): a load.
        assert!(!is_new_atomic(&[0x79, 0x01, 0, 0, 0, 0, 0, 0]));
    }

    /// The object built for this tracer has compare-and-exchange
    /// instructions (the socket table), and none are left afterwards.
    #[test]
    fn the_tracer_object_loses_its_compare_and_exchange() {
        use object::{Object as _, ObjectSection as _, SectionKind};
        let count = |bytes: &[u8]| {
            let file = object::File::parse(bytes).expect("ELF");
            file.sections()
                .filter(|s| s.kind() == SectionKind::Text)
                .map(|s| {
                    s.data()
                        .expect("data")
                        .chunks_exact(8)
                        .filter(|i| is_new_atomic(i))
                        .count()
                })
                .sum::<usize>()
        };
        assert!(count(super::super::OBJECT) > 0);
        let stripped = without_new_atomics(super::super::OBJECT).expect("rewritten");
        assert_eq!(count(&stripped), 0);
        assert_eq!(stripped.len(), super::super::OBJECT.len());
    }
}
