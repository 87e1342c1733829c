//! The soak's figures as markdown: one table of figures against their
//! criteria, one of the tracer's state over time.

use std::fmt::Write as _;

use crate::figures::{Figures, MIN_STACK_SHARE, RSS_GROWTH_MIB, RSS_GROWTH_SHARE};
use crate::rss::median;

/// At most this many rows in the table over time.
const TIME_ROWS: f64 = 20.0;

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "n/a".into())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "**FAILED**"
    }
}

pub fn markdown(f: &Figures) -> String {
    let s = &f.settings;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Soak: {:.1} min of load (`tracer live --json --leak-after {} --status-interval {}`, host-wide)\n",
        f.seconds / 60.0,
        s.leak_after,
        s.status_interval
    );
    let churn = f.churn.as_ref().map_or("n/a".to_owned(), |c| {
        format!(
            "{} connections at {:.0}/s ({} errors)",
            c["connections"],
            c["conn_per_sec"].as_f64().unwrap_or(0.0),
            c["errors"]
        )
    });
    let idle = f.churn.as_ref().and_then(|c| c["idle_open"].as_u64());
    let _ = writeln!(
        out,
        "Load: churn paced at {}/s: {churn}; {} idle connections held open ({} sockets); \
         {} leaking processes per second, each holding its socket in CLOSE_WAIT {} s.\n",
        s.churn_rate,
        opt(idle, |n| n.to_string()),
        opt(idle, |n| (2 * n).to_string()),
        s.leakers_per_sec,
        s.hold_s
    );

    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut row = |a: &str, b: String, c: String| rows.push((a.to_owned(), b, c));
    let lk = &f.leakers;
    row(
        "leaking processes started",
        format!(
            "{} ({} reached CLOSE_WAIT; at most {} alive at once)",
            lk.started, lk.confirmed, lk.max_alive
        ),
        format!(
            "all leak: {}",
            verdict(lk.no_close_wait + lk.failed + lk.spawn_errors == 0)
        ),
    );
    let l = &f.leaks;
    row(
        "leaks found (theirs)",
        format!("{} / {} (missed {})", l.found, l.expected, l.missed),
        format!("all: {}", verdict(l.missed == 0 && l.expected > 0)),
    );
    row(
        "... with their open stack",
        format!(
            "{} ({})",
            l.with_stack,
            opt(l.stack_share, |s| format!("{:.2}%", s * 100.0))
        ),
        format!(
            "≥ {:.0}%: {}",
            MIN_STACK_SHARE * 100.0,
            verdict(l.stack_share.is_some_and(|s| s >= MIN_STACK_SHARE))
        ),
    );
    row(
        "... naming loadgen's connect",
        l.naming_connect.to_string(),
        String::new(),
    );
    for (why, n) in &l.stack_errors {
        row("... without: reason", format!("{n}× {why}"), String::new());
    }
    row(
        "... reported twice",
        l.reported_twice.to_string(),
        format!("0: {}", verdict(l.reported_twice == 0)),
    );
    row(
        "... reported after (CLOSE_WAIT age)",
        format!(
            "median {}, max {}",
            opt(l.reported_after_ms_median, |ms| format!("{:.2} s", ms as f64 / 1e3)),
            opt(l.reported_after_ms_max, |ms| format!("{:.2} s", ms as f64 / 1e3))
        ),
        String::new(),
    );
    row(
        "late closes (theirs, at exit)",
        l.leaker_late_closes.to_string(),
        String::new(),
    );
    row("other leaks on the host", l.other_leaks.to_string(), String::new());
    row(
        "ring-buffer drops",
        opt(f.ringbuf_drops, |d| d.to_string()),
        format!("0: {}", verdict(f.ringbuf_drops == Some(0))),
    );
    row("loss lines while tracing", f.loss_lines.to_string(), String::new());
    for (name, n) in &f.stats {
        row(&format!("stats.{name}"), n.to_string(), String::new());
    }
    let r = &f.rss;
    row(
        "agent RSS (MiB)",
        format!(
            "first {}, median {}, max {}, last {}",
            opt(r.first_mib, |v| format!("{v:.1}")),
            opt(r.median_mib, |v| format!("{v:.1}")),
            opt(r.max_mib, |v| format!("{v:.1}")),
            opt(r.last_mib, |v| format!("{v:.1}"))
        ),
        String::new(),
    );
    let flat = match (r.second_half_growth_mib, r.median_mib) {
        (Some(g), Some(m)) => !(g > RSS_GROWTH_MIB && g > RSS_GROWTH_SHARE * m),
        _ => false,
    };
    row(
        "agent RSS, second half",
        format!(
            "{} MiB/min ({} MiB over {} s)",
            opt(r.second_half_mib_per_min, |v| format!("{v:+.2}")),
            opt(r.second_half_growth_mib, |v| format!("{v:+.1}")),
            opt(r.second_half_seconds, |v| format!("{v:.0}"))
        ),
        format!(
            "≤ {RSS_GROWTH_MIB} MiB or {:.0}%: {}",
            RSS_GROWTH_SHARE * 100.0,
            verdict(flat)
        ),
    );
    let tracked: Vec<f64> = f
        .status
        .iter()
        .filter_map(|s| s.status.sockets_tracked)
        .map(|n| n as f64)
        .collect();
    row(
        "sockets tracked",
        format!(
            "first {}, median {}, max {}, last {}",
            opt(tracked.first(), |v| format!("{v:.0}")),
            opt(median(&tracked), |v| format!("{v:.0}")),
            opt(tracked.iter().copied().reduce(f64::max), |v| format!("{v:.0}")),
            opt(tracked.last(), |v| format!("{v:.0}"))
        ),
        String::new(),
    );
    row("stack table (held / cap)", stacks_line(f), String::new());
    row("tracer exit after SIGINT", f.tracer_exit.clone(), String::new());

    let _ = writeln!(out, "| figure | value | criterion |\n|---|---|---|");
    for (a, b, c) in rows {
        let _ = writeln!(out, "| {a} | {b} | {c} |");
    }
    out.push('\n');
    over_time(f, &mut out);
    if f.failures.is_empty() {
        let _ = writeln!(out, "\nAll criteria met.");
    } else {
        let _ = writeln!(out, "\nFailed:");
        for why in &f.failures {
            let _ = writeln!(out, "- {why}");
        }
    }
    out
}

