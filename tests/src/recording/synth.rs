//! Synthetic recordings, written from docs/recording-format.md alone: an
//! independent writer, so the tests check the documentation as well as
//! the reader. Any size (the writer streams), any values (crafted files).
//! They are version 1 (framed records), which the tracer still reads.

use std::io::{self, Write};

use serde_json::{json, Value};

use super::layout::{crc32_of, header_only, VERSION_1};

/// Record kinds (docs/recording-format.md, "Record kinds").
pub mod kind {
    pub const KERNEL_EVENT: u16 = 1;
    pub const PROCESS: u16 = 2;
    pub const STACK: u16 = 3;
    pub const SNAPSHOT: u16 = 4;
    pub const TICK: u16 = 6;
    pub const STATS: u16 = 7;
    pub const END: u16 = 9;
}

/// Kernel event kinds, and TCP states, as the kernel numbers them.
pub const STATE: u32 = 1;
pub const CLOSE: u32 = 3;
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_SENT: u8 = 2;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_CLOSE_WAIT: u8 = 8;
/// A stack id meaning "not taken".
pub const NO_STACK: i32 = i32::MIN;

pub const SEC: u64 = 1_000_000_000;

/// A header as `tracer record` writes it.
pub fn header(leak_after_ms: u64) -> Value {
    json!({
        "tracer_version": "synthetic",
        "hostname": "test",
        "kernel_release": "test",
        "boot_to_wall_offset_ns": 1_796_100_000_000_000_000i64,
        "started_at": "2026-11-29T07:51:57.858Z",
        "options": { "pid": null, "leak_after_ms": leak_after_ms, "max_size": null }
    })
}

/// Writes records to `out`, in order.
pub struct Writer<W: Write> {
    out: W,
    pub written: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(mut out: W, header: &Value) -> io::Result<Self> {
        let prefix = header_only(VERSION_1, &header.to_string());
        out.write_all(&prefix)?;
        Ok(Writer {
            out,
            written: prefix.len() as u64,
        })
    }

    /// `len kind reserved crc payload`; the CRC covers kind, reserved and
    /// payload.
    pub fn record(&mut self, kind: u16, payload: &[u8]) -> io::Result<()> {
        self.framed(&frame(kind, payload))
    }

    /// A record made by [`frame`] (big tests write the same one often).
    pub fn framed(&mut self, record: &[u8]) -> io::Result<()> {
        self.out.write_all(record)?;
        self.written += record.len() as u64;
        Ok(())
    }

    pub fn json(&mut self, kind: u16, v: &Value) -> io::Result<()> {
        self.record(kind, v.to_string().as_bytes())
    }

    pub fn tick(&mut self, ns: u64) -> io::Result<()> {
        self.record(kind::TICK, &ns.to_le_bytes())
    }

    pub fn end(&mut self, ns: u64) -> io::Result<()> {
        self.json(kind::END, &json!({"ns": ns, "reason": "duration"}))
    }

    pub fn process(&mut self, pid: u32, comm: &str) -> io::Result<()> {
        self.json(
            kind::PROCESS,
            &json!({"pid": pid, "comm": comm, "cmdline": format!("{comm} --serve")}),
        )
    }

    /// Kernel counters (the six the format names, the rest 0).
    pub fn stats(&mut self, ns: u64, set: &[(&str, u64)]) -> io::Result<()> {
        let mut kernel = json!({"generated": 0, "ringbuf_drops": 0, "watch_full": 0, "fd_unresolved": 0,
                                "close_range_truncated": 0, "stack_errors": 0});
        for (name, n) in set {
            kernel[*name] = json!(n);
        }
        self.json(kind::STATS, &json!({"ns": ns, "kernel": kernel}))
    }

    /// The start-up snapshot, in records of `part` sockets.
    pub fn snapshot(&mut self, ns: u64, sockets: &[Value], part: usize) -> io::Result<()> {
        let chunks: Vec<&[Value]> = if sockets.is_empty() {
            vec![&[]]
        } else {
            sockets.chunks(part).collect()
        };
        let parts = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            self.json(
                kind::SNAPSHOT,
                &json!({"ns": ns, "part": i, "parts": parts, "total": sockets.len(), "sockets": chunk}),
            )?;
        }
        Ok(())
    }

    pub fn event(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.record(kind::KERNEL_EVENT, bytes)
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One whole record: `len kind reserved crc payload`, the CRC over kind,
/// reserved and payload.
pub fn frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + payload.len());
    out.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    let crc = crc32_of(&[&out[4..8], payload]);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A snapshot socket held by `pid` (fd 3 onwards) from 10.0.x.y.
