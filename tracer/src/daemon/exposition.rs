//! The board as Prometheus metrics: built afresh for each scrape, so a
//! label set whose leaks have all closed is gone from the next scrape
//! instead of lingering at zero.
//!
//! Labels say *what* leaks (process name, container, role, port); pids,
//! fds, peer addresses and stacks never become labels (unbounded values),
//! and the number of label sets is bounded by `--max-series`, the rest
//! folded into one series labelled `comm="(other)"` and counted.

use std::{collections::HashMap, ops::RangeInclusive, time::Instant};

use prometheus_client::{
    encoding::{text, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::{Registry, Unit},
};

use crate::{
    correlate::OwnerSource,
    kernel::KernelStats,
    sink::metrics::{Board, OpenLeak},
};

/// The `comm` of the series the label sets beyond `--max-series` fold into.
pub const OVERFLOW_COMM: &str = "(other)";

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct LeakLabels {
    pub comm: String,
    /// The owner's 64-hex container id, or empty.
    pub container: String,
    /// `client` (it connected), `server` (it accepted) or `unknown`.
    pub role: String,
    /// The remote port for a client, the local port for a server.
    pub port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LossLabels {
    counter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Sums over the leaks of one label set.
#[derive(Clone, Copy, Debug, Default)]
struct LeakSums {
    sockets: i64,
    unread_bytes: i64,
    oldest_ms: u64,
}

impl LeakSums {
    fn add(&mut self, o: &LeakSums) {
        self.sockets += o.sockets;
        self.unread_bytes += o.unread_bytes;
        self.oldest_ms = self.oldest_ms.max(o.oldest_ms);
    }
}

/// The wire format a scraper asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    /// The Prometheus text format, version 0.0.4.
    Text,
}

impl Format {
    /// OpenMetrics when the `Accept` header names it (as Prometheus does),
    /// else the classic text format every scraper reads.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// What a leak is counted under: the owner's name and container, and
/// which side of the connection it is.
fn labels_of(l: &OpenLeak, ephemeral: &RangeInclusive<u16>) -> LeakLabels {
    let leak = &l.leak;
    let port = |addr: &str| addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
    let (local, remote) = (port(&leak.local), port(&leak.remote));
    let role = match leak.owner_source {
        Some(OwnerSource::Connect) => Some(true),
        Some(OwnerSource::Accept) => Some(false),
        // A socket the tracer did not see opened: a local port from the
        // ephemeral range (and a remote one outside it) is a client's.
        _ => match (local, remote) {
            (Some(l), Some(r)) if ephemeral.contains(&l) && !ephemeral.contains(&r) => Some(true),
            (Some(l), Some(r)) if ephemeral.contains(&r) && !ephemeral.contains(&l) => Some(false),
            _ => None,
        },
    };
    let (role, port) = match role {
        Some(true) => ("client", remote),
        Some(false) => ("server", local),
        None => ("unknown", None),
    };
    LeakLabels {
        comm: leak.comm.clone(),
        container: leak.container_id.clone().unwrap_or_default(),
        role: role.into(),
        port: port.map(|p| p.to_string()).unwrap_or_default(),
    }
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_ports() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some(it.next()??..=it.next()??)
        })
        .unwrap_or(32768..=60999)
}

/// The leaks per label set, at most `max_series` of them: the label sets
/// with the most leaks are kept, the rest folded into one. Returns the
/// series and how many label sets were folded.
fn leak_series(
    board: &Board,
    now: Instant,
    max_series: usize,
    ephemeral: &RangeInclusive<u16>,
) -> (Vec<(LeakLabels, LeakSums)>, usize) {
    let mut by_labels: HashMap<LeakLabels, LeakSums> = HashMap::new();
    for l in board.leaks.values() {
        by_labels.entry(labels_of(l, ephemeral)).or_default().add(&LeakSums {
            sockets: 1,
            unread_bytes: i64::from(l.leak.unread_bytes.unwrap_or(0)),
            oldest_ms: l.close_wait_ms(now),
        });
    }
    let mut series: Vec<_> = by_labels.into_iter().collect();
    if series.len() <= max_series {
        return (series, 0);
    }
    // Most leaks first; ties in label order, so the kept set is stable.
    series.sort_by(|a, b| b.1.sockets.cmp(&a.1.sockets).then_with(|| a.0.cmp(&b.0)));
    let keep = max_series.saturating_sub(1);
    let folded = series.split_off(keep);
    let mut other = LeakSums::default();
    for (_, s) in &folded {
        other.add(s);
    }
    series.push((
        LeakLabels {
            comm: OVERFLOW_COMM.into(),
            container: String::new(),
            role: String::new(),
            port: String::new(),
        },
        other,
    ));
    (series, folded.len())
}

/// The board as a registry, for one scrape.
pub fn registry(board: &Board, now: Instant, max_series: usize, ephemeral: &RangeInclusive<u16>) -> Registry {
    let mut r = Registry::default();
    let (series, folded) = leak_series(board, now, max_series, ephemeral);

    let sockets = Family::<LeakLabels, Gauge>::default();
    let unread = Family::<LeakLabels, Gauge>::default();
    let oldest = Family::<LeakLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for (labels, sums) in &series {
        sockets.get_or_create(labels).set(sums.sockets);
        unread.get_or_create(labels).set(sums.unread_bytes);
        oldest.get_or_create(labels).set(sums.oldest_ms as f64 / 1000.0);
    }
    r.register(
        "tracer_leaked_sockets",
        "Sockets leaked now: in CLOSE_WAIT past --leak-after, not closed by their owner",
        sockets,
    );
    r.register_with_unit(
        "tracer_leaked_unread",
        "Bytes received and never read on the sockets leaked now, summed (as of each leak's report)",
        Unit::Bytes,
        unread,
    );
    r.register_with_unit(
        "tracer_leaked_oldest",
        "How long the oldest socket leaked now has been in CLOSE_WAIT",
        Unit::Seconds,
        oldest,
    );
    let folded_gauge = Gauge::<i64>::default();
    folded_gauge.set(folded as i64);
    r.register(
        "tracer_leak_series_folded",
        "Label sets beyond --max-series, folded into the series with comm=\"(other)\"",
        folded_gauge,
    );

    counter(
        &mut r,
        "tracer_leaks",
        "Leaks reported since the daemon started",
        board.leaks_total,
    );
    counter(
        &mut r,
        "tracer_late_closes",
        "Reported leaks whose socket was closed later (or its owner exited)",
        board.late_closes_total,
    );
    let status = board.status.unwrap_or_default();
    counter(
        &mut r,
        "tracer_events",
        "Kernel events the agent analysed",
        status.events,
    );
    counter(
        &mut r,
        "tracer_ringbuf_drops",
        "Kernel events lost to a full ring buffer",
        board.kernel.ringbuf_drops.max(status.ringbuf_drops),
    );
    let lost = Family::<LossLabels, Counter>::default();
    for (name, value) in losses(&board.kernel) {
        lost.get_or_create(&LossLabels { counter: name }).inc_by(value);
    }
    r.register(
        "tracer_lost",
        "Everything lost or cut short, per kernel-side counter (see docs/json.md, kernel_stats)",
        lost,
    );
    let tracked = Gauge::<i64>::default();
    tracked.set(status.sockets_tracked as i64);
    r.register("tracer_sockets_tracked", "Sockets the agent tracks now", tracked);
    let ready = Gauge::<i64>::default();
    ready.set(i64::from(board.ready));
    r.register(
        "tracer_ready",
        "1 once the eBPF programs are attached and the start-up snapshot is read",
        ready,
    );
    r.register(
        "tracer_build",
        "The tracer's version",
        Info::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
        }),
    );
    r
}

fn counter(r: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    r.register(name, help, c);
}

/// Every kernel-side loss counter, by its name in `kernel_stats`.
fn losses(k: &KernelStats) -> [(&'static str, u64); 9] {
    [
        ("ringbuf_drops", k.ringbuf_drops),
        ("hook_misses", k.hook_misses),
        ("stack_errors", k.stack_errors),
        ("watch_full", k.watch_full),
        ("reported_full", k.reported_full),
        ("owners_full", k.owners_full),
        ("ids_full", k.ids_full),
        ("fd_unresolved", k.fd_unresolved),
        ("close_range_truncated", k.close_range_truncated),
    ]
}

/// The registry in `format`.
pub fn encode(r: &Registry, format: Format) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = match format {
        Format::OpenMetrics => text::encode(&mut out, r),
        Format::Text => prometheus_client::encoding::prometheus_text::encode(&mut out, r),
    };
    out
}

#[cfg(test)]
#[path = "exposition_tests.rs"]
mod tests;
