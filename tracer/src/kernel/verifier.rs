//! What a verifier rejection means, in one line: the reason out of a log
//! of thousands, and, when the reason is a kernel that lacks a helper or
//! an instruction this tracer uses, which Linux release brought it and
//! which fallback avoids it.

use tracer_common::{COMPAT_IDS, COMPAT_NO_CMPXCHG, COMPAT_NO_LOOP, COMPAT_NO_PT_REGS, COMPAT_NO_TASK_BTF};

/// The oldest kernel the tracer is tested on and supports. The programs
/// need the ring buffer (5.8) and BTF; what 5.10 lacks of the rest has a
/// fallback (see `compat`).
pub const MIN_KERNEL: &str = "5.10";

/// Helpers the programs call, by the name and number the verifier prints,
/// the release that let tracing programs call them, and the fallback
/// (`COMPAT_*` bit) for a kernel without them, if any.
const HELPERS: &[(&str, u32, &str, u32)] = &[
    ("bpf_ringbuf_output", 130, "5.8", 0),
    ("bpf_ringbuf_query", 134, "5.8", 0),
    ("bpf_get_current_task_btf", 158, "5.11", COMPAT_NO_TASK_BTF),
    ("bpf_get_socket_cookie", 46, "5.12", COMPAT_IDS),
    ("bpf_task_pt_regs", 175, "5.15", COMPAT_NO_PT_REGS),
    ("bpf_loop", 181, "5.17", COMPAT_NO_LOOP),
];

/// Instructions older verifiers reject, by their words for it: what it
/// is, the release that brought it, and the fallback.
const INSTRUCTIONS: &[(&str, &str, &str, u32)] = &[
    // 5.10 knows only the plain atomic add: any other operation (a fetch,
    // cmpxchg) is a reserved field to it.
    (
        "BPF_STX uses reserved fields",
        "BPF_ATOMIC fetch and compare-and-exchange instructions",
        "5.12",
        COMPAT_NO_CMPXCHG,
    ),
    (
        "invalid atomic operand",
        "BPF_ATOMIC fetch and compare-and-exchange instructions",
        "5.12",
        COMPAT_NO_CMPXCHG,
    ),
];

/// The verifier's phrases for a helper it does not offer this program;
/// `unknown` is what it calls a helper number it has never heard of.
const MISSING_HELPER: &[&str] = &[
    "unknown func ",
    "invalid func ",
    "program of this type cannot use helper ",
];

/// Statistics the verifier appends after its reason.
const TRAILER: &[&str] = &[
    "processed ",
    "verification time",
    "stack depth",
    "max_states_per_insn",
    "mark_read",
];

/// A program the verifier refused: why, in one line, and what this kernel
/// lacks if that was why.
#[derive(Debug)]
pub struct Rejected {
    reason: String,
    missing: Option<(String, &'static str)>,
    fallback: u32,
}

impl Rejected {
    pub fn from_log(log: &str) -> Self {
        let (missing, fallback) = match missing_feature(log) {
            Some((what, since, bit)) => (Some((what, since)), bit),
            None => (None, 0),
        };
        Rejected {
            reason: reason(log),
            missing,
            fallback,
        }
    }

    /// The `COMPAT_*` bit whose fallback avoids what the kernel lacks (0:
    /// none does).
    pub fn fallback(&self) -> u32 {
        self.fallback
    }

    /// When the kernel lacks something the programs use: the one line
    /// that says what, and the minimum release (`release`: this kernel's).
    pub fn too_old(&self, release: &str) -> Option<String> {
        let (what, since) = self.missing.as_ref()?;
        Some(format!(
            "this kernel ({release}) is too old for tracer: its eBPF verifier lacks {what} (Linux {since}+); tracer needs Linux {MIN_KERNEL} or newer, with BTF (see README, Requirements)"
        ))
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the eBPF verifier rejected it: {}", self.reason)?;
        if let Some((what, since)) = &self.missing {
            write!(f, " ({what}: Linux {since}+)")?;
        }
        Ok(())
    }
}

impl std::error::Error for Rejected {}

/// The line that says why the program was rejected: the last one before
/// the statistics, from the first known phrase on (the verifier appends
/// some reasons to the instruction it stopped at).
fn reason(log: &str) -> String {
    let line = log
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !TRAILER.iter().any(|t| l.starts_with(t)))
        .unwrap_or("(empty verifier log)");
    const KNOWN: &[&str] = &["BPF program is too large", "combined stack size"];
    let from = KNOWN
        .iter()
        .chain(MISSING_HELPER)
        .chain(INSTRUCTIONS.iter().map(|(p, ..)| p))
        .filter_map(|p| line.find(p))
        .min()
        .unwrap_or(0);
    let mut r = line[from..].to_string();
    if r.len() > 200 {
        let mut end = 200;
        while !r.is_char_boundary(end) {
            end -= 1;
        }
        r.truncate(end);
        r.push('…');
    }
    r
}

