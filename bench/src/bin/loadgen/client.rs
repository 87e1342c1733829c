//! `loadgen client`: the churn (connect, write 8 bytes, close) on
//! `--threads` threads, optionally leaking a share of its connections
//! (churn-leak) or after opening idle ones (many-sockets), optionally paced
//! (`--rate`); prints its result as one JSON line.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::idle::{close_idle, open_idle};
use crate::opts::{Mode, Opts};
use crate::sys::{dest_addr, raise_nofile};
use crate::{Context, Error, Result};

/// What each churn connection writes.
const PAYLOAD: [u8; 8] = *b"loadgen\n";

/// What one run measured.
pub struct Report {
    mode: Mode,
    connections: u64,
    seconds: f64,
    errors: u64,
    threads: usize,
    leaked_open: usize,
    idle_open: usize,
}

impl Report {
    fn json(&self) -> String {
        let rate = if self.seconds > 0.0 {
            self.connections as f64 / self.seconds
        } else {
            0.0
        };
        format!(
            "{{\"mode\":\"{}\",\"connections\":{},\"seconds\":{:.3},\"conn_per_sec\":{:.1},\"errors\":{},\"threads\":{},\"leaked_open\":{},\"idle_open\":{}}}",
            self.mode.name(),
            self.connections,
            self.seconds,
            rate,
            self.errors,
            self.threads,
            self.leaked_open,
            self.idle_open
        )
    }
}

/// Everything a churn thread leaves behind: its counts and the connections
/// it must keep open until the end.
struct ThreadResult {
    connections: u64,
    errors: u64,
    first_error: Option<io::Error>,
    leaked: VecDeque<TcpStream>,
}

pub fn client(o: &Opts) -> Result<Report> {
    let limit = raise_nofile(o.leak_max + o.threads * 64 + 1024);
    let leak_max = o.leak_max.min(limit.saturating_sub(o.threads * 64 + 1024));
    if o.mode == Mode::ChurnLeak && leak_max < o.leak_max {
        eprintln!("loadgen client: RLIMIT_NOFILE is {limit}: keeping at most {leak_max} leaked connections");
    }
    let (holders, idle) = open_idle(o)?;
    eprintln!(
        "READY mode={} idle={} threads={}{}",
        o.mode.name(),
        idle,
        o.threads,
        if o.sync { " (waiting for a line on stdin)" } else { "" }
    );
    let mut stdin = BufReader::new(io::stdin());
    if o.sync {
        let mut line = String::new();
        if stdin.read_line(&mut line).context(|| "reading stdin".into())? == 0 {
            return Err(Error::Io(
                "waiting for the start line".into(),
                io::Error::other("stdin closed"),
            ));
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(o.threads + 1));
    let per_thread_leaks = if o.mode == Mode::ChurnLeak {
        leak_max.div_ceil(o.threads)
    } else {
        0
    };
    let workers: Vec<_> = (0..o.threads)
        .map(|t| {
            let (stop, start) = (stop.clone(), start.clone());
            let plan = Churn {
                thread: t,
                threads: o.threads,
                port: o.port,
                addrs: o.addrs,
                leak_percent: if o.mode == Mode::ChurnLeak { o.leak_percent } else { 0.0 },
                leak_max: per_thread_leaks,
                // Each thread takes its share of the rate.
                interval: (o.rate > 0.0).then(|| Duration::from_secs_f64(o.threads as f64 / o.rate)),
            };
            thread::spawn(move || {
                start.wait();
                churn(&plan, &stop)
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    thread::sleep(o.duration());
    stop.store(true, Ordering::Relaxed);
    let mut results = Vec::new();
    for w in workers {
        results.push(
            w.join()
                .map_err(|_| Error::Io("churn".into(), io::Error::other("thread panicked")))?,
        );
    }
    let seconds = began.elapsed().as_secs_f64();

    let report = Report {
        mode: o.mode,
        connections: results.iter().map(|r| r.connections).sum(),
        seconds,
        errors: results.iter().map(|r| r.errors).sum(),
        threads: o.threads,
        leaked_open: results.iter().map(|r| r.leaked.len()).sum(),
        idle_open: idle,
    };
    if let Some(e) = results.iter().find_map(|r| r.first_error.as_ref()) {
        eprintln!("loadgen client: {} connection errors, the first: {e}", report.errors);
    }
    let mut out = io::stdout().lock();
    writeln!(out, "{}", report.json())
        .and_then(|()| out.flush())
        .context(|| "writing the result".into())?;
    drop(out);
    if o.sync {
        // Keep the idle and leaked connections until the harness is done
        // (it stops the tracer first, so their teardown is not measured).
        let mut sink = Vec::new();
        let _ = stdin.read_to_end(&mut sink);
    }
    drop(results);
    close_idle(holders);
    Ok(report)
}

/// What one churn thread does.
struct Churn {
    thread: usize,
    threads: usize,
    port: u16,
    addrs: usize,
    leak_percent: f64,
    leak_max: usize,
    /// Time between this thread's connections (`--rate`); None: unpaced.
    interval: Option<Duration>,
}

/// One churn thread: connect, write 8 bytes, close, until told to stop.
/// Destinations go round robin, each thread starting at its own offset.
fn churn(c: &Churn, stop: &AtomicBool) -> ThreadResult {
    let (port, addrs, leak_percent, leak_max) = (c.port, c.addrs, c.leak_percent, c.leak_max);
    let mut r = ThreadResult {
        connections: 0,
        errors: 0,
        first_error: None,
        leaked: VecDeque::with_capacity(leak_max.min(1 << 16)),
    };
    let mut next = c.thread % addrs;
    let step = c.threads.max(1);
    // Leak decisions spread evenly: leak when floor(n * p / 100) moves.
    let mut leak_budget = 0.0f64;
    let mut due = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(interval) = c.interval {
            pace(&mut due, interval);
        }
        let dest = SocketAddrV4::new(dest_addr(next), port);
        next = (next + step) % addrs;
        let stream = TcpStream::connect(dest).and_then(|mut s| s.write_all(&PAYLOAD).map(|()| s));
        match stream {
            Ok(s) => {
                r.connections += 1;
                leak_budget += leak_percent / 100.0;
                if leak_budget >= 1.0 && leak_max > 0 {
                    leak_budget -= 1.0;
                    if r.leaked.len() >= leak_max {
                        r.leaked.pop_front();
                    }
                    r.leaked.push_back(s);
                }
            }
            Err(e) => {
                r.errors += 1;
                if r.first_error.is_none() {
                    r.first_error = Some(e);
                }
                // Out of ports or fds: back off instead of spinning.
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    r
}

/// Sleeps until `due`, then sets the next due time. A thread that fell
/// behind by more than a second (the machine was busy) starts afresh
/// instead of catching up in a burst.
fn pace(due: &mut Instant, interval: Duration) {
    let now = Instant::now();
    if *due > now {
        thread::sleep(*due - now);
    } else if now - *due > Duration::from_secs(1) {
        *due = now;
    }
    *due += interval;
}
