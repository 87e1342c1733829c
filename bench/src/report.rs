//! Medians per configuration and the markdown report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::SystemTime;

use serde::Serialize;

use crate::observer::{Observer, TracerKind};
use crate::{Config, RunResult, Settings, Workload};

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    pub memory_gib: f64,
}

impl Machine {
    pub fn probe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let memory_kib: f64 = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu,
            memory_gib: memory_kib / (1024.0 * 1024.0),
        }
    }
}

/// One configuration, summarized over its runs.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub workload: &'static str,
    pub label: String,
    pub peer: bool,
    pub baseline: bool,
    pub runs_ok: usize,
    pub runs: usize,
    pub conn_per_sec: Option<f64>,
    /// Median conn/s over the baseline's median conn/s, same workload.
    pub vs_baseline: Option<f64>,
    pub kernel_generated: Option<f64>,
    pub received: Option<f64>,
    pub received_per_conn: Option<f64>,
    /// Sum over all runs.
    pub drops: Option<u64>,
    /// Sum over all runs.
    pub missing: Option<u64>,
    /// Ring-buffer records that could not be decoded, sum over all runs.
    pub decode_errors: Option<u64>,
    /// Hook runs the kernel skipped, sum over all runs.
    pub hook_misses: Option<u64>,
    pub agent_start_s: Option<f64>,
    pub agent_cpu_s: Option<f64>,
    pub bpf_cpu_s: Option<f64>,
    /// eBPF time per connection in the accounting run, from the ready line
    /// to the end of the load.
    pub bpf_ns_per_conn: Option<f64>,
    /// Largest over the runs.
    pub agent_peak_rss_kib: Option<u64>,
    pub output_bytes: Option<f64>,
    pub leaks_reported: Option<f64>,
    pub leaked_open: Option<f64>,
}

pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub fn rows(configs: &[Config], results: &[RunResult]) -> Vec<Row> {
    let mut rows: Vec<Row> = configs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mine = results.iter().filter(|r| r.config == i);
            // Throughput and the agent's numbers come from the plain runs;
            // eBPF CPU only from the accounting run (which slows the hooks).
            let all: Vec<&RunResult> = mine.clone().filter(|r| !r.accounting).collect();
            let ok: Vec<&RunResult> = all.iter().copied().filter(|r| r.error.is_none()).collect();
            let accounted: Vec<&RunResult> = mine.filter(|r| r.accounting && r.error.is_none()).collect();
            let med = |f: &dyn Fn(&RunResult) -> Option<f64>| median(ok.iter().filter_map(|r| f(r)));
            let per_conn = median(ok.iter().filter_map(|r| match (r.received, r.connections) {
                (Some(rx), Some(n)) if n > 0 => Some(rx as f64 / n as f64),
                _ => None,
            }));
            // Losses count in every run, the accounting run included.
            let drops: Vec<u64> = ok.iter().chain(&accounted).filter_map(|r| r.drops).collect();
            let missing: Vec<u64> = ok.iter().chain(&accounted).filter_map(|r| r.missing).collect();
            let undecoded: Vec<u64> = ok.iter().chain(&accounted).filter_map(|r| r.decode_errors).collect();
            let skipped: Vec<u64> = ok.iter().chain(&accounted).filter_map(|r| r.hook_misses).collect();
            Row {
                workload: c.workload.name(),
                label: c.label(),
                peer: c.observer.is_peer(),
                baseline: matches!(c.observer, Observer::Baseline),
                runs_ok: ok.len(),
                runs: all.len(),
                conn_per_sec: med(&|r| r.conn_per_sec),
                vs_baseline: None,
                kernel_generated: med(&|r| r.kernel_generated.map(|n| n as f64)),
                received: med(&|r| r.received.map(|n| n as f64)),
                received_per_conn: per_conn,
                drops: (!drops.is_empty()).then(|| drops.iter().sum()),
                missing: (!missing.is_empty()).then(|| missing.iter().sum()),
                decode_errors: (!undecoded.is_empty()).then(|| undecoded.iter().sum()),
                hook_misses: (!skipped.is_empty()).then(|| skipped.iter().sum()),
                agent_start_s: med(&|r| r.agent_start_s),
                agent_cpu_s: med(&|r| r.agent_cpu_s),
                bpf_cpu_s: median(accounted.iter().filter_map(|r| r.bpf_cpu_s)),
                bpf_ns_per_conn: median(
                    accounted
                        .iter()
                        .filter_map(|r| match (r.bpf_cpu_load_s, r.connections) {
                            (Some(s), Some(n)) if n > 0 => Some(s * 1e9 / n as f64),
                            _ => None,
                        }),
                ),
                agent_peak_rss_kib: ok.iter().filter_map(|r| r.agent_peak_rss_kib).max(),
                output_bytes: med(&|r| r.output_bytes.map(|n| n as f64)),
                leaks_reported: med(&|r| r.leaks_reported.map(|n| n as f64)),
                leaked_open: med(&|r| r.leaked_open.map(|n| n as f64)),
            }
        })
        .collect();
    let baselines: BTreeMap<&str, f64> = rows
        .iter()
        .filter(|r| r.baseline)
        .filter_map(|r| Some((r.workload, r.conn_per_sec?)))
        .collect();
    for row in &mut rows {
        if let (Some(base), Some(cps)) = (baselines.get(row.workload), row.conn_per_sec) {
            if *base > 0.0 {
                row.vs_baseline = Some(cps / base);
            }
        }
    }
    rows
}

