//! From what was measured to the soak's figures, and the criteria they
//! must meet: every leak of the leaking processes found, ≥ 99% of them with
//! their open stack, no ring-buffer drop, agent memory flat over the second
//! half of the run.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::leakers::Tally;
use crate::output::Output;
use crate::rss::{rss, Rss};

/// Least share of the leaks found that must carry their open stack.
pub const MIN_STACK_SHARE: f64 = 0.99;
/// RSS growth over the second half of the run that counts as "growing":
/// more than this many MiB *and* more than [`RSS_GROWTH_SHARE`] of the
/// median. Below both it is allocator noise (glibc returns freed memory to
/// the kernel late and in steps of a MiB or more); a real per-process or
/// per-socket leak at the soak's rates grows far faster.
pub const RSS_GROWTH_MIB: f64 = 2.0;
pub const RSS_GROWTH_SHARE: f64 = 0.02;

#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub minutes: f64,
    pub leak_after: String,
    pub status_interval: String,
    pub idle_connections: usize,
    pub churn_rate: f64,
    pub leakers_per_sec: f64,
    pub hold_s: f64,
}

/// What the run produced, for [`judge`].
pub struct Measured<'a> {
    pub settings: &'a Settings,
    /// From the load's start ("go") to the tracer's SIGINT.
    pub seconds: f64,
    /// (seconds since go, VmRSS KiB).
    pub rss: &'a [(f64, u64)],
    pub output: &'a Output,
    /// The tracer's uptime at go: status lines are timed from its start.
    pub status_offset_s: f64,
    pub tally: &'a Tally,
    /// How the tracer ended after SIGINT; Err when it had died before, or
    /// had to be killed.
    pub tracer_exit: Result<String, String>,
    pub client_result: Option<Value>,
}

#[derive(Debug, Default, Serialize)]
pub struct Leaks {
    /// Leaking processes whose socket reached CLOSE_WAIT and stayed so for
    /// the hold time: the leaks to find.
    pub expected: u64,
    pub found: u64,
    pub missed: u64,
    pub missed_pids: Vec<u32>,
    /// Processes with more than one `leak` line for their one socket.
    pub reported_twice: u64,
    /// `leak` lines to the reply server from processes not counted above.
    pub unexpected: u64,
    pub with_stack: u64,
    pub stack_share: Option<f64>,
    /// Of those with a stack, how many name loadgen's connect function.
    pub naming_connect: u64,
    /// Why the others had no stack, with counts.
    pub stack_errors: BTreeMap<String, u64>,
    /// CLOSE_WAIT age when reported (the report's delay after the FIN).
    pub reported_after_ms_median: Option<u64>,
    pub reported_after_ms_max: Option<u64>,
    pub leaker_late_closes: u64,
    pub other_leaks: u64,
}

/// A status line, timed from go.
#[derive(Debug, Serialize)]
pub struct StatusAt {
    pub t_s: f64,
    #[serde(flatten)]
    pub status: crate::output::Status,
}

