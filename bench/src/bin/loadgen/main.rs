//! Loopback TCP load generator for the tracer benchmark.
//!
//! ```text
//! loadgen server [--threads T] [--addrs N] [--port P] [--duration SECS]
//! loadgen client --port P [--mode MODE] [--duration SECS] [--threads T] [--addrs N]
//!                [--leak-percent P] [--leak-max M] [--open N] [--rate R] [--sync]
//! loadgen run    [client options but --port and --sync] [--server-threads T]
//! loadgen leak   --connect ADDR:PORT [--hold SECS]
//! ```
//!
//! The server listens on 127.0.0.1, 127.0.0.2, … (`--addrs` addresses; one
//! SO_REUSEPORT listener per address and thread, never a routable address),
//! accepts, reads what the client sent, and closes. The client spreads its
//! connections over those addresses so that TIME_WAIT does not exhaust the
//! ephemeral ports of one destination. `run` starts the server as a child
//! process (client and server are always separate processes) and runs the
//! client. Only 127.0.0.0/8 is ever used.
//!
//! Modes (client):
//! - `churn`: connect, write 8 bytes, close. Ten TCP state changes per
//!   connection, counting both ends.
//! - `churn-leak`: the same, but `--leak-percent` of the connections are not
//!   closed by the client: the server closes them, so they sit in CLOSE_WAIT
//!   in the client. At most `--leak-max` are kept; beyond, the oldest is
//!   closed (a late close).
//! - `many-sockets`: first open `--open` (default 100000) idle connections,
//!   kept open to the end, then churn. They are held, both ends, by
//!   `loadgen hold` helper processes (internal), each with as many as its
//!   RLIMIT_NOFILE allows: the limit is raised as far as permitted, and a
//!   machine without CAP_SYS_RESOURCE (a container) needs about one helper
//!   per 10 000 connections.
//!
//! `--rate R` paces the churn to R connections per second in all (default
//! 0: as fast as it goes), for a load that keeps a machine busy without
//! saturating it (the soak).
//!
//! `leak` is one leaking process (the soak starts thousands of them, each
//! with its own address-space layout): it connects, never reads nor
//! closes, and exits `--hold` seconds later; exit code 3 when its socket
//! never reached CLOSE_WAIT in that time (the peer did not close).
//!
//! Protocol for a harness (stderr, one line each): the server prints
//! `READY port=P addrs=N threads=T` once it listens; the client prints
//! `READY mode=...` once its preparation (the idle connections) is done.
//! With `--sync` the client then waits for a line on stdin before it starts,
//! and after printing its result waits for stdin to close before it exits
//! and closes its idle and leaked connections. The result is one JSON line
//! on stdout:
//! `{"mode":"churn","connections":N,"seconds":F,"conn_per_sec":F,"errors":N,...}`.
//! The client always stops by itself after `--duration` (default 5 s).

//!
//! Modules: [`opts`] (the command line), [`server`], [`client`] (the churn),
//! [`idle`] (many-sockets' idle connections and their `hold` helpers),
//! [`leak`], [`spawn`] (helper processes), [`sys`] (addresses, rlimits).

mod client;
mod idle;
mod leak;
mod opts;
mod server;
mod spawn;
mod sys;

use std::io;
use std::process::ExitCode;

use opts::{Opts, Role};
use spawn::{forward_lines, spawn_self, wait_ready};

const USAGE: &str = "usage:
  loadgen server [--threads T] [--addrs N] [--port P] [--duration SECS]
  loadgen client --port P [--mode churn|churn-leak|many-sockets] [--duration SECS] [--threads T]
                 [--addrs N] [--leak-percent P] [--leak-max M] [--open N] [--rate R] [--sync]
  loadgen run    [client options but --port and --sync] [--server-threads T]
  loadgen leak   --connect ADDR:PORT [--hold SECS]
defaults: --threads 2, --addrs 64, --duration 5 (client), --leak-percent 1, --leak-max 10000,
          --open 100000 with many-sockets, --rate 0 (unpaced), --port 0 (server: the kernel picks),
          --hold 3";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("server") => Opts::parse(&args[1..], Role::Server).and_then(|o| server::server(&o)),
        Some("client") => Opts::parse(&args[1..], Role::Client).and_then(|o| client::client(&o).map(|_| ())),
        Some("run") => Opts::parse(&args[1..], Role::Run).and_then(|o| run(&o)),
        Some("hold") => idle::hold(&args[1..]),
        Some("leak") => leak::leak(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(Error::Usage("expected a command: server, client, run or leak".into())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Usage(msg)) => {
            eprintln!("loadgen: {msg}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Error::Io(what, e)) => {
            eprintln!("loadgen: {what}: {e}");
            ExitCode::FAILURE
        }
        Err(Error::NoCloseWait(why)) => {
            eprintln!("loadgen leak: {why}");
            ExitCode::from(3)
        }
    }
}

#[derive(Debug)]
pub enum Error {
    Usage(String),
    Io(String, io::Error),
    /// `leak`: the socket never reached CLOSE_WAIT (exit code 3).
    NoCloseWait(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Io(what(), e))
    }
}

/// Server as a child process (killed with us), client in this process.
fn run(o: &Opts) -> Result<()> {
    let args = [
        "server".to_owned(),
        "--threads".to_owned(),
        o.server_threads.to_string(),
        "--addrs".to_owned(),
        o.addrs.to_string(),
    ];
    let mut child = spawn_self(&args).context(|| "starting the server".into())?;
    let stderr = child.stderr.take().expect("piped");
    let result = match wait_ready(stderr, "READY port=") {
        Ok((rest, lines)) => {
            forward_lines(lines);
            match rest.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()) {
                Some(port) => client::client(&Opts { port, ..o.clone() }).map(|_| ()),
                None => Err(Error::Io(
                    "starting the server".into(),
                    io::Error::other(format!("bad READY line: {rest}")),
                )),
            }
        }
        Err(e) => Err(Error::Io("starting the server".into(), e)),
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}