/// A figure the headline compares with: measured on these machines (2-CPU
/// AMD EPYC VMs, the same loopback churn) outside the bench, never in this
/// run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Reference {
    pub floor: &'static str,
    pub what: &'static str,
    pub us_per_conn: f64,
    pub applies_to: &'static str,
}

/// What sending everything costs at the least.
pub const SEND_ALL: Reference = Reference {
    floor: "send-all",
    what: "a minimal C/libbpf tracer sending every state change and close through a ring buffer, with no wakeups",
    us_per_conn: 3.6,
    applies_to: "full fidelity: tracer record, tracer live --events, and the peer tools",
};

/// What watching costs at the least, when nothing needs to be sent.
pub const COUNT_ONLY: Reference = Reference {
    floor: "count-only",
    what: "state changes counted in the kernel, nothing sent",
    us_per_conn: 0.8,
    applies_to: "tracer live without --events (only sockets that stay in CLOSE_WAIT need to reach userspace)",
};

pub const REFERENCES: [Reference; 2] = [SEND_ALL, COUNT_ONLY];

/// The targets, in µs per connection, for the churn workload
/// (informational: timing never fails the bench).
fn target(c: &Config) -> Option<f64> {
    if c.workload != Workload::Churn || c.leak_after.is_some() {
        return None;
    }
    match c.observer {
        Observer::Tracer(TracerKind::Text | TracerKind::Json | TracerKind::Daemon) => Some(2.5),
        Observer::Tracer(TracerKind::PidFilter) => Some(0.5),
        Observer::Tracer(TracerKind::Events | TracerKind::Record) => Some(4.0),
        _ => None,
    }
}

/// The floor a configuration is held to: what it must deliver, done as
/// cheaply as is known to be possible.
fn floor(c: &Config) -> Option<&'static Reference> {
    match c.observer {
        Observer::Tracer(kind) if kind.full_fidelity() => Some(&SEND_ALL),
        Observer::Tracer(_) => Some(&COUNT_ONLY),
        Observer::Bcc(_) | Observer::Bpftrace(_) => Some(&SEND_ALL),
        Observer::Baseline | Observer::Strace(_) => None,
    }
}

/// One eBPF program's share of a configuration's cost.
#[derive(Clone, Debug, Serialize)]
pub struct HookCost {
    /// The program's name, from the kernel (its BTF).
    pub name: String,
    /// Summed over the accounting runs, from the ready line to the end of
    /// the load.
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub ns_per_conn: f64,
    /// None when it never ran.
    pub ns_per_run: Option<f64>,
    pub runs_per_conn: f64,
}

/// The headline: CPU per connection, by hook, next to the floor.
#[derive(Clone, Debug, Serialize)]
pub struct Headline {
    pub workload: &'static str,
    pub label: String,
    pub vs_baseline: Option<f64>,
    /// Connections of the accounting run(s), which the eBPF figures are
    /// divided by.
    pub accounted_connections: Option<u64>,
    /// In the order the programs were loaded.
    pub hooks: Vec<HookCost>,
    /// Every program's time per connection, summed.
    pub bpf_us_per_conn: Option<f64>,
    /// The agent's CPU from its ready line until it had caught up with the
    /// load, per connection: median over the throughput runs.
    pub agent_us_per_conn: Option<f64>,
    pub total_us_per_conn: Option<f64>,
    pub received_per_conn: Option<f64>,
    /// Drops, undecodable records and missing events, every run (the
    /// accounting run included).
    pub lost: Option<u64>,
    pub floor: Option<&'static str>,
    pub floor_us_per_conn: Option<f64>,
    /// total_us_per_conn over floor_us_per_conn.
    pub times_floor: Option<f64>,
    pub target_us_per_conn: Option<f64>,
    pub target_met: Option<bool>,
}

