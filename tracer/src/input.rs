//! Everything the analysis consumes, from whichever source: the kernel and
//! /proc while tracing live, or a recording. `tracer live`, `record` and
//! `report` differ only in where these come from and where results go.

use serde::{Deserialize, Serialize};

use crate::{
    correlate::SnapshotSocket, decode::Event, evidence::Evidence, kernel::KernelStats, procs::ProcInfo, stacks::Frame,
};

/// Identifies a captured stack: user stacks are per process, kernel stacks
/// (`pid` 0) are global.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StackKey {
    pub pid: u32,
    pub id: i32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StackInput {
    pub key: StackKey,
    pub frames: Result<Vec<Frame>, String>,
    /// Why the stack ends before its outermost frame, when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessInput {
    pub pid: u32,
    #[serde(flatten)]
    pub info: ProcInfo,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotInput {
    pub ns: u64,
    pub sockets: Vec<SnapshotSocket>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvidenceInput {
    pub ns: u64,
    pub items: Vec<(u64, Evidence)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsInput {
    pub ns: u64,
    pub kernel: KernelStats,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExitInput {
    pub ns: u64,
    pub pid: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndInput {
    pub ns: u64,
    pub reason: String,
}

#[derive(Clone, Debug)]
pub enum Input {
    Kernel(Event),
    Process(ProcessInput),
    Stack(StackInput),
    Snapshot(SnapshotInput),
    Evidence(EvidenceInput),
    /// The agent's clock (CLOCK_MONOTONIC ns): time passes, sweep for leaks.
    Tick(u64),
    Stats(StatsInput),
    ProcessExit(ExitInput),
    End(EndInput),
}
