//! Stack ids from the kernel -> symbolized frames, done while the process
//! is alive (by the time a leak is reported or a recording is analysed it
//! may be gone). blazesym reads ELF symbols, DWARF file:line, perf maps
//! (`/tmp/perf-PID.map`, for JIT frames) and kallsyms.

use std::collections::HashSet;

use blazesym::{
    normalize::Normalizer,
    symbolize::{
        source::{Kernel as KernelSource, Process, Source},
        Input as SymInput, Symbolized, Symbolizer,
    },
    MaybeDefault, Pid,
};
use serde::Serialize;
use tracer_common::{NO_STACK, STACKS_OFF, STACKS_SAMPLED_OUT};

use crate::{
    correlate::StackRef,
    input::{Input, StackInput, StackKey},
    kernel::Kernel,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Frame {
    pub ip: String,
    pub symbol: Option<String>,
    /// The binary or library, where known.
    pub module: Option<String>,
    /// File offset of `ip` in `module`, for tools like addr2line.
    pub offset: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub kernel: bool,
    /// Why this frame has no symbol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Symbolizes each stack the kernel captured, once, while its process is
/// alive, and hands the result on as an input (so a recording carries it).
/// Remembers which stacks it has done; bounded, cleared when full.
pub struct StackSymbolizer {
    symbolizer: Symbolizer,
    normalizer: Normalizer,
    seen: HashSet<StackKey>,
    cap: usize,
}

impl StackSymbolizer {
    pub fn new(cap: usize) -> Self {
        StackSymbolizer {
            symbolizer: Symbolizer::new(),
            normalizer: Normalizer::new(),
            seen: HashSet::new(),
            cap,
        }
    }

    /// Inputs for the stacks `r` refers to that were not symbolized yet.
    pub fn learn(&mut self, k: &Kernel, r: StackRef, out: &mut Vec<Input>) {
        for (key, kernel) in [
            (
                StackKey {
                    pid: r.pid,
                    id: r.ustack,
                },
                false,
            ),
            (StackKey { pid: 0, id: r.kstack }, true),
        ] {
            if key.id < 0 || self.seen.contains(&key) {
                continue;
            }
            if self.seen.len() >= self.cap {
                self.seen.clear();
            }
            self.seen.insert(key);
            let frames = k.stack_ips(key.id).map(|ips| {
                if kernel {
                    self.kernel_frames(&ips)
                } else {
                    self.user_frames(key.pid, &ips)
                }
            });
            out.push(Input::Stack(StackInput { key, frames }));
        }
    }

    fn user_frames(&self, pid: u32, ips: &[u64]) -> Vec<Frame> {
        let src = Source::Process(Process::new(Pid::from(pid)));
        self.symbolize(&src, ips, false, Some(pid))
    }

    fn kernel_frames(&self, ips: &[u64]) -> Vec<Frame> {
        let src = Source::Kernel(KernelSource {
            // kallsyms is enough for function names; a vmlinux with DWARF
            // would add lines but costs seconds to load.
            vmlinux: MaybeDefault::None,
            debug_syms: false,
            ..KernelSource::default()
        });
        let mut frames = self.symbolize(&src, ips, true, None);
        // The innermost kernel frames are the tracer's own program and the
        // tracepoint plumbing that ran it: not the socket's story.
        let ours = frames
            .iter()
            .take_while(|f| {
                f.symbol.as_deref().is_some_and(|s| {
                    s.starts_with("bpf_prog_") || s.starts_with("bpf_trace_run") || s.starts_with("__bpf_trace_")
                })
            })
            .count();
        frames.drain(..ours);
        frames
    }

    fn symbolize(&self, src: &Source, ips: &[u64], kernel: bool, pid: Option<u32>) -> Vec<Frame> {
        // Return addresses point after the call; look up the call itself.
        let lookup: Vec<u64> = ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| if i == 0 { ip } else { ip - 1 })
            .collect();
        let syms = match self.symbolizer.symbolize(src, SymInput::AbsAddr(&lookup)) {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("symbolization failed: {e}");
                return ips
                    .iter()
                    .map(|&ip| raw(ip, kernel, None, None, reason.clone()))
                    .collect();
            }
        };
        let mut frames: Vec<Frame> = ips
            .iter()
            .zip(syms)
            .map(|(&ip, sym)| match sym {
                Symbolized::Sym(s) => Frame {
                    ip: format!("{ip:#x}"),
                    symbol: Some(s.name.to_string()),
                    module: s.module.map(|m| m.to_string_lossy().into_owned()),
                    offset: None,
                    file: s.code_info.as_ref().map(|c| c.to_path().display().to_string()),
                    line: s.code_info.as_ref().and_then(|c| c.line),
                    kernel,
                    reason: None,
                },
                Symbolized::Unknown(reason) => raw(ip, kernel, None, None, reason.to_string()),
            })
            .collect();
        // Unsymbolized user frames still get their module and file offset.
        if let Some(pid) = pid {
            let unknown: Vec<u64> = frames
                .iter()
                .zip(ips)
                .filter(|(f, _)| f.symbol.is_none())
                .map(|(_, &ip)| ip)
                .collect();
            if !unknown.is_empty() {
                if let Ok(norm) = self.normalizer.normalize_user_addrs(Pid::from(pid), &unknown) {
                    let mut it = norm.outputs.iter();
                    for f in frames.iter_mut().filter(|f| f.symbol.is_none()) {
                        if let Some(&(off, meta_idx)) = it.next() {
                            f.offset = Some(format!("{off:#x}"));
                            f.module = norm.meta.get(meta_idx).and_then(module_path);
                        }
                    }
                }
            }
        }
        frames
    }
}

fn module_path(meta: &blazesym::normalize::UserMeta<'_>) -> Option<String> {
    match meta {
        blazesym::normalize::UserMeta::Elf(e) => Some(e.path.display().to_string()),
        _ => None,
    }
}

fn raw(ip: u64, kernel: bool, module: Option<String>, offset: Option<String>, reason: String) -> Frame {
    Frame {
        ip: format!("{ip:#x}"),
        symbol: None,
        module,
        offset,
        file: None,
        line: None,
        kernel,
        reason: Some(reason),
    }
}

/// What a failed or missing stack id means, in words.
pub fn stack_id_error(id: i32) -> String {
    match id {
        NO_STACK => "not captured for this event".into(),
        STACKS_OFF => "not captured: stacks were off (--no-stacks)".into(),
        STACKS_SAMPLED_OUT => {
            "not captured: the process opened sockets faster than its stack budget (--stack-rate); counted in stacks_sampled_out".into()
        }
        x if x == -libc::EEXIST => "stack map full or hash collision: stack lost (counted in stack_errors)".into(),
        x if x == -libc::EFAULT => "stack could not be read".into(),
        x if x == -libc::ENOMEM => "stack map full: stack lost (counted in stack_errors)".into(),
        x => format!("stack capture failed (errno {})", -x),
    }
}
