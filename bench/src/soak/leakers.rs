//! The leaking processes: a reply server (replies a few bytes, closes), and
//! a spawner that starts `loadgen leak` processes at a steady rate, each
//! connecting to that server and holding its socket in CLOSE_WAIT for
//! `--hold` seconds before it exits. Distinct processes, not threads: each
//! has its own address-space layout (ASLR), so each brings the tracer new
//! stack addresses, which is what once ran the stack map out.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// What the server replies before it closes: bytes the leaker never reads
/// (the leak's unread bytes).
const REPLY: &[u8] = b"soak: never read\n";
/// Longest the spawner sleeps, so that exits are reaped promptly.
const TICK: Duration = Duration::from_millis(20);

/// Starts the reply server on 127.0.0.1 (a port the kernel picks), on a
/// thread that lives as long as the process.
pub fn reply_server() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for conn in listener.incoming() {
            match conn {
                // Dropping the stream closes it: the leaker sees the FIN.
                Ok(mut stream) => {
                    let _ = stream.write_all(REPLY);
                }
                // Out of fds for a moment: do not spin.
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    Ok(addr)
}

pub struct Plan {
    pub loadgen: PathBuf,
    pub connect: SocketAddr,
    /// Processes started per second.
    pub rate: f64,
    pub hold: Duration,
    /// Where the leakers' stderr goes (they print only when something fails).
    pub log: File,
}

/// How the leaking processes fared.
#[derive(Debug, Default, serde::Serialize)]
pub struct Tally {
    pub started: u64,
    /// Exited 0: their socket reached CLOSE_WAIT and was held `hold` long.
    /// These are the leaks the tracer must report.
    #[serde(skip)]
    pub confirmed: HashSet<u32>,
    pub confirmed_count: u64,
    /// Exit code 3: the socket never reached CLOSE_WAIT.
    pub no_close_wait: u64,
    /// Any other end (an error, a signal), or killed at the end.
    pub failed: u64,
    pub spawn_errors: u64,
    pub first_problem: Option<String>,
    pub max_alive: usize,
}

impl Tally {
    fn problem(&mut self, what: String) {
        if self.first_problem.is_none() {
            self.first_problem = Some(what);
        }
    }

    fn ended(&mut self, pid: u32, status: ExitStatus) {
        match status.code() {
            Some(0) => {
                self.confirmed.insert(pid);
            }
            Some(3) => {
                self.no_close_wait += 1;
                self.problem(format!("pid {pid}: its socket never reached CLOSE_WAIT"));
            }
            _ => {
                self.failed += 1;
                let how = match status.signal() {
                    Some(sig) => format!("signal {sig}"),
                    None => format!("exit code {}", status.code().unwrap_or(-1)),
                };
                self.problem(format!("pid {pid} ended with {how}"));
            }
        }
    }
}

/// The spawner's thread; [`Spawner::finish`] stops it.
pub struct Spawner {
    stop: Arc<AtomicBool>,
    started: Arc<AtomicU64>,
    alive: Arc<AtomicU64>,
    handle: JoinHandle<Tally>,
}

impl Spawner {
    pub fn start(plan: Plan) -> Spawner {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicU64::new(0));
        let alive = Arc::new(AtomicU64::new(0));
        let (s, st, al) = (stop.clone(), started.clone(), alive.clone());
        let handle = thread::spawn(move || spawn_loop(&plan, &s, &st, &al));
        Spawner {
            stop,
            started,
            alive,
            handle,
        }
    }

    /// Processes started so far, and alive now.
    pub fn progress(&self) -> (u64, u64) {
        (self.started.load(Ordering::Relaxed), self.alive.load(Ordering::Relaxed))
    }

    /// Starts no more; the living ones end by themselves after their hold.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Every process started has ended (after [`Spawner::stop`]).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops, waits for the living ones to end, and returns the tally.
    pub fn finish(self) -> Tally {
        self.stop();
        let mut tally = self.handle.join().unwrap_or_else(|_| Tally {
            first_problem: Some("the spawner thread panicked".into()),
            failed: 1,
            ..Tally::default()
        });
        tally.confirmed_count = tally.confirmed.len() as u64;
        tally
    }
}

fn spawn_loop(plan: &Plan, stop: &AtomicBool, started: &AtomicU64, alive_count: &AtomicU64) -> Tally {
    let mut tally = Tally::default();
    let mut alive: Vec<Child> = Vec::new();
    let period = Duration::from_secs_f64(1.0 / plan.rate);
    let connect = plan.connect.to_string();
    let hold = format!("{}", plan.hold.as_secs_f64());
    let mut due = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= due {
            // No PR_SET_PDEATHSIG: it would follow this thread, and the
            // leakers end by themselves within `hold` anyway.
            let child = Command::new(&plan.loadgen)
                .args(["leak", "--connect", &connect, "--hold", &hold])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(plan.log.try_clone().map(Stdio::from).unwrap_or_else(|_| Stdio::null()))
                .spawn();
            match child {
                Ok(c) => {
                    alive.push(c);
                    tally.started += 1;
                    started.store(tally.started, Ordering::Relaxed);
                }
                Err(e) => {
                    tally.spawn_errors += 1;
                    tally.problem(format!("starting {}: {e}", plan.loadgen.display()));
                }
            }
            due += period;
            // Fell behind (a busy machine): go on from now, no burst.
            if now.saturating_duration_since(due) > Duration::from_secs(1) {
                due = now;
            }
        }
        reap(&mut alive, &mut tally);
        tally.max_alive = tally.max_alive.max(alive.len());
        alive_count.store(alive.len() as u64, Ordering::Relaxed);
        thread::sleep(due.saturating_duration_since(Instant::now()).min(TICK));
    }
    // They end by themselves after `hold`; past a generous margin, kill.
    let deadline = Instant::now() + plan.hold + Duration::from_secs(15);
    while !alive.is_empty() && Instant::now() < deadline {
        reap(&mut alive, &mut tally);
        alive_count.store(alive.len() as u64, Ordering::Relaxed);
        thread::sleep(TICK);
    }
    for mut c in alive {
        let _ = c.kill();
        let _ = c.wait();
        tally.failed += 1;
        tally.problem(format!("pid {} did not exit after its hold and was killed", c.id()));
    }
    alive_count.store(0, Ordering::Relaxed);
    tally
}

fn reap(alive: &mut Vec<Child>, tally: &mut Tally) {
    alive.retain_mut(|c| match c.try_wait() {
        Ok(Some(status)) => {
            tally.ended(c.id(), status);
            false
        }
        Ok(None) => true,
        Err(e) => {
            tally.failed += 1;
            tally.problem(format!("waiting for pid {}: {e}", c.id()));
            false
        }
    });
}