/// The headline rows: every configuration with an observer, strace
/// excepted (its cost is the client's ptrace stops, not CPU it accounts).
pub fn headline(configs: &[Config], results: &[RunResult], rows: &[Row]) -> Vec<Headline> {
    configs
        .iter()
        .enumerate()
        .filter(|(_, c)| floor(c).is_some())
        .map(|(i, c)| {
            let row = &rows[i];
            let accounted: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.config == i && r.accounting && r.error.is_none() && !r.bpf_programs.is_empty())
                .filter(|r| r.connections.is_some_and(|n| n > 0))
                .collect();
            let conns: u64 = accounted.iter().filter_map(|r| r.connections).sum();
            let mut hooks: Vec<HookCost> = Vec::new();
            for p in accounted.iter().flat_map(|r| &r.bpf_programs) {
                match hooks.iter_mut().find(|h| h.name == p.name) {
                    Some(h) => {
                        h.run_time_ns += p.run_time_ns;
                        h.run_cnt += p.run_cnt;
                    }
                    None => hooks.push(HookCost {
                        name: p.name.clone(),
                        run_time_ns: p.run_time_ns,
                        run_cnt: p.run_cnt,
                        ns_per_conn: 0.0,
                        ns_per_run: None,
                        runs_per_conn: 0.0,
                    }),
                }
            }
            for h in &mut hooks {
                h.ns_per_conn = h.run_time_ns as f64 / conns as f64;
                h.ns_per_run = (h.run_cnt > 0).then(|| h.run_time_ns as f64 / h.run_cnt as f64);
                h.runs_per_conn = h.run_cnt as f64 / conns as f64;
            }
            let bpf = (!hooks.is_empty()).then(|| hooks.iter().map(|h| h.ns_per_conn).sum::<f64>() / 1e3);
            let agent = median(
                results
                    .iter()
                    .filter(|r| r.config == i && !r.accounting && r.error.is_none())
                    .filter_map(|r| match (r.agent_cpu_load_s, r.connections) {
                        (Some(s), Some(n)) if n > 0 => Some(s * 1e6 / n as f64),
                        _ => None,
                    }),
            );
            let total = bpf.zip(agent).map(|(b, a)| b + a);
            let floor = floor(c).expect("filtered");
            let target = target(c);
            Headline {
                workload: c.workload.name(),
                label: c.label(),
                vs_baseline: row.vs_baseline,
                accounted_connections: (conns > 0).then_some(conns),
                hooks,
                bpf_us_per_conn: bpf,
                agent_us_per_conn: agent,
                total_us_per_conn: total,
                received_per_conn: row.received_per_conn,
                lost: match (row.drops, row.missing, row.decode_errors, row.hook_misses) {
                    (None, None, None, None) => None,
                    (d, m, u, h) => Some(d.unwrap_or(0) + m.unwrap_or(0) + u.unwrap_or(0) + h.unwrap_or(0)),
                },
                floor: Some(floor.floor),
                floor_us_per_conn: Some(floor.us_per_conn),
                times_floor: total.map(|t| t / floor.us_per_conn),
                target_us_per_conn: target,
                target_met: target.zip(total).map(|(t, x)| x <= t),
            }
        })
        .collect()
}