#[derive(Debug, Serialize)]
pub struct Figures {
    pub settings: Settings,
    pub seconds: f64,
    pub churn: Option<Value>,
    pub leakers: LeakersOut,
    pub leaks: Leaks,
    /// Every counter of the summary's `stats` (kernel, agent, decode
    /// errors), by dotted name.
    pub stats: BTreeMap<String, u64>,
    pub ringbuf_drops: Option<u64>,
    pub loss_lines: u64,
    pub rss: Rss,
    pub status: Vec<StatusAt>,
    /// Whether the tracer's status lines carry stacks_held/stacks_cap.
    pub stack_table_reported: bool,
    pub tracer_exit: String,
    pub bad_output_lines: u64,
    pub failures: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct LeakersOut {
    pub started: u64,
    pub confirmed: u64,
    pub no_close_wait: u64,
    pub failed: u64,
    pub spawn_errors: u64,
    pub max_alive: usize,
    pub first_problem: Option<String>,
}

pub fn judge(m: &Measured) -> Figures {
    let mut failures = Vec::new();
    let t = m.tally;
    let leakers = LeakersOut {
        started: t.started,
        confirmed: t.confirmed.len() as u64,
        no_close_wait: t.no_close_wait,
        failed: t.failed,
        spawn_errors: t.spawn_errors,
        max_alive: t.max_alive,
        first_problem: t.first_problem.clone(),
    };
    let not_as_planned = t.no_close_wait + t.failed + t.spawn_errors;
    if not_as_planned > 0 {
        failures.push(format!(
            "{not_as_planned} of {} leaking processes did not leak as planned (first: {}); their log is leakers.log",
            t.started + t.spawn_errors,
            t.first_problem.as_deref().unwrap_or("?")
        ));
    }

    let leaks = leaks(m);
    if leaks.expected == 0 {
        failures.push("no leaking process confirmed its leak: nothing was measured".into());
    }
    if leaks.missed > 0 {
        failures.push(format!(
            "{} of {} leaks missed (not reported while their process lived), e.g. pids {:?}",
            leaks.missed, leaks.expected, leaks.missed_pids
        ));
    }
    match leaks.stack_share {
        Some(share) if share < MIN_STACK_SHARE => failures.push(format!(
            "only {:.2}% of the leaks found carry their open stack (at least {:.0}% must); reasons: {:?}",
            share * 100.0,
            MIN_STACK_SHARE * 100.0,
            leaks.stack_errors
        )),
        Some(_) => {}
        None if leaks.expected > 0 => failures.push("no leak found, so no stack share".into()),
        None => {}
    }
    if leaks.reported_twice > 0 {
        failures.push(format!(
            "{} leaking processes had their one leak reported more than once",
            leaks.reported_twice
        ));
    }

    let summary = m.output.summary.as_ref();
    let stats = summary.map(|s| counters(&s["stats"])).unwrap_or_default();
    let ringbuf_drops = stats
        .get("kernel.ringbuf_drops")
        .copied()
        .or_else(|| m.output.statuses.last().and_then(|s| s.ringbuf_drops));
    match ringbuf_drops {
        Some(0) => {}
        Some(d) => failures.push(format!("{d} events dropped by a full ring buffer")),
        None => failures.push("no ring-buffer drop count (no summary, no status line)".into()),
    }
    if summary.is_none() {
        failures.push("the tracer printed no summary".into());
    }
    let tracer_exit = match &m.tracer_exit {
        Ok(how) => {
            if how != "exit code 0" {
                failures.push(format!("the tracer ended with {how} after SIGINT"));
            }
            how.clone()
        }
        Err(why) => {
            failures.push(format!("the tracer: {why}"));
            why.clone()
        }
    };
    if m.output.bad_lines > 0 {
        failures.push(format!(
            "{} stdout lines of the tracer are not JSON objects, the first: {:?}",
            m.output.bad_lines,
            m.output.first_bad_line.as_deref().unwrap_or("")
        ));
    }

    let rss = rss(m.rss);
    match (rss.second_half_growth_mib, rss.median_mib) {
        (Some(growth), Some(median)) if growth > RSS_GROWTH_MIB && growth > RSS_GROWTH_SHARE * median => {
            failures.push(format!(
                "agent RSS grows over the second half: {growth:+.1} MiB in {:.0} s ({:+.2} MiB/min; median {median:.1} MiB)",
                rss.second_half_seconds.unwrap_or(0.0),
                rss.second_half_mib_per_min.unwrap_or(0.0)
            ))
        }
        (Some(_), Some(_)) => {}
        _ => failures.push("too few RSS samples to tell whether the agent's memory is flat".into()),
    }

    let status: Vec<StatusAt> = m
        .output
        .statuses
        .iter()
        .map(|s| StatusAt {
            t_s: s.uptime_s - m.status_offset_s,
            status: s.clone(),
        })
        .collect();
    let stack_table_reported = status.iter().any(|s| s.status.stacks_held.is_some());
    Figures {
        settings: m.settings.clone(),
        seconds: m.seconds,
        churn: m.client_result.clone(),
        leakers,
        leaks,
        stats,
        ringbuf_drops,
        loss_lines: m.output.loss_lines,
        rss,
        status,
        stack_table_reported,
        tracer_exit,
        bad_output_lines: m.output.bad_lines,
        failures,
    }
}

fn leaks(m: &Measured) -> Leaks {
    let confirmed = &m.tally.confirmed;
    let mut l = Leaks {
        expected: confirmed.len() as u64,
        leaker_late_closes: m.output.leaker_late_closes,
        other_leaks: m.output.other_leaks,
        ..Leaks::default()
    };
    let mut ages = Vec::new();
    let mut missed: Vec<u32> = Vec::new();
    for &pid in confirmed {
        let Some(seen) = m.output.leaks.get(&pid) else {
            missed.push(pid);
            continue;
        };
        l.found += 1;
        if seen.len() > 1 {
            l.reported_twice += 1;
        }
        let first = &seen[0];
        if first.has_stack {
            l.with_stack += 1;
            l.naming_connect += u64::from(first.names_connect);
        } else {
            let why = first
                .stack_error
                .clone()
                .unwrap_or_else(|| "no frames, no error".into());
            *l.stack_errors.entry(why).or_default() += 1;
        }
        ages.extend(first.close_wait_ms);
    }
    l.unexpected = m.output.leaks.keys().filter(|p| !confirmed.contains(p)).count() as u64;
    missed.sort_unstable();
    l.missed = missed.len() as u64;
    l.missed_pids = missed.into_iter().take(10).collect();
    l.stack_share = (l.found > 0).then(|| l.with_stack as f64 / l.found as f64);
    ages.sort_unstable();
    l.reported_after_ms_median = ages.get(ages.len() / 2).copied();
    l.reported_after_ms_max = ages.last().copied();
    l
}

/// Every integer under `stats`, by dotted path (`kernel.ringbuf_drops`).
fn counters(stats: &Value) -> BTreeMap<String, u64> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, u64>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    let name = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&name, v, out);
                }
            }
            Value::Number(n) => {
                if let Some(n) = n.as_u64() {
                    out.insert(prefix.to_owned(), n);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk("", stats, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Output read from these lines (the reply server at 127.0.0.1:9).
    fn output(lines: &[String]) -> Output {
        // Tests run in parallel: one file each.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("soak-figures-{}-{n}.jsonl", std::process::id()));
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let mut out = Output::open(&path, "127.0.0.1:9".into()).unwrap();
        out.poll().unwrap();
        let _ = std::fs::remove_file(&path);
        out
    }

    fn leak_line(pid: u32, stack: bool) -> String {
        let (frames, err) = if stack {
            (r#"[{"symbol":"loadgen::leak::open_leaking_socket"}]"#, "null")
        } else {
            ("[]", r#""ring buffer full""#)
        };
        format!(
            r#"{{"type":"leak","pid":{pid},"remote":"127.0.0.1:9","close_wait_ms":1200,"open_stack":{frames},"open_stack_error":{err}}}"#
        )
    }

    fn judged(lines: &[String], confirmed: impl IntoIterator<Item = u32>, rss: &[(f64, u64)]) -> Figures {
        let out = output(lines);
        let tally = Tally {
            confirmed: confirmed.into_iter().collect(),
            ..Tally::default()
        };
        let settings = Settings {
            minutes: 1.0,
            leak_after: "1s".into(),
            status_interval: "5s".into(),
            idle_connections: 0,
            churn_rate: 0.0,
            leakers_per_sec: 1.0,
            hold_s: 3.0,
        };
        judge(&Measured {
            settings: &settings,
            seconds: 60.0,
            rss,
            output: &out,
            status_offset_s: 0.0,
            tally: &tally,
            tracer_exit: Ok("exit code 0".into()),
            client_result: None,
        })
    }

    fn flat_rss() -> Vec<(f64, u64)> {
        (0..30).map(|i| (i as f64 * 2.0, 60 * 1024 + (i % 3) * 100)).collect()
    }

    const SUMMARY_OK: &str = r#"{"type":"summary","stats":{"kernel":{"ringbuf_drops":0}}}"#;

    #[test]
    fn all_found_with_stacks_passes() {
        let mut lines: Vec<String> = (1..=200).map(|pid| leak_line(pid, true)).collect();
        lines.push(SUMMARY_OK.into());
        let f = judged(&lines, 1..=200, &flat_rss());
        assert!(f.failures.is_empty(), "{:?}", f.failures);
        assert_eq!(
            (f.leaks.found, f.leaks.with_stack, f.leaks.naming_connect),
            (200, 200, 200)
        );
        assert_eq!(f.ringbuf_drops, Some(0));
    }

    #[test]
    fn each_criterion_fails_on_its_own() {
        // 3 of 200 without a stack: 98.5%, under 99%.
        let mut lines: Vec<String> = (1..=200).map(|pid| leak_line(pid, pid > 3)).collect();
        lines.push(SUMMARY_OK.into());
        let f = judged(&lines, 1..=200, &flat_rss());
        assert_eq!(f.failures.len(), 1, "{:?}", f.failures);
        assert!(f.failures[0].contains("open stack"), "{:?}", f.failures);
        assert_eq!(f.leaks.stack_errors.get("ring buffer full"), Some(&3));

        // One leaking process never reported.
        let mut lines: Vec<String> = (1..=200).map(|pid| leak_line(pid, true)).collect();
        lines.push(SUMMARY_OK.into());
        let f = judged(&lines, 1..=201, &flat_rss());
        assert_eq!(f.failures.len(), 1, "{:?}", f.failures);
        assert!(
            f.failures[0].contains("missed") && f.leaks.missed_pids == [201],
            "{:?}",
            f.failures
        );

        // Drops.
        let mut lines: Vec<String> = (1..=200).map(|pid| leak_line(pid, true)).collect();
        lines.push(r#"{"type":"summary","stats":{"kernel":{"ringbuf_drops":7}}}"#.into());
        let f = judged(&lines, 1..=200, &flat_rss());
        assert_eq!(f.failures.len(), 1, "{:?}", f.failures);
        assert!(f.failures[0].contains("7 events dropped"), "{:?}", f.failures);

        // Memory growing by 6 MiB over the second half of a minute.
        let mut lines: Vec<String> = (1..=200).map(|pid| leak_line(pid, true)).collect();
        lines.push(SUMMARY_OK.into());
        let growing: Vec<(f64, u64)> = (0..30)
            .map(|i| (i as f64 * 2.0, 60 * 1024 + if i < 15 { 0 } else { (i - 15) * 400 }))
            .collect();
        let f = judged(&lines, 1..=200, &growing);
        assert_eq!(f.failures.len(), 1, "{:?}", f.failures);
        assert!(f.failures[0].contains("RSS grows"), "{:?}", f.failures);

        // No summary, and a leak reported twice.
        let mut lines: Vec<String> = (1..=200).map(|pid| leak_line(pid, true)).collect();
        lines.push(leak_line(5, true));
        lines.push(r#"{"type":"status","uptime_ms":1000,"ringbuf_drops":0}"#.into());
        let f = judged(&lines, 1..=200, &flat_rss());
        assert_eq!(f.failures.len(), 2, "{:?}", f.failures);
        assert!(
            f.failures.iter().any(|w| w.contains("more than once")),
            "{:?}",
            f.failures
        );
        assert!(f.failures.iter().any(|w| w.contains("no summary")), "{:?}", f.failures);
    }

    #[test]
    fn counters_by_dotted_name() {
        let v: Value = serde_json::from_str(
            r#"{"kernel":{"generated":10,"ringbuf_drops":0},"agent":{"events":10,"x":"text"},"decode_errors":1}"#,
        )
        .unwrap();
        let c = counters(&v);
        assert_eq!(c.get("kernel.ringbuf_drops"), Some(&0));
        assert_eq!(c.get("agent.events"), Some(&10));
        assert_eq!(c.get("decode_errors"), Some(&1));
        assert!(!c.contains_key("agent.x"));
    }
}
