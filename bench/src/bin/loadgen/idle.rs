//! many-sockets' idle connections: opened before the churn and held open
//! to the end, both ends, by `loadgen hold` helper processes, so that
//! neither the server nor the client spends file descriptors on them.

use std::io::{self, Read};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::process::Child;
use std::time::Instant;

use crate::opts::Opts;
use crate::spawn::{forward_lines, spawn_self, wait_ready};
use crate::sys::{dest_addr, raise_nofile, MAX_ADDRS};
use crate::{Context, Error, Result};

/// Opens `--open` idle connections (many-sockets). They are held by
/// `loadgen hold` helper processes, both ends in the same helper, so that
/// neither the server nor this client spends file descriptors on them: as
/// many helpers as RLIMIT_NOFILE requires (one when it can be raised far
/// enough; on a machine without CAP_SYS_RESOURCE, about one per 10 000).
pub fn open_idle(o: &Opts) -> Result<(Vec<Child>, usize)> {
    if o.open == 0 {
        return Ok((Vec::new(), 0));
    }
    let started = Instant::now();
    // Helpers inherit the raised limit; each needs two fds per connection.
    let limit = raise_nofile(2 * o.open + 256);
    let per_helper = (limit.saturating_sub(256) / 2).max(1);
    let helpers = o.open.div_ceil(per_helper);
    if helpers > MAX_ADDRS - o.addrs {
        return Err(Error::Usage(format!(
            "--open {} needs {helpers} helper processes at RLIMIT_NOFILE {limit}: too many",
            o.open
        )));
    }
    let mut children = Vec::with_capacity(helpers);
    for h in 0..helpers {
        let count = o.open / helpers + usize::from(h < o.open % helpers);
        // Each helper listens on its own address, from the top of the range
        // down, away from the churn destinations at the bottom.
        let args = [
            "hold".to_owned(),
            "--count".to_owned(),
            count.to_string(),
            "--addr".to_owned(),
            (MAX_ADDRS - 1 - h).to_string(),
        ];
        children.push(spawn_self(&args).context(|| "starting a hold helper".into())?);
    }
    let mut held = 0;
    for child in &mut children {
        let stderr = child.stderr.take().expect("piped");
        let (rest, lines) = wait_ready(stderr, "READY held=").context(|| "starting a hold helper".into())?;
        held += rest.trim().parse::<usize>().unwrap_or(0);
        forward_lines(lines);
    }
    eprintln!(
        "loadgen client: {held} idle connections open after {:.1}s ({helpers} helper process(es))",
        started.elapsed().as_secs_f64()
    );
    Ok((children, held))
}

/// Lets the helpers go (they exit when their stdin closes) and waits, so
/// that the idle connections are gone when we exit.
pub fn close_idle(children: Vec<Child>) {
    let mut children = children;
    for c in &mut children {
        drop(c.stdin.take());
    }
    for mut c in children {
        let _ = c.wait();
    }
}

/// `loadgen hold --count K --addr I`: listens on the I-th address, connects
/// to itself K times and accepts each, then holds both ends until stdin
/// closes (or the parent dies).
pub fn hold(args: &[String]) -> Result<()> {
    let mut count = None;
    let mut addr = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| Error::Usage(format!("{flag} needs a value")))?;
        let n: usize = value
            .parse()
            .map_err(|_| Error::Usage(format!("bad value for {flag}: {value}")))?;
        match flag.as_str() {
            "--count" => count = Some(n),
            "--addr" => addr = Some(n),
            _ => return Err(Error::Usage(format!("unknown option {flag}"))),
        }
    }
    let (Some(count), Some(addr)) = (count, addr) else {
        return Err(Error::Usage("hold needs --count and --addr".into()));
    };
    let limit = raise_nofile(2 * count + 64);
    if limit < 2 * count + 16 {
        return Err(Error::Io(
            format!("holding {count} connections"),
            io::Error::other(format!("RLIMIT_NOFILE is {limit}")),
        ));
    }
    let listen = SocketAddrV4::new(dest_addr(addr), 0);
    let listener = TcpListener::bind(listen).context(|| format!("listening on {listen}"))?;
    let target = listener.local_addr().context(|| "getsockname".into())?;
    let mut held = Vec::with_capacity(2 * count);
    for _ in 0..count {
        held.push(TcpStream::connect(target).context(|| format!("connecting to {target}"))?);
        held.push(listener.accept().context(|| "accepting".into())?.0);
    }
    drop(listener);
    eprintln!("READY held={count}");
    let mut sink = Vec::new();
    let _ = io::stdin().read_to_end(&mut sink);
    Ok(())
}
