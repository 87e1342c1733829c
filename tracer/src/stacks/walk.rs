//! A user stack walked in eBPF ([`WalkedStack`]) -> frames: the frame
//! the kernel's walk loses (the word at `sp`), Java frames named by the JVM
//! ([`crate::jvm`]), native frames by blazesym, and an honest cut where the
//! chain of frame pointers can no longer be trusted.

use tracer_common::{walk_end, MAX_USER_FRAMES};

use super::{native::NativeSymbolizer, process::ProcessContext, Frame, FrameKind};
use crate::{
    decode::WalkedStack,
    jvm::{JavaFrame, JavaFrameKind, JvmPc},
};

const PRESERVE_FP_FIX: &str = "run the JVM with -XX:+PreserveFramePointer";

/// A user stack ready to show: frames innermost first, and why it ends
/// early when it does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unwound {
    pub frames: Vec<Frame>,
    pub truncated: Option<String>,
}

/// One return address (or the interrupted `ip`) and the interpreter slots
/// of its own frame.
#[derive(Clone, Copy, Debug)]
struct Pc {
    pc: u64,
    /// A return address: the call is at `pc - 1`.
    is_return: bool,
    method_slot: u64,
    bcp_slot: u64,
}

/// Pairs each pc with its frame's slots, and puts back the caller of a
/// frameless syscall wrapper when the word at `sp` is code.
fn pcs(w: &WalkedStack, ctx: &ProcessContext) -> Vec<Pc> {
    let f = &w.frames;
    // The slots in f[k] were read from the frame of the code at f[k-1].
    let slots = |k: usize| f.get(k).map_or((0, 0), |e| (e.method_slot, e.bcp_slot));
    let mut out = Vec::with_capacity(f.len() + 1);
    let Some(first) = f.first() else { return out };
    let caller = w
        .sp_words
        .iter()
        .copied()
        .find(|&a| a != 0 && ctx.exec_map(a).is_some() && ctx.follows_call(a))
        .filter(|&a| f.get(1).is_none_or(|e| e.pc != a));
    if let Some(caller) = caller {
        // ip is in a wrapper without a frame: rbp (and f[1]'s slots) is the
        // caller's, whose return address is on the stack near sp.
        out.push(Pc {
            pc: first.pc,
            is_return: false,
            method_slot: 0,
            bcp_slot: 0,
        });
        let (m, b) = slots(1);
        out.push(Pc {
            pc: caller,
            is_return: true,
            method_slot: m,
            bcp_slot: b,
        });
    } else {
        let (m, b) = slots(1);
        out.push(Pc {
            pc: first.pc,
            is_return: false,
            method_slot: m,
            bcp_slot: b,
        });
    }
    for (k, e) in f.iter().enumerate().skip(1) {
        let (m, b) = slots(k + 1);
        out.push(Pc {
            pc: e.pc,
            is_return: true,
            method_slot: m,
            bcp_slot: b,
        });
    }
    out
}

/// What one pc turned out to be.
enum Named {
    Native,
    Java(Vec<JavaFrame>),
    Stub(String),
}