pub fn snapshot_socket(cookie: u64, state: u8, pid: u32, last_ack_age_ns: Option<u64>) -> Value {
    json!({
        "cookie": cookie,
        "state": state,
        "endpoints": {
            "local": format!("10.0.{}.{}:{}", (cookie >> 16) & 0xff, (cookie >> 8) & 0xff, 1024 + (cookie & 0xff)),
            "remote": "10.1.0.1:443",
        },
        "holder": [pid, "server", 3 + (cookie % 60000)],
        "last_ack_age_ns": last_ack_age_ns,
    })
}

/// The 64-byte header every kernel event starts with.
fn event_header(kind: u32, ns: u64, pid: u32, comm: &[u8], cookie: u64, ustack: i32) -> Vec<u8> {
    let mut b = Vec::with_capacity(112);
    b.extend_from_slice(&kind.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // cpu
    b.extend_from_slice(&ns.to_le_bytes());
    b.extend_from_slice(&pid.to_le_bytes()); // tgid
    b.extend_from_slice(&pid.to_le_bytes()); // tid
    let mut c = [0u8; 16];
    let n = comm.len().min(15);
    c[..n].copy_from_slice(&comm[..n]);
    b.extend_from_slice(&c);
    b.extend_from_slice(&cookie.to_le_bytes());
    b.extend_from_slice(&(0x1000 + cookie).to_le_bytes()); // struct sock address
    b.extend_from_slice(&ustack.to_le_bytes());
    b.extend_from_slice(&NO_STACK.to_le_bytes()); // kernel stack
    assert_eq!(b.len(), 64);
    b
}

/// A state event (kind 1, 112 bytes) of an IPv4 socket 127.0.0.1:port ->
/// 127.0.0.1:8080, on entering CLOSE_WAIT with 26 bytes unread.
pub fn state_event(ns: u64, pid: u32, comm: &[u8], cookie: u64, old: u8, new: u8, ustack: i32) -> Vec<u8> {
    let mut b = event_header(STATE, ns, pid, comm, cookie, ustack);
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    b.extend_from_slice(&addr);
    b.extend_from_slice(&addr);
    b.extend_from_slice(&(40000u16.wrapping_add(cookie as u16)).to_le_bytes());
    b.extend_from_slice(&8080u16.to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes()); // AF_INET
    b.push(old);
    b.push(new);
    b.extend_from_slice(&27u32.to_le_bytes()); // rx_queue: 26 bytes + the FIN
    b.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(b.len(), 112);
    b
}

/// An accept or close event (kinds 2, 3; 72 bytes).
pub fn fd_event(kind: u32, ns: u64, pid: u32, comm: &[u8], cookie: u64, fd: i32) -> Vec<u8> {
    let mut b = event_header(kind, ns, pid, comm, cookie, NO_STACK);
    b.extend_from_slice(&fd.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(b.len(), 72);
    b
}

/// A connection of `pid` that reaches CLOSE_WAIT: connect at `ns`
/// (opened from user stack `ustack`), the FIN at `fin_ns`.
pub fn connect_then_fin<W: Write>(
    w: &mut Writer<W>,
    (ns, fin_ns): (u64, u64),
    pid: u32,
    comm: &[u8],
    cookie: u64,
    ustack: i32,
) -> io::Result<()> {
    w.event(&state_event(ns, pid, comm, cookie, TCP_CLOSE, TCP_SYN_SENT, ustack))?;
    w.event(&state_event(
        ns,
        pid,
        comm,
        cookie,
        TCP_SYN_SENT,
        TCP_ESTABLISHED,
        NO_STACK,
    ))?;
    w.event(&state_event(
        fin_ns,
        pid,
        comm,
        cookie,
        TCP_ESTABLISHED,
        TCP_CLOSE_WAIT,
        NO_STACK,
    ))
}
