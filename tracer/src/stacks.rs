//! Stack ids from the kernel -> symbolized frames, done while the process
//! is alive (by the time a leak is reported or a recording is analysed it
//! may be gone). blazesym reads ELF symbols, DWARF file:line, perf maps
//! (`/tmp/perf-PID.map`, for JIT frames) and kallsyms.

use std::{collections::HashMap, sync::Arc};

use blazesym::{
    normalize::Normalizer,
    symbolize::{
        source::{Kernel as KernelSource, Process, Source},
        Input, Symbolized, Symbolizer,
    },
    MaybeDefault, Pid,
};
use serde::Serialize;
use tracer_common::NO_STACK;

use crate::{correlate::StackRef, kernel::Kernel};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Frames of one stack, innermost first, or why there are none.
pub type Stack = Arc<Result<Vec<Frame>, String>>;

/// Cache of symbolized stacks: each (pid, stack id) is symbolized once.
/// Bounded: cleared when full (entries are cheap to recompute while the
/// process lives).
pub struct StackStore {
    symbolizer: Symbolizer,
    normalizer: Normalizer,
    user: HashMap<(u32, i32), Stack>,
    kernel: HashMap<i32, Stack>,
    cap: usize,
}

impl StackStore {
    pub fn new(cap: usize) -> Self {
        StackStore {
            symbolizer: Symbolizer::new(),
            normalizer: Normalizer::new(),
            user: HashMap::new(),
            kernel: HashMap::new(),
            cap,
        }
    }

    /// Symbolizes (once) the stacks an event refers to.
    pub fn learn(&mut self, k: &Kernel, r: StackRef) {
        let _ = self.user(k, r.pid, r.ustack);
        let _ = self.kernel(k, r.kstack);
    }

    /// User frames then kernel frames (each innermost first), or the reason
    /// there is no user stack.
    pub fn frames(&mut self, k: &Kernel, r: Option<StackRef>) -> (Vec<Frame>, Option<String>) {
        let Some(r) = r else {
            return (Vec::new(), Some("the socket predates the tracer".into()));
        };
        let user = self.user(k, r.pid, r.ustack);
        let kern = self.kernel(k, r.kstack);
        let mut frames = Vec::new();
        let mut error = None;
        match user.as_ref() {
            Ok(f) => frames.extend(f.iter().cloned()),
            Err(e) => error = Some(e.clone()),
        }
        if let Ok(f) = kern.as_ref() {
            frames.extend(f.iter().cloned());
        }
        (frames, error)
    }

    fn user(&mut self, k: &Kernel, pid: u32, id: i32) -> Stack {
        if let Some(s) = self.user.get(&(pid, id)) {
            return s.clone();
        }
        if self.user.len() >= self.cap {
            self.user.clear();
        }
        let s = Arc::new(k.stack_ips(id).map_err(|e| e.to_string()).and_then(|ips| {
            let src = Source::Process(Process::new(Pid::from(pid)));
            Ok(self.symbolize(&src, &ips, false, Some(pid)))
        }));
        self.user.insert((pid, id), s.clone());
        s
    }

    fn kernel(&mut self, k: &Kernel, id: i32) -> Stack {
        if let Some(s) = self.kernel.get(&id) {
            return s.clone();
        }
        if self.kernel.len() >= self.cap {
            self.kernel.clear();
        }
        let s = Arc::new(k.stack_ips(id).map_err(|e| e.to_string()).map(|ips| {
            let src = Source::Kernel(KernelSource {
                // kallsyms is enough for function names; a vmlinux with
                // DWARF would add lines but costs seconds to load.
                vmlinux: MaybeDefault::None,
                debug_syms: false,
                ..KernelSource::default()
            });
            let mut frames = self.symbolize(&src, &ips, true, None);
            // The innermost kernel frames are the tracer's own program and
            // the tracepoint plumbing that ran it: not the socket's story.
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
        }));
        self.kernel.insert(id, s.clone());
        s
    }

    fn symbolize(&self, src: &Source, ips: &[u64], kernel: bool, pid: Option<u32>) -> Vec<Frame> {
        // Return addresses point after the call; look up the call itself.
        let lookup: Vec<u64> = ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| if i == 0 { ip } else { ip - 1 })
            .collect();
        let syms = match self.symbolizer.symbolize(src, Input::AbsAddr(&lookup)) {
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
        x if x == -libc::EEXIST => "stack map full or hash collision: stack lost (counted in stack_errors)".into(),
        x if x == -libc::EFAULT => "stack could not be read".into(),
        x if x == -libc::ENOMEM => "stack map full: stack lost (counted in stack_errors)".into(),
        x => format!("stack capture failed (errno {})", -x),
    }
}
