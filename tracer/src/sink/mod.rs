//! Output, kept apart from collection: the live loop hands finished facts
//! to a [`Sink`], which only formats them.

#[cfg(test)]
mod golden_fixtures;
#[cfg(test)]
mod golden_tests;
mod json;
#[cfg(test)]
mod json_docs_tests;
pub mod metrics;
mod text;

use std::io;

use serde::Serialize;

pub use json::JsonSink;
pub use text::TextSink;

pub use crate::findings::{Group, LeakOut};
use crate::{
    correlate::CorrelatorStats,
    kernel::{compat::FallbackStatus, HookStatus, KernelStats},
};

#[derive(Debug, Serialize)]
pub struct Start {
    pub hooks: Vec<HookStatus>,
    pub filter_pid: Option<u32>,
    pub leak_after_ms: u64,
    pub preexisting_sockets: usize,
    /// The running kernel's release (live tracing only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Why existing sockets could not be read (sock_diag), if they could
    /// not: tracing goes on without them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_error: Option<String>,
    /// What this kernel lacks, and what the tracer does instead (live
    /// tracing only; empty on a kernel that has it all).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<FallbackStatus>,
}

/// One kernel event, for `--events`.
#[derive(Debug, Serialize)]
pub struct EventOut {
    pub time: String,
    pub kind: &'static str,
    pub cookie: u64,
    /// The task that was running: for a state change, often not the owner.
    pub task_pid: u32,
    pub task_tid: u32,
    pub task_comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub time: String,
    pub uptime_ms: u64,
    pub events: u64,
    pub sockets_tracked: usize,
    pub leaks_now: usize,
    pub ringbuf_drops: u64,
    /// Distinct stacks the live agent remembers, and its bound (beyond it,
    /// stacks are named again). Set by the live agent, the only writer of
    /// status lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stacks_held: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stacks_cap: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct SummaryStats {
    pub kernel: KernelStats,
    pub agent: CorrelatorStats,
    pub decode_errors: u64,
    /// Event records the live agent received from the ring buffer: with
    /// `kernel.ringbuf_drops`, they add up to `kernel.generated`. (With
    /// sockets followed in the kernel, `agent.events` also counts the
    /// events read from its CLOSE_WAIT map.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub duration_ms: u64,
    /// For `tracer report`: the files read and any damage found in them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recording: Option<RecordingInfo>,
    /// Why tracing stopped: "duration", "signal", "process_exit",
    /// "max_size" or "rotated" (a recording's), or for `report` the recorder's reason,
    /// "recording_ends_early" when the file has no end record. (A closed
    /// stdout ends tracing without a summary: nowhere to write it.)
    pub reason: &'static str,
    pub leaks: Vec<LeakOut>,
    pub groups: Vec<Group>,
    pub stats: SummaryStats,
}

/// Discards findings (recording shows progress instead).
pub struct NullSink;

impl Sink for NullSink {
    fn start(&mut self, _: &Start) -> io::Result<()> {
        Ok(())
    }
    fn loss(&mut self, _: &Loss) -> io::Result<()> {
        Ok(())
    }
    fn event(&mut self, _: &EventOut) -> io::Result<()> {
        Ok(())
    }
    fn leak(&mut self, _: &LeakOut) -> io::Result<()> {
        Ok(())
    }
    fn late_close(&mut self, _: &LeakOut, _: u64, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn status(&mut self, _: &Status) -> io::Result<()> {
        Ok(())
    }
    fn process_exit(&mut self, _: u32) -> io::Result<()> {
        Ok(())
    }
    fn summary(&mut self, _: &Summary) -> io::Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Default, Serialize)]
pub struct RecordingInfo {
    pub files: Vec<String>,
    pub records: u64,
    /// Damage found: corrupt records skipped, or an early end.
    pub damage: Vec<String>,
    /// The recording stops before its clean end (tracer killed, disk full).
    pub ended_early: bool,
}

/// Kernel-side losses grew: shown as they happen, never silently.
#[derive(Debug, Serialize)]
pub struct Loss {
    pub time: String,
    /// Totals so far.
    pub kernel: KernelStats,
    /// Events lost to a full ring buffer since the previous report.
    pub new_ringbuf_drops: u64,
}

pub trait Sink {
    fn start(&mut self, s: &Start) -> io::Result<()>;
    fn loss(&mut self, l: &Loss) -> io::Result<()>;
    fn event(&mut self, e: &EventOut) -> io::Result<()>;
    fn leak(&mut self, l: &LeakOut) -> io::Result<()>;
    fn late_close(&mut self, l: &LeakOut, closed_after_ms: u64, aborted: bool) -> io::Result<()>;
    fn status(&mut self, s: &Status) -> io::Result<()>;
    fn process_exit(&mut self, pid: u32) -> io::Result<()>;
    fn summary(&mut self, s: &Summary) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}