fn stacks_line(f: &Figures) -> String {
    if !f.stack_table_reported {
        return "n/a (tracer too old)".into();
    }
    let held: Vec<f64> = f
        .status
        .iter()
        .filter_map(|s| s.status.stacks_held)
        .map(|n| n as f64)
        .collect();
    let cap = f.status.iter().rev().find_map(|s| s.status.stacks_cap);
    format!(
        "held: first {}, median {}, max {}, last {}; cap {}",
        opt(held.first(), |v| format!("{v:.0}")),
        opt(median(&held), |v| format!("{v:.0}")),
        opt(held.iter().copied().reduce(f64::max), |v| format!("{v:.0}")),
        opt(held.last(), |v| format!("{v:.0}")),
        opt(cap, |v| v.to_string())
    )
}

/// The status lines (and the RSS sample nearest each), thinned to about
/// [`TIME_ROWS`] rows.
fn over_time(f: &Figures, out: &mut String) {
    let _ = writeln!(
        out,
        "| t (s) | agent RSS (MiB) | sockets tracked | leaks now | events | stacks held / cap |\n|--:|--:|--:|--:|--:|--:|"
    );
    let step = (f.seconds / TIME_ROWS).max(1.0);
    let mut next = f64::NEG_INFINITY;
    for (i, s) in f.status.iter().enumerate() {
        if s.t_s < next && i + 1 != f.status.len() {
            continue;
        }
        next = s.t_s + step;
        let rss = f
            .rss
            .samples
            .iter()
            .min_by(|a, b| (a.0 - s.t_s).abs().total_cmp(&(b.0 - s.t_s).abs()))
            .map(|&(_, k)| k as f64 / 1024.0);
        let st = &s.status;
        let stacks = match (st.stacks_held, st.stacks_cap) {
            (Some(h), Some(c)) => format!("{h} / {c}"),
            (Some(h), None) => h.to_string(),
            _ => "n/a".into(),
        };
        let _ = writeln!(
            out,
            "| {:.0} | {} | {} | {} | {} | {stacks} |",
            s.t_s,
            opt(rss, |v| format!("{v:.1}")),
            opt(st.sockets_tracked, |v| v.to_string()),
            opt(st.leaks_now, |v| v.to_string()),
            opt(st.events, |v| v.to_string()),
        );
    }
}