/// The headline as a markdown table, with the reference rows and what the
/// columns mean.
fn headline_markdown(o: &mut String, heads: &[Headline], bpf_stats: bool) {
    // One column per program of the tracer, in load order; the peers'
    // programs go together in "other".
    let mut names: Vec<&str> = Vec::new();
    for h in heads.iter().filter(|h| h.label.starts_with("tracer ")) {
        for p in &h.hooks {
            if !names.contains(&p.name.as_str()) {
                names.push(&p.name);
            }
        }
    }
    let other = |h: &Headline| -> Option<f64> {
        let ns: Vec<f64> = h
            .hooks
            .iter()
            .filter(|p| !names.contains(&p.name.as_str()))
            .map(|p| p.ns_per_conn)
            .collect();
        (!ns.is_empty()).then(|| ns.iter().sum())
    };
    let with_other = heads.iter().any(|h| other(h).is_some());
    let _ = writeln!(
        o,
        "## Cost per connection
"
    );
    let _ = writeln!(
        o,
        "CPU per connection: each eBPF program's run time as the kernel accounts it (`run_time_ns`, `run_cnt`; programs named from the kernel), in an accounting run with the kernel's eBPF stats on, from the observer's ready line to the end of the load; plus the agent's own CPU (user + system, all threads) from its ready line until it had caught up with the load (shutdown left out), median over the throughput runs; each over the connections of its runs. Host-wide modes also pay for the machine's other TCP activity. A hook's cell: ns per connection (ns per run × runs per connection).\n"
    );
    let mut head = "| workload | configuration | vs baseline | total µs/conn | floor µs/conn | × floor | target µs/conn | target met | agent µs/conn | eBPF µs/conn |".to_owned();
    let mut align = "|---|---|--:|--:|--:|--:|--:|:-:|--:|--:|".to_owned();
    for n in &names {
        head += &format!(" {n} ns/conn (ns/run × runs/conn) |");
        align += "--:|";
    }
    if with_other {
        head += " other eBPF ns/conn |";
        align += "--:|";
    }
    head += " received/conn | lost (all runs) |";
    align += "--:|--:|";
    let _ = writeln!(o, "{head}\n{align}");
    let dashes = names.len() + usize::from(with_other) + 2;
    for r in REFERENCES {
        let _ = writeln!(
            o,
            "| reference | {} floor: {} (reference figure, not measured in this run) | – | {:.1} | – | – | – | – | – | – |{}",
            r.floor,
            r.what,
            r.us_per_conn,
            " – |".repeat(dashes)
        );
    }
    for h in heads {
        let mut line = format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            h.workload,
            h.label,
            opt(h.vs_baseline, |x| format!("{x:.2}")),
            opt(h.total_us_per_conn, |x| format!("{x:.2}")),
            opt(h.floor_us_per_conn, |x| format!("{x:.1} ({})", h.floor.unwrap_or("?"))),
            opt(h.times_floor, |x| format!("{x:.2}")),
            h.target_us_per_conn.map_or("–".to_owned(), |x| format!("≤ {x}")),
            match (h.target_us_per_conn, h.target_met) {
                (None, _) => "–".to_owned(),
                (Some(_), None) => "n/a".to_owned(),
                (Some(_), Some(true)) => "yes".to_owned(),
                (Some(_), Some(false)) => "no".to_owned(),
            },
            opt(h.agent_us_per_conn, |x| format!("{x:.2}")),
            opt(h.bpf_us_per_conn, |x| format!("{x:.2}")),
        );
        for n in &names {
            let cell = match h.hooks.iter().find(|p| p.name == *n) {
                Some(p) => match p.ns_per_run {
                    Some(per_run) => format!("{:.0} ({per_run:.0} × {:.2})", p.ns_per_conn, p.runs_per_conn),
                    None => "0 (never ran)".to_owned(),
                },
                None if h.hooks.is_empty() => "n/a".to_owned(),
                None => "–".to_owned(),
            };
            line += &format!(" {cell} |");
        }
        if with_other {
            line += &format!(" {} |", other(h).map_or("–".to_owned(), |x| format!("{x:.0}")));
        }
        line += &format!(
            " {} | {} |",
            opt(h.received_per_conn, |x| format!("{x:.2}")),
            opt(h.lost, |x| x.to_string())
        );
        let _ = writeln!(o, "{line}");
    }
    let _ = writeln!(
        o,
        "\nFloors (reference figures measured on these machines, not in this run): {}. × floor is total µs/conn over the row's floor. Targets (issue 10; informational, timing never fails the bench): `live` host-wide ≤ 2.5, `live --pid` of an idle process ≤ 0.5, `record` and `live --events` ≤ 4 µs/conn. lost: from the tracer's own counters, over every run: ring-buffer drops, undecodable records, records missing (generated − delivered − undecodable − dropped), and hook runs the kernel skipped (the program already running on that CPU: events never generated). received/conn: what the agent analysed per connection, as measured (no fixed number is expected: default `live` may send almost nothing per connection).{}",
        REFERENCES
            .iter()
            .map(|r| format!("{} {} µs/conn, {}, for {}", r.floor, r.us_per_conn, r.what, r.applies_to))
            .collect::<Vec<_>>()
            .join("; "),
        if bpf_stats {
            ""
        } else {
            " eBPF and total: n/a (--no-bpf-stats: no accounting run)."
        }
    );
    let _ = writeln!(o, "\n## All measurements\n");
}

pub struct Document<'a> {
    pub started: SystemTime,
    pub machine: &'a Machine,
    pub settings: &'a Settings,
    pub headline: &'a [Headline],
    pub rows: &'a [Row],
    pub skipped: &'a [String],
    pub results: &'a [RunResult],
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "n/a".into())
}

