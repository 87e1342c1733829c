//! Native frames (ELF symbols, DWARF file:line, kallsyms) by blazesym.

use std::collections::HashSet;

use blazesym::{
    normalize::Normalizer,
    symbolize::{
        source::{Kernel as KernelSource, Process, Source},
        Input as SymInput, Symbolized, Symbolizer,
    },
    MaybeDefault, Pid,
};

use super::{Frame, FrameKind};
use crate::privileges::{self, Denied};

/// Processes symbolized before blazesym's caches are renewed. Its parsed
/// files are shared by all processes, but it also remembers each
/// process's `/proc/PID/map_files/...` paths, for ever: over weeks of
/// short-lived processes that grows without bound. Renewing costs parsing
/// the files in use again, once per this many processes.
const RENEW_AFTER: usize = 4096;

pub struct NativeSymbolizer {
    symbolizer: Symbolizer,
    normalizer: Normalizer,
    processes: HashSet<u32>,
}

impl NativeSymbolizer {
    pub fn new() -> Self {
        NativeSymbolizer {
            symbolizer: Symbolizer::new(),
            normalizer: Normalizer::new(),
            processes: HashSet::new(),
        }
    }

    /// A process whose frames are about to be named.
    pub fn note_process(&mut self, pid: u32) {
        if self.processes.insert(pid) && self.processes.len() > RENEW_AFTER {
            self.symbolizer = Symbolizer::new();
            self.normalizer = Normalizer::new();
            self.processes.clear();
            self.processes.insert(pid);
        }
    }

    /// `ips[i]` is a return address (looked up at `ip - 1`) where
    /// `is_return[i]`. A perf map (`/tmp/perf-PID.map`) is used unless
    /// `perf_map` is false: a JVM's is HotSpot's format, which blazesym's
    /// parser rejects (and one bad map would fail every frame), and its JIT
    /// frames are named from the JVM itself.
    pub fn user(&self, pid: u32, ips: &[u64], is_return: &[bool], perf_map: bool) -> Vec<Frame> {
        let mut p = Process::new(Pid::from(pid));
        p.perf_map = perf_map;
        // Without access to map_files (CAP_CHECKPOINT_RESTORE), the paths
        // /proc/PID/maps names, opened from here, are the next best: wrong
        // only for a binary replaced on disk since the process started.
        p.map_files = !privileges::warned(Denied::MapFiles);
        let frames = self.symbolize(&Source::Process(p), ips, is_return, FrameKind::Native);
        if perf_map
            && frames
                .iter()
                .any(|f| f.reason.as_deref().is_some_and(|r| r.contains("perf map")))
        {
            // An unreadable perf map must not cost the ELF frames.
            let mut frames = self.user(pid, ips, is_return, false);
            for f in frames.iter_mut().filter(|f| f.symbol.is_none()) {
                f.reason = Some(format!(
                    "{} (/tmp/perf-{pid}.map could not be parsed)",
                    f.reason.as_deref().unwrap_or("not symbolized")
                ));
            }
            return frames;
        }
        self.with_offsets(pid, frames, ips)
    }

    pub fn kernel(&self, ips: &[u64]) -> Vec<Frame> {
        let src = Source::Kernel(KernelSource {
            // kallsyms is enough for function names; a vmlinux with DWARF
            // would add lines but costs seconds to load.
            vmlinux: MaybeDefault::None,
            debug_syms: false,
            ..KernelSource::default()
        });
        let is_return: Vec<bool> = (0..ips.len()).map(|i| i > 0).collect();
        let mut frames = self.symbolize(&src, ips, &is_return, FrameKind::Kernel);
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

    fn symbolize(&self, src: &Source, ips: &[u64], is_return: &[bool], kind: FrameKind) -> Vec<Frame> {
        // Return addresses point after the call; look up the call itself.
        let lookup: Vec<u64> = ips
            .iter()
            .zip(is_return)
            .map(|(&ip, &ret)| if ret { ip.saturating_sub(1) } else { ip })
            .collect();
        let syms = match self.symbolizer.symbolize(src, SymInput::AbsAddr(&lookup)) {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("symbolization failed: {e}");
                return ips.iter().map(|&ip| Frame::raw(ip, kind, reason.clone())).collect();
            }
        };
        ips.iter()
            .zip(syms)
            .map(|(&ip, sym)| match sym {
                Symbolized::Sym(s) => Frame {
                    ip: format!("{ip:#x}"),
                    symbol: Some(s.name.to_string()),
                    module: s.module.map(|m| m.to_string_lossy().into_owned()),
                    offset: None,
                    file: s.code_info.as_ref().map(|c| c.to_path().display().to_string()),
                    line: s.code_info.as_ref().and_then(|c| c.line),
                    kernel: kind == FrameKind::Kernel,
                    kind,
                    reason: None,
                },
                Symbolized::Unknown(reason) => Frame::raw(ip, kind, reason.to_string()),
            })
            .collect()
    }

    /// Unsymbolized user frames still get their module and file offset.
    fn with_offsets(&self, pid: u32, mut frames: Vec<Frame>, ips: &[u64]) -> Vec<Frame> {
        let unknown: Vec<u64> = frames
            .iter()
            .zip(ips)
            .filter(|(f, _)| f.symbol.is_none())
            .map(|(_, &ip)| ip)
            .collect();
        if unknown.is_empty() {
            return frames;
        }
        if let Ok(norm) = self.normalizer.normalize_user_addrs(Pid::from(pid), &unknown) {
            let mut it = norm.outputs.iter();
            for f in frames.iter_mut().filter(|f| f.symbol.is_none()) {
                if let Some(&(off, meta_idx)) = it.next() {
                    f.offset = Some(format!("{off:#x}"));
                    f.module = norm.meta.get(meta_idx).and_then(module_path);
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
