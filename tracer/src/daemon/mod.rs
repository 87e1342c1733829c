//! `tracer daemon`: the live tracer, run for as long as the host runs,
//! with its findings served over HTTP for Prometheus (`/metrics`), probes
//! (`/healthz`) and people (`/leaks`). Tracing is exactly `tracer live`'s
//! (sockets followed in the kernel, the one engine); only the sink
//! differs ([`crate::sink::metrics`]).

mod exposition;
mod server;

use anyhow::{Context as _, Result};
use tokio::net::TcpListener;

use crate::{
    cli::DaemonArgs,
    live::{self, Output},
    sink::metrics::SharedBoard,
};

pub async fn run(args: DaemonArgs) -> Result<()> {
    // Bound first: a port in use fails before the (slow) load.
    let listener = TcpListener::bind(args.listen).await.with_context(|| {
        format!(
            "cannot listen on {} (is another daemon running there? choose another --listen)",
            args.listen
        )
    })?;
    let board = SharedBoard::default();
    let server = tokio::spawn(server::serve(listener, board.clone(), args.max_series as usize));
    let result = live::run(args.trace, Output::Daemon { board }).await;
    server.abort();
    result
}