/// What the kernel lacks, if that is why it refused the program: a helper
/// (for tracing programs) or an instruction, and the release that
/// brought it.
fn missing_feature(log: &str) -> Option<(String, &'static str, u32)> {
    log.lines().find_map(|line| {
        if let Some((_, what, since, bit)) = INSTRUCTIONS.iter().find(|(p, ..)| line.contains(p)) {
            return Some((what.to_string(), *since, *bit));
        }
        let rest = MISSING_HELPER.iter().find_map(|p| line.split_once(p).map(|(_, r)| r))?;
        let (name, number) = rest.trim().split_once('#')?;
        let number: u32 = number.trim_end_matches(|c: char| !c.is_ascii_digit()).parse().ok()?;
        HELPERS
            .iter()
            .find(|(n, id, ..)| *n == name || *id == number)
            .map(|(n, _, v, bit)| (format!("{n} for tracing programs"), *v, *bit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end of 5.10's log for the state hook (Debian 5.10.0-46).
    const OLD_KERNEL: &str = "reg type unsupported for arg#0 function inet_sock_set_state#27\n\
        0: R1=ctx(id=0,off=0,imm=0) R10=fp0\n\
        ; let sk: *const c_void = ctx.arg(0);\n\
        12: (85) call bpf_get_socket_cookie#46\n\
        unknown func bpf_get_socket_cookie#46\n\
        processed 12 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0\n";

    #[test]
    fn names_the_missing_helper_and_its_fallback() {
        assert_eq!(reason(OLD_KERNEL), "unknown func bpf_get_socket_cookie#46");
        let r = Rejected::from_log(OLD_KERNEL);
        assert_eq!(r.fallback(), COMPAT_IDS);
        assert_eq!(
            missing_feature(OLD_KERNEL),
            Some(("bpf_get_socket_cookie for tracing programs".into(), "5.12", COMPAT_IDS))
        );
    }

    /// 5.7 has no ring buffer, which nothing replaces.
    #[test]
    fn too_old_without_a_fallback() {
        let log = "9: (85) call bpf_ringbuf_output#130\nunknown func bpf_ringbuf_output#130\nprocessed 9 insns\n";
        let r = Rejected::from_log(log);
        assert_eq!(r.fallback(), 0);
        assert_eq!(
            r.too_old("5.7.0").as_deref(),
            Some(
                "this kernel (5.7.0) is too old for tracer: its eBPF verifier lacks bpf_ringbuf_output for tracing programs (Linux 5.8+); tracer needs Linux 5.10 or newer, with BTF (see README, Requirements)"
            )
        );
    }

    #[test]
    fn a_helper_number_the_kernel_never_heard_of() {
        let log = "7: (85) call unknown#181\ninvalid func unknown#181\nprocessed 7 insns\n";
        assert_eq!(
            missing_feature(log),
            Some(("bpf_loop for tracing programs".into(), "5.17", COMPAT_NO_LOOP))
        );
    }

    /// Debian 5.10.0-46 on the state hook's first `cmpxchg`.
    #[test]
    fn an_instruction_the_kernel_does_not_know() {
        let log = "42: (db) r1 = atomic64_cmpxchg((u64 *)(r2 +0), r0, r3)\nBPF_STX uses reserved fields\nprocessed 42 insns\n";
        assert_eq!(reason(log), "BPF_STX uses reserved fields");
        assert_eq!(
            missing_feature(log),
            Some((
                "BPF_ATOMIC fetch and compare-and-exchange instructions".into(),
                "5.12",
                COMPAT_NO_CMPXCHG
            ))
        );
    }

    #[test]
    fn reason_appended_to_an_instruction() {
        let log = "615: (2d) if r1 > r0 goto pc+1 BPF program is too large. Processed 1000001 insn\n\
                   verification time 27859545 usec\nstack depth 360+0\n\
                   processed 1000001 insns (limit 1000000) max_states_per_insn 119\n";
        assert_eq!(reason(log), "BPF program is too large. Processed 1000001 insn");
        assert_eq!(missing_feature(log), None);
    }

    #[test]
    fn stack_too_deep() {
        let log = "combined stack size of 2 calls is 608. Too large\nverification time 9 usec\n";
        assert_eq!(reason(log), "combined stack size of 2 calls is 608. Too large");
    }
}