pub fn unwind(
    pid: u32,
    w: &WalkedStack,
    ctx: &mut ProcessContext,
    native: &NativeSymbolizer,
) -> Result<Unwound, String> {
    if w.frames.is_empty() {
        return Err("the task's user registers could not be read".into());
    }
    let pcs = pcs(w, ctx);
    let jvm_error = match &ctx.jvm {
        Some(Err(e)) => Some(format!("JVM frames not named: {e}")),
        _ => None,
    };
    let mut named: Vec<(Pc, Named)> = Vec::with_capacity(pcs.len());
    let mut truncated = None;
    for p in pcs {
        if ctx.exec_map(p.pc).is_none() {
            truncated = Some(format!(
                "the frame-pointer chain is broken: {:#x} is not in executable code; frames above it are not shown{}",
                p.pc,
                if ctx.jvm.is_some() {
                    format!(" ({PRESERVE_FP_FIX})")
                } else {
                    " (build with frame pointers)".into()
                }
            ));
            break;
        }
        let Some(jvm) = ctx.jvm() else {
            named.push((p, Named::Native));
            continue;
        };
        // Code-cache addresses are found, not looked up at pc - 1: a
        // return address is itself a PcDesc's pc.
        match jvm.name_pc(p.pc, p.method_slot, p.bcp_slot) {
            JvmPc::Native => named.push((p, Named::Native)),
            JvmPc::Stub(name) => named.push((p, Named::Stub(name))),
            JvmPc::Broken(why) => {
                truncated = Some(format!("{why}; frames above it are not shown ({PRESERVE_FP_FIX})"));
                break;
            }
            JvmPc::Java(frames) => {
                let compiled = frames
                    .last()
                    .is_some_and(|f| matches!(f.kind, JavaFrameKind::Compiled | JavaFrameKind::Inlined));
                let outer = frames.last().map(|f| f.symbol.clone()).unwrap_or_default();
                named.push((p, Named::Java(frames)));
                if compiled && !jvm.preserves_frame_pointer() {
                    // Compiled code without frame pointers keeps data in
                    // rbp: the link to its caller is not a frame pointer.
                    truncated = Some(format!(
                        "compiled Java code without frame pointers: the callers of {outer} cannot be found ({PRESERVE_FP_FIX})"
                    ));
                    break;
                }
            }
        }
    }
    if truncated.is_none() {
        truncated = match w.end {
            walk_end::DEPTH => Some(format!(
                "deeper than {MAX_USER_FRAMES} frames: the outermost frames are cut (counted in stack_walk_truncated)"
            )),
            walk_end::BAD_FP if ctx.jvm.is_some() => Some(format!(
                "the frame-pointer chain is broken after the last frame shown ({PRESERVE_FP_FIX})"
            )),
            _ => None,
        };
    }
    // A JVM's perf map is HotSpot's format, which blazesym rejects; its
    // JIT frames are named from the JVM anyway.
    let perf_map = ctx.jvm.is_none();
    Ok(Unwound {
        frames: to_frames(pid, &named, native, perf_map, jvm_error.as_deref()),
        truncated,
    })
}

fn to_frames(
    pid: u32,
    named: &[(Pc, Named)],
    native: &NativeSymbolizer,
    perf_map: bool,
    jvm_error: Option<&str>,
) -> Vec<Frame> {
    let (ips, is_return): (Vec<u64>, Vec<bool>) = named
        .iter()
        .filter(|(_, n)| matches!(n, Named::Native))
        .map(|(p, _)| (p.pc, p.is_return))
        .unzip();
    let mut natives = native.user(pid, &ips, &is_return, perf_map).into_iter();
    let mut out = Vec::with_capacity(named.len());
    for (p, n) in named {
        match n {
            Named::Native => {
                if let Some(mut f) = natives.next() {
                    if let (None, Some(e)) = (&f.symbol, jvm_error) {
                        f.reason = Some(format!("{}; {e}", f.reason.as_deref().unwrap_or("not symbolized")));
                    }
                    out.push(f);
                }
            }
            Named::Stub(name) => out.push(Frame {
                symbol: Some(name.clone()),
                module: Some("[jvm code cache]".into()),
                reason: None,
                ..Frame::raw(p.pc, FrameKind::Native, String::new())
            }),
            Named::Java(frames) => out.extend(frames.iter().map(|j| java_frame(p.pc, j))),
        }
    }
    out
}

fn java_frame(pc: u64, j: &JavaFrame) -> Frame {
    Frame {
        ip: format!("{pc:#x}"),
        symbol: Some(j.symbol.clone()),
        module: None,
        offset: None,
        file: j.file.clone(),
        line: j.line,
        kernel: false,
        kind: match j.kind {
            JavaFrameKind::Interpreted => FrameKind::Interpreted,
            JavaFrameKind::Compiled | JavaFrameKind::NativeMethod => FrameKind::Compiled,
            JavaFrameKind::Inlined => FrameKind::Inlined,
        },
        reason: None,
    }
}
