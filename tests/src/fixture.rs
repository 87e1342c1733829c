//! Driving the `tcp-fixture` program: [`spawn_server`], [`start_client`],
//! [`wait_client_done`], [`spawn_client`], its `SOCK` lines and its
//! `--fork-holder` child ([`holder_pid`]); each also `_via` a wrapper
//! that runs it in another namespace ([`fixture_command`]).

use std::process::Command;
use std::time::Duration;

use crate::addr::normalize_addr;
use crate::child::Child;
use crate::paths::fixture_bin;

/// One `SOCK <local> <remote> <fd>` line of the fixture client. Addresses
/// are normalised with [`normalize_addr`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SockLine {
    pub local: String,
    pub remote: String,
    pub fd: i32,
}

impl SockLine {
    pub fn parse(line: &str) -> Option<SockLine> {
        let mut it = line.split_whitespace();
        if it.next()? != "SOCK" {
            return None;
        }
        let local = normalize_addr(it.next()?);
        let remote = normalize_addr(it.next()?);
        let fd = it.next()?.parse().ok()?;
        if it.next().is_some() {
            return None;
        }
        Some(SockLine { local, remote, fd })
    }
}

/// `tcp-fixture`, run through `wrapper` when it is not empty: a command
/// that runs its arguments in place, as the same process (e.g. `ip netns
/// exec NAME`, `nsenter --net=FILE`), so the child's pid is the fixture's.
pub fn fixture_command(wrapper: &[&str]) -> Command {
    match wrapper.split_first() {
        None => Command::new(fixture_bin()),
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(fixture_bin());
            cmd
        }
    }
}

/// Starts `tcp-fixture server --listen LISTEN ARGS...` and waits for its
/// `READY <port>` line.
pub fn spawn_server(listen: &str, args: &[&str]) -> (Child, u16) {
    spawn_server_via(&[], listen, args)
}

/// [`spawn_server`] through `wrapper` (see [`fixture_command`]).
pub fn spawn_server_via(wrapper: &[&str], listen: &str, args: &[&str]) -> (Child, u16) {
    let mut cmd = fixture_command(wrapper);
    cmd.arg("server").arg("--listen").arg(listen).args(args);
    let mut child = Child::spawn(&format!("fixture server {listen} {args:?} via {wrapper:?}"), cmd);
    let line = child.wait_line(|l| l.starts_with("READY "), Duration::from_secs(10));
    let port = line["READY ".len()..]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad READY line from fixture server: {line:?}"));
    (child, port)
}

/// Starts `tcp-fixture client ARGS...` without waiting for anything (use
/// with `--wait-stdin-line`, then [`wait_client_done`]).
pub fn start_client(args: &[&str]) -> Child {
    start_client_via(&[], args)
}

/// [`start_client`] through `wrapper` (see [`fixture_command`]).
pub fn start_client_via(wrapper: &[&str], args: &[&str]) -> Child {
    let mut cmd = fixture_command(wrapper);
    cmd.arg("client").args(args);
    Child::spawn(&format!("fixture client {args:?} via {wrapper:?}"), cmd)
}

/// Waits for the client's `DONE <pid>` line and its `count` `SOCK` lines.
/// A `--fork-holder` client's child (its `HOLDER` line comes first) is
/// registered to be killed with the client: see [`holder_pid`].
pub fn wait_client_done(child: &mut Child, count: usize) -> Vec<SockLine> {
    let timeout = Duration::from_secs(20);
    let done = child.wait_line(|l| l.starts_with("DONE "), timeout);
    let pid: u32 = done["DONE ".len()..]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad DONE line: {done:?}"));
    assert_eq!(pid, child.pid(), "DONE pid is not the child's pid");
    if let Some(holder) = holder_pid(child) {
        child.kill_on_drop(holder);
    }
    let mut socks = Vec::with_capacity(count);
    while socks.len() < count {
        let line = child.wait_line(|l| l.starts_with("SOCK "), timeout);
        socks.push(SockLine::parse(&line).unwrap_or_else(|| panic!("bad SOCK line from client: {line:?}")));
    }
    socks
}

/// The pid of a `--fork-holder` client's child, from the `HOLDER <pid>`
/// line the client prints before `DONE` (so known once
/// [`wait_client_done`] returned). `None` without `--fork-holder`.
pub fn holder_pid(child: &Child) -> Option<u32> {
    child.lines_seen().iter().find_map(|l| {
        let pid = l.strip_prefix("HOLDER ")?.trim();
        Some(
            pid.parse()
                .unwrap_or_else(|_| panic!("bad HOLDER line from {}: {l:?}", child.name())),
        )
    })
}

/// Starts `tcp-fixture client ARGS...` and waits until it has opened its
/// connections (`DONE`), returning the child and its `SOCK` lines. The
/// number of sockets is taken from `--count` (default 1).
pub fn spawn_client(args: &[&str]) -> (Child, Vec<SockLine>) {
    spawn_client_via(&[], args)
}

/// [`spawn_client`] through `wrapper` (see [`fixture_command`]).
pub fn spawn_client_via(wrapper: &[&str], args: &[&str]) -> (Child, Vec<SockLine>) {
    let count = args
        .iter()
        .position(|a| *a == "--count")
        .map(|i| {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .expect("--count needs a number")
        })
        .unwrap_or(1);
    let mut child = start_client_via(wrapper, args);
    let socks = wait_client_done(&mut child, count);
    (child, socks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_lines() {
        assert_eq!(
            SockLine::parse("SOCK [::ffff:127.0.0.1]:37482 [::ffff:127.0.0.1]:42843 3"),
            Some(SockLine {
                local: "[::ffff:127.0.0.1]:37482".into(),
                remote: "[::ffff:127.0.0.1]:42843".into(),
                fd: 3
            })
        );
        assert_eq!(SockLine::parse("DONE 12"), None);
        assert_eq!(SockLine::parse("SOCK a b"), None);
    }
}
