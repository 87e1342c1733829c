//! `loadgen leak --connect ADDR:PORT [--hold SECS]`: one leaking process,
//! for the soak, which starts thousands of them (each process has its own
//! address-space layout, so each brings the tracer new stack addresses).
//!
//! It connects, never reads and never closes; the peer replies and closes,
//! so the socket sits in CLOSE_WAIT until this process exits, `--hold`
//! seconds after connecting. It says nothing when all went well (there
//! are thousands); its exit code tells the soak whether the socket really
//! reached CLOSE_WAIT (0) or not (3), so that the soak counts only real
//! leaks as leaks the tracer had to find.

use std::hint::black_box;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use crate::{Context, Error, Result};

/// The kernel's TCP_CLOSE_WAIT (include/net/tcp_states.h).
const TCP_CLOSE_WAIT: u8 = 8;
/// How often the socket's state is polled until it is in CLOSE_WAIT.
const POLL: Duration = Duration::from_millis(10);

pub fn leak(args: &[String]) -> Result<()> {
    let mut connect = None;
    let mut hold = Duration::from_secs(3);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| Error::Usage(format!("{flag} needs a value")))?;
        let bad = || Error::Usage(format!("bad value for {flag}: {value}"));
        match flag.as_str() {
            "--connect" => connect = Some(value.parse::<SocketAddr>().map_err(|_| bad())?),
            "--hold" => {
                let secs: f64 = value.parse().map_err(|_| bad())?;
                if !(secs.is_finite() && secs > 0.0) {
                    return Err(bad());
                }
                hold = Duration::from_secs_f64(secs);
            }
            _ => return Err(Error::Usage(format!("unknown option {flag}"))),
        }
    }
    let addr = connect.ok_or_else(|| Error::Usage("leak needs --connect ADDR:PORT".into()))?;

    let began = Instant::now();
    let stream = open_leaking_socket(addr).context(|| format!("connecting to {addr}"))?;
    let mut reached = None;
    loop {
        let elapsed = began.elapsed();
        if reached.is_none() && tcp_state(&stream).context(|| "getsockopt(TCP_INFO)".into())? == TCP_CLOSE_WAIT {
            reached = Some(elapsed);
        }
        if elapsed >= hold {
            break;
        }
        // Once in CLOSE_WAIT there is nothing left to watch: sleep it out.
        let nap = if reached.is_some() {
            hold - elapsed
        } else {
            POLL.min(hold - elapsed)
        };
        thread::sleep(nap);
    }
    // Exiting closes the socket: the leak ends with the process.
    drop(black_box(stream));
    match reached {
        Some(_) => Ok(()),
        None => Err(Error::NoCloseWait(format!(
            "the socket to {addr} never reached CLOSE_WAIT in {:.1}s (did the server close it?)",
            hold.as_secs_f64()
        ))),
    }
}

/// The connect whose stack the tracer must report. Never inlined, and the
/// result goes through `black_box` so that the connect is no tail call:
/// this function keeps its frame, and its name is in the stack.
#[inline(never)]
fn open_leaking_socket(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(black_box(addr));
    black_box(stream)
}

/// `tcpi_state`, the first byte of `struct tcp_info`.
fn tcp_state(stream: &TcpStream) -> io::Result<u8> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: the buffer is valid for `len` bytes; the kernel writes at most
    // that many and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[0])
}
