//! Leak evidence gathered off the drain loop.

use std::collections::HashMap;
#[cfg(debug_assertions)]
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::evidence::{self, Evidence, Wanted};

/// An evidence gathering running on a worker thread: a sock_diag dump and
/// a scan of every process's fds take long on a big host, and the ring
/// buffer must keep being drained meanwhile.
pub(super) struct EvidenceJob {
    /// The sweep time the gathering is for.
    pub(super) ns: u64,
    handle: JoinHandle<HashMap<u64, Evidence>>,
}

pub(super) fn spawn_evidence(want: Wanted, ns: u64) -> EvidenceJob {
    let handle = tokio::task::spawn_blocking(move || {
        // Lets a test show that a slow gathering does not stop the drain.
        #[cfg(debug_assertions)]
        if let Some(ms) = std::env::var("TRACER_TEST_EVIDENCE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
        evidence::gather(&want)
    });
    EvidenceJob { ns, handle }
}

/// The sweep time and result of the running evidence job, when it ends.
pub(super) async fn wait_evidence(job: &mut Option<EvidenceJob>) -> (u64, HashMap<u64, Evidence>) {
    let Some(j) = job.as_mut() else {
        return std::future::pending().await;
    };
    let ns = j.ns;
    let found = (&mut j.handle).await.unwrap_or_else(|e| {
        log::warn!("gathering leak evidence failed: {e}");
        HashMap::new()
    });
    *job = None;
    (ns, found)
}
