//! A loopback churn in a process of its own, so that `tracer record --pid`
//! records both ends of every connection and nothing else: the server
//! accepts, reads and closes; the client connects, writes 8 bytes and
//! closes (13 events a connection: 10 state changes, an accept, two
//! closes), as the bench's loadgen churn does. Then a few connections are
//! leaked: the server replies and closes, the client never reads nor
//! closes, so they stay in CLOSE_WAIT until the process exits.
//!
//! The process is the calling test binary itself, re-run for one test
//! ([`CHURN_TEST`]) that calls [`churn_process`]: see [`spawn_churn`].

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::Child;

/// The environment variable that makes [`churn_process`] run: `N,RATE,LEAKS`.
pub const CHURN_ENV: &str = "TRACER_TEST_CHURN";

/// What the test binary must define, `#[ignore]`d, calling
/// [`churn_process`].
pub const CHURN_TEST: &str = "churn_process";

/// Connections of the churn, its rate (per second; 0: unpaced) and the
/// connections then leaked.
#[derive(Clone, Copy, Debug)]
pub struct ChurnSpec {
    pub connections: u64,
    pub rate: u64,
    pub leaks: u64,
}

/// Starts this test binary as a churn process; it prints `READY` and waits
/// for [`start_churn`].
pub fn spawn_churn(spec: ChurnSpec) -> Child {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([CHURN_TEST, "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(CHURN_ENV, format!("{},{},{}", spec.connections, spec.rate, spec.leaks));
    let mut child = Child::spawn("churn", cmd);
    child.wait_line(|l| l.contains("READY "), Duration::from_secs(30));
    child
}

/// Runs the churn, and waits until it has opened its leaks (`DONE`).
pub fn start_churn(child: &mut Child, timeout: Duration) {
    child.send_line("go");
    child.wait_line(|l| l.contains("DONE "), timeout);
}

/// The churn process's body: does nothing unless [`CHURN_ENV`] is set.
pub fn churn_process() {
    let Ok(spec) = std::env::var(CHURN_ENV) else {
        return;
    };
    let n: Vec<u64> = spec.split(',').map(|v| v.parse().expect("N,RATE,LEAKS")).collect();
    let (connections, rate, leaks) = (n[0], n[1], n[2]);

    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = server.local_addr().expect("addr");
    let served = std::thread::spawn(move || {
        for _ in 0..connections {
            let (mut s, _) = server.accept().expect("accept");
            let mut buf = [0u8; 64];
            // Until the client's close.
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
    let leak_server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let leak_addr = leak_server.local_addr().expect("addr");
    let replied = std::thread::spawn(move || {
        for _ in 0..leaks {
            let (mut s, _) = leak_server.accept().expect("accept");
            s.write_all(&[b'x'; 26]).expect("reply");
        }
    });

    let mut stdout = std::io::stdout();
    writeln!(stdout, "READY {}", std::process::id()).expect("stdout");
    stdout.flush().expect("stdout");
    let mut line = String::new();
    let stdin = std::io::stdin();
    stdin.lock().read_line(&mut line).expect("stdin");

    let start = Instant::now();
    for i in 0..connections {
        if rate > 0 && i % 50 == 0 {
            let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let mut c = TcpStream::connect(addr).expect("connect");
        c.write_all(b"12345678").expect("write");
    }
    served.join().expect("server");
    let held: Vec<TcpStream> = (0..leaks)
        .map(|_| TcpStream::connect(leak_addr).expect("connect"))
        .collect();
    replied.join().expect("leak server");
    writeln!(
        stdout,
        "DONE {connections} connections in {:.2}s, {leaks} leaked",
        start.elapsed().as_secs_f64()
    )
    .expect("stdout");
    stdout.flush().expect("stdout");
    // Until the test is done with the leaks.
    let mut rest = String::new();
    let _ = stdin.lock().read_to_string(&mut rest);
    drop(held);
}
