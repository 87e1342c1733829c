//! Everything the analysis consumes, from whichever source: the kernel and
//! /proc while tracing live, or a recording. `tracer live`, `record` and
//! `report` differ only in where these come from and where results go.

use serde::{Deserialize, Serialize};

use crate::{correlate::SnapshotSocket, decode::Event, evidence::Evidence, kernel::KernelStats, procs::ProcInfo};

pub use crate::stacks::{StackInput, StackKey};

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

/// Process names and stacks the live agent has forgotten (nothing referred
/// to them); it sends them again if they are needed later.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetInput {
    pub ns: u64,
    pub pids: Vec<u32>,
    pub stacks: Vec<StackKey>,
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
    /// Names and stacks the live agent forgot; a replay forgets them too.
    Forget(ForgetInput),
}