fn int(x: f64) -> String {
    format!("{x:.0}")
}

fn mib(bytes: f64) -> String {
    format!("{:.1}", bytes / (1024.0 * 1024.0))
}

pub fn markdown(d: &Document) -> String {
    let s = d.settings;
    let m = d.machine;
    let mut o = String::new();
    let _ = writeln!(o, "# tracer benchmark\n");
    let _ = writeln!(
        o,
        "{}: {} run(s) × {} s per configuration, interleaved{}; load generator: {} client and {} server threads, connections spread over {} loopback addresses.",
        utc(d.started),
        s.runs,
        s.seconds,
        if s.quick { " (--quick: no many-sockets)" } else { "" },
        s.threads,
        s.threads,
        s.addrs
    );
    let _ = writeln!(
        o,
        "Machine: {} CPU(s) ({}), kernel {}, {:.1} GiB memory.\n",
        m.nproc, m.cpu, m.kernel, m.memory_gib
    );
    headline_markdown(&mut o, d.headline, s.bpf_stats);
    let _ = writeln!(
        o,
        "| workload | configuration | runs | conn/s (median) | vs baseline | kernel events/run | received/run | received/conn | drops (all runs) | missing (all runs) | agent start s | agent CPU s/run | eBPF CPU s/run | agent peak RSS MiB | output MiB/run |"
    );
    let _ = writeln!(o, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in d.rows {
        let dash = |v: String| if r.baseline { "–".to_owned() } else { v };
        let _ = writeln!(
            o,
            "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.workload,
            r.label,
            r.runs_ok,
            r.runs,
            if r.runs_ok == 0 {
                "FAILED".to_owned()
            } else {
                opt(r.conn_per_sec, int)
            },
            if r.baseline {
                "1.00".to_owned()
            } else {
                opt(r.vs_baseline, |x| format!("{x:.2}"))
            },
            dash(opt(r.kernel_generated, int)),
            dash(opt(r.received, int)),
            dash(opt(r.received_per_conn, |x| format!("{x:.1}"))),
            dash(opt(r.drops, |x| x.to_string())),
            dash(opt(r.missing, |x| x.to_string())),
            dash(opt(r.agent_start_s, |x| format!("{x:.1}"))),
            dash(opt(r.agent_cpu_s, |x| format!("{x:.2}"))),
            dash(opt(r.bpf_cpu_s, |x| format!("{x:.2}"))),
            dash(opt(r.agent_peak_rss_kib, |x| mib(x as f64 * 1024.0))),
            dash(opt(r.output_bytes, mib)),
        );
    }

    let leak_rows: Vec<&Row> = d
        .rows
        .iter()
        .filter(|r| r.workload == Workload::ChurnLeak.name() && !r.baseline && r.leaks_reported.is_some())
        .collect();
    if !leak_rows.is_empty() {
        let _ = writeln!(
            o,
            "\nchurn-leak ({}% of the connections left in CLOSE_WAIT by the client):",
            s.leak_percent
        );
        for r in leak_rows {
            let _ = writeln!(
                o,
                "- {}: {} leaks reported per run (median); the client held {} connections in CLOSE_WAIT at the end (those younger than --leak-after {} are not leaks yet).",
                r.label,
                opt(r.leaks_reported, int),
                opt(r.leaked_open, int),
                s.leak_after
            );
        }
    }

    for line in stack_cost(d.rows) {
        let _ = writeln!(o, "\n{line}");
    }

    let _ = writeln!(
        o,
        "\nColumns: see docs/bench.md. n/a: the configuration cannot tell (text output, strace), or the runs failed.{}",
        if s.bpf_stats {
            " eBPF CPU comes from one extra run per configuration with the kernel's eBPF accounting on; that run's throughput is left out, since the accounting slows every hook."
        } else {
            " eBPF CPU: n/a (--no-bpf-stats: no accounting run)."
        }
    );
    if !d.skipped.is_empty() {
        let _ = writeln!(o, "\nSkipped:");
        for s in d.skipped {
            let _ = writeln!(o, "- {s}");
        }
    }

    // Notes, each once with the runs it came from.
    let mut notes: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for r in d.results {
        for n in &r.notes {
            let label = if r.accounting {
                format!("{} · {} (accounting run)", r.workload, r.label)
            } else {
                format!("{} · {}", r.workload, r.label)
            };
            notes.entry((label, n.clone())).or_default().push(r.run + 1);
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(o, "\nNotes:");
        for ((label, note), runs) in notes {
            let runs: Vec<String> = runs.iter().map(usize::to_string).collect();
            let _ = writeln!(o, "- {label}, run {}: {note}", runs.join(", "));
        }
    }
    let failures: Vec<&RunResult> = d.results.iter().filter(|r| r.error.is_some()).collect();
    if !failures.is_empty() {
        let _ = writeln!(o, "\nFailed runs:");
        for r in failures {
            let run = if r.accounting {
                "accounting run".to_owned()
            } else {
                format!("run {}", r.run + 1)
            };
            let _ = writeln!(
                o,
                "- {} · {}, {run}: {}",
                r.workload,
                r.label,
                r.error.as_deref().unwrap_or("?")
            );
        }
    }
    o
}

/// `YYYY-MM-DD HH:MM UTC`.
/// What one user-stack walk costs in eBPF time: a workload's eBPF time per
/// connection with every open stack, less that with none, per stack. In
/// churn both ends take one (the client's connect, the server's accept:
/// native stacks of a few frames); in java-churn, traced with `--pid` of
/// the JVM, only the JVM's connect does (a JDK `Socket.connect` stack).
fn stack_cost(rows: &[Row]) -> Vec<String> {
    let cases = [
        (
            Workload::Churn,
            "tracer live --json --stack-rate 0",
            "tracer live --json --no-stacks",
            2.0,
            "native stacks (loadgen's connect and accept)",
        ),
        (
            Workload::JavaChurn,
            "tracer live --json --pid <client> --stack-rate 0",
            "tracer live --json --pid <client> --no-stacks",
            1.0,
            "JVM stacks (JavaChurn's Socket.connect, with -XX:+PreserveFramePointer)",
        ),
    ];
    let ns = |w: Workload, label: &str| {
        rows.iter()
            .find(|r| r.workload == w.name() && r.label == label)
            .and_then(|r| r.bpf_ns_per_conn)
    };
    cases
        .iter()
        .filter_map(|&(w, all, none, per_conn, what)| {
            let (all_ns, none_ns) = (ns(w, all)?, ns(w, none)?);
            Some(format!(
                "Open stacks, {what}: {:.0} ns of eBPF time per captured stack (eBPF ns per connection with `--stack-rate 0`, {all_ns:.0}, less with `--no-stacks`, {none_ns:.0}, over {per_conn} stack(s) per connection: the user-stack walk, its ring-buffer record, and the budget check).",
                (all_ns - none_ns) / per_conn
            ))
        })
        .collect()
}

pub fn utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (era arithmetic:
/// 400-year eras of 146 097 days, years starting in March).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procs::ProgRun;

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(Vec::<f64>::new()), None);
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    fn result(config: usize, run: usize, cps: f64) -> RunResult {
        RunResult {
            config,
            run,
            connections: Some((cps * 2.0) as u64),
            conn_per_sec: Some(cps),
            ..RunResult::default()
        }
    }

    #[test]
    fn accounting_run_gives_ebpf_cpu_but_not_throughput() {
        let configs = [
            Config {
                workload: Workload::Churn,
                observer: Observer::Baseline,
                leak_after: None,
            },
            Config {
                workload: Workload::Churn,
                observer: Observer::Tracer(TracerKind::Json),
                leak_after: None,
            },
        ];
        let plain = RunResult {
            bpf_cpu_s: None,
            drops: Some(1),
            ..result(1, 0, 80.0)
        };
        let accounting = RunResult {
            accounting: true,
            bpf_cpu_s: Some(0.5),
            drops: Some(2),
            ..result(1, 1, 10.0)
        };
        let results = [result(0, 0, 100.0), plain, accounting];
        let rows = rows(&configs, &results);
        assert_eq!(
            rows[1].conn_per_sec,
            Some(80.0),
            "the accounting run's throughput is left out"
        );
        assert_eq!(rows[1].vs_baseline, Some(0.8));
        assert_eq!((rows[1].runs_ok, rows[1].runs), (1, 1));
        assert_eq!(rows[1].bpf_cpu_s, Some(0.5));
        assert_eq!(rows[1].drops, Some(3), "losses count in every run");
    }

    #[test]
    fn ratios_to_the_baseline_of_the_same_workload() {
        let config = |workload, observer| Config {
            workload,
            observer,
            leak_after: None,
        };
        let configs = [
            config(Workload::Churn, Observer::Baseline),
            config(Workload::Churn, Observer::Tracer(TracerKind::Json)),
            config(Workload::ChurnLeak, Observer::Baseline),
            config(Workload::ChurnLeak, Observer::Tracer(TracerKind::Json)),
        ];
        let mut results = vec![
            result(0, 0, 100.0),
            result(1, 0, 50.0),
            result(2, 0, 10.0),
            result(3, 0, 9.0),
            result(0, 1, 300.0),
            result(1, 1, 70.0),
            result(2, 1, 10.0),
        ];
        let mut failed = result(3, 1, 1.0);
        failed.error = Some("boom".into());
        results.push(failed);
        for r in &mut results {
            r.workload = configs[r.config].workload.name().into();
            r.label = configs[r.config].label();
        }
        results[1].received = Some(500);
        results[1].drops = Some(3);
        let rows = rows(&configs, &results);
        assert_eq!(rows[0].conn_per_sec, Some(200.0));
        assert_eq!(rows[1].conn_per_sec, Some(60.0));
        assert_eq!(rows[1].vs_baseline, Some(0.3));
        assert_eq!(rows[1].drops, Some(3));
        assert_eq!(rows[1].received_per_conn, Some(5.0));
        assert_eq!(rows[3].runs_ok, 1);
        assert_eq!(rows[3].vs_baseline, Some(0.9));
        let heads = headline(&configs, &results, &rows);
        let md = markdown(&Document {
            started: SystemTime::UNIX_EPOCH,
            headline: &heads,
            machine: &Machine {
                nproc: 2,
                kernel: "6.1".into(),
                cpu: "x".into(),
                memory_gib: 1.0,
            },
            settings: &Settings {
                quick: true,
                runs: 2,
                seconds: 2.0,
                threads: 2,
                addrs: 64,
                open: 0,
                leak_percent: 1.0,
                leak_after: "1s".into(),
                bpf_stats: true,
            },
            rows: &rows,
            skipped: &["bpftrace: not installed".into()],
            results: &results,
        });
        assert!(md.contains("| churn | tracer live --json | 2/2 | 60 | 0.30 |"), "{md}");
        assert!(md.contains("- churn-leak · tracer live --json, run 2: boom"), "{md}");
        assert!(md.contains("1970-01-01 00:00 UTC"));
    }

    #[test]
    fn stack_cost_is_the_difference_per_stack() {
        let configs = [
            Config {
                workload: Workload::Churn,
                observer: Observer::Tracer(TracerKind::NoStacks),
                leak_after: None,
            },
            Config {
                workload: Workload::Churn,
                observer: Observer::Tracer(TracerKind::AllStacks),
                leak_after: None,
            },
        ];
        // 1000 connections: 1 ms of eBPF without stacks, 5 ms with two per
        // connection: 2 µs per stack.
        let accounting = |config, secs| RunResult {
            config,
            accounting: true,
            bpf_cpu_load_s: Some(secs),
            connections: Some(1000),
            ..RunResult::default()
        };
        let rows = rows(
            &configs,
            &[
                result(0, 0, 100.0),
                result(1, 0, 100.0),
                accounting(0, 0.001),
                accounting(1, 0.005),
            ],
        );
        assert_eq!(rows[0].bpf_ns_per_conn.map(f64::round), Some(1000.0));
        let lines = stack_cost(&rows);
        assert_eq!(lines.len(), 1, "churn only: {lines:?}");
        assert!(
            lines[0].contains(": 2000 ns of eBPF time per captured stack"),
            "{lines:?}"
        );
        assert!(stack_cost(&rows[..1]).is_empty(), "needs both configurations");
    }

    fn machine() -> Machine {
        Machine {
            nproc: 2,
            kernel: "6.1".into(),
            cpu: "x".into(),
            memory_gib: 1.0,
        }
    }

    fn settings() -> Settings {
        Settings {
            quick: true,
            runs: 2,
            seconds: 2.0,
            threads: 2,
            addrs: 64,
            open: 0,
            leak_percent: 1.0,
            leak_after: "1s".into(),
            bpf_stats: true,
        }
    }

    #[test]
    fn headline_per_hook_agent_total_floor_and_target() {
        let config = |workload, observer| Config {
            workload,
            observer,
            leak_after: None,
        };
        let configs = [
            config(Workload::Churn, Observer::Baseline),
            config(Workload::Churn, Observer::Tracer(TracerKind::Json)),
            config(Workload::Churn, Observer::Tracer(TracerKind::Record)),
            config(Workload::Churn, Observer::Strace("strace".into())),
        ];
        let prog = |id, name: &str, ns, cnt| ProgRun {
            id,
            name: name.into(),
            run_time_ns: ns,
            run_cnt: cnt,
        };
        // 1000 connections: the state hook runs 10 times per connection at
        // 100 ns, close 3 times at 200 ns (1.6 µs/conn), sys_exit_accept
        // never; the agent 1 ms per 1000 connections (1 µs/conn), median of
        // 0.5, 1 and 2 µs.
        let accounting = RunResult {
            config: 1,
            accounting: true,
            connections: Some(1000),
            drops: Some(2),
            bpf_programs: vec![
                prog(7, "inet_sock_set_state", 1_000_000, 10_000),
                prog(8, "sys_exit_accept", 0, 0),
                prog(9, "sys_enter_close", 600_000, 3000),
            ],
            ..RunResult::default()
        };
        let plain = |config, run, agent_s: f64| RunResult {
            agent_cpu_load_s: Some(agent_s),
            missing: Some(1),
            ..result(config, run, 500.0)
        };
        let results = vec![
            result(0, 0, 1000.0),
            plain(1, 0, 0.0005),
            plain(1, 1, 0.001),
            plain(1, 2, 0.002),
            accounting,
            // Record: no accounting run (failed), so no eBPF and no total.
            plain(2, 0, 0.001),
            RunResult {
                config: 2,
                accounting: true,
                error: Some("boom".into()),
                ..RunResult::default()
            },
            result(3, 0, 100.0),
        ];
        let rows = rows(&configs, &results);
        let heads = headline(&configs, &results, &rows);
        assert_eq!(heads.len(), 2, "no baseline, no strace: {heads:?}");
        let h = &heads[0];
        assert_eq!(h.label, "tracer live --json");
        assert_eq!(h.vs_baseline, Some(0.5));
        assert_eq!(h.accounted_connections, Some(1000));
        let names: Vec<&str> = h.hooks.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["inet_sock_set_state", "sys_exit_accept", "sys_enter_close"]);
        assert_eq!(h.hooks[0].ns_per_conn, 1000.0);
        assert_eq!(h.hooks[0].ns_per_run, Some(100.0));
        assert_eq!(h.hooks[0].runs_per_conn, 10.0);
        assert_eq!(h.hooks[1].ns_per_run, None);
        assert_eq!(h.hooks[2].ns_per_conn, 600.0);
        assert!((h.bpf_us_per_conn.unwrap() - 1.6).abs() < 1e-9);
        assert!((h.agent_us_per_conn.unwrap() - 1.0).abs() < 1e-9);
        assert!((h.total_us_per_conn.unwrap() - 2.6).abs() < 1e-9);
        assert_eq!((h.floor, h.floor_us_per_conn), (Some("count-only"), Some(0.8)));
        assert!((h.times_floor.unwrap() - 3.25).abs() < 1e-9);
        assert_eq!((h.target_us_per_conn, h.target_met), (Some(2.5), Some(false)));
        assert_eq!(
            h.lost,
            Some(5),
            "2 dropped in the accounting run, 1 missing in each plain run"
        );
        let r = &heads[1];
        assert_eq!((r.floor, r.target_us_per_conn), (Some("send-all"), Some(4.0)));
        assert!(r.hooks.is_empty() && r.bpf_us_per_conn.is_none() && r.total_us_per_conn.is_none());
        assert_eq!(r.target_met, None);

        let md = markdown(&Document {
            started: SystemTime::UNIX_EPOCH,
            machine: &machine(),
            settings: &settings(),
            headline: &heads,
            rows: &rows,
            skipped: &[],
            results: &results,
        });
        let first_table = md
            .find("| workload | configuration | vs baseline | total µs/conn")
            .expect(&md);
        assert!(
            first_table < md.find("| workload | configuration | runs |").expect(&md),
            "headline first: {md}"
        );
        assert!(
            md.contains(" inet_sock_set_state ns/conn (ns/run × runs/conn) | sys_exit_accept ns/conn"),
            "{md}"
        );
        assert!(
            md.contains("| churn | tracer live --json | 0.50 | 2.60 | 0.8 (count-only) | 3.25 | ≤ 2.5 | no | 1.00 | 1.60 | 1000 (100 × 10.00) | 0 (never ran) | 600 (200 × 3.00) | "),
            "{md}"
        );
        assert!(md.contains("| churn | tracer record | 0.50 | n/a | 3.6 (send-all) | n/a | ≤ 4 | n/a | 1.00 | n/a | n/a | n/a | n/a |"), "{md}");
        assert!(md.contains("| reference | send-all floor: "), "{md}");
        assert!(
            md.contains("(reference figure, not measured in this run) | – | 3.6 |"),
            "{md}"
        );
        assert!(
            !md.contains("strace -f (client) | 0."),
            "strace is not in the headline: {md}"
        );
    }
}
