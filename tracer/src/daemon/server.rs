//! The daemon's HTTP endpoints, served by hyper on the agent's own tokio
//! runtime: `/metrics`, `/healthz` and `/leaks`. Each request only reads
//! the board under its lock; nothing here touches the kernel.

use std::{convert::Infallible, ops::RangeInclusive, sync::Arc, time::Duration, time::Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    header::{ACCEPT, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::exposition::{self, Format};
use crate::sink::metrics::SharedBoard;

/// A client that sends no complete request head within this is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What every request handler reads.
struct Served {
    board: SharedBoard,
    max_series: usize,
    ephemeral: RangeInclusive<u16>,
}

/// Serves until the runtime ends (the daemon's shutdown). A failed accept
/// (out of fds) is logged and retried after a pause, never fatal.
pub async fn serve(listener: TcpListener, board: SharedBoard, max_series: usize) {
    let served = Arc::new(Served {
        board,
        max_series,
        ephemeral: exposition::ephemeral_ports(),
    });
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("accepting an HTTP connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let served = served.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let served = served.clone();
                async move { Ok::<_, Infallible>(handle(&req, &served)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                log::debug!("HTTP connection: {e}");
            }
        });
    }
}

fn handle(req: &Request<Incoming>, served: &Served) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let format = Format::from_accept(req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()));
            let registry = {
                let board = served.board.lock();
                exposition::registry(&board, Instant::now(), served.max_series, &served.ephemeral)
            };
            reply(
                StatusCode::OK,
                format.content_type(),
                exposition::encode(&registry, format),
            )
        }
        "/healthz" => {
            if served.board.lock().ready {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "starting\n".into())
            }
        }
        "/leaks" => {
            let now = Instant::now();
            let leaks: Vec<_> = {
                let board = served.board.lock();
                let mut v: Vec<_> = board
                    .leaks
                    .values()
                    .map(|l| {
                        let mut out = l.leak.clone();
                        out.close_wait_ms = l.close_wait_ms(now);
                        out
                    })
                    .collect();
                v.sort_by_key(|l| std::cmp::Reverse(l.close_wait_ms));
                v
            };
            match serde_json::to_string(&leaks) {
                Ok(mut body) => {
                    body.push('\n');
                    reply(StatusCode::OK, "application/json", body)
                }
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n")),
            }
        }
        "/" => reply(
            StatusCode::OK,
            "text/plain",
            "tracer daemon: /metrics, /healthz, /leaks\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}
