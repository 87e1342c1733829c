//! Synthetic recordings for tests: inputs made up here, written by the
//! real writer, read back by the real reader and replay.

use std::net::SocketAddr;

use serde_json::Value;
use tracer_common::{tcp, EventKind, FdEvent, Header as EventHeader, StateEvent, NO_STACK};

use super::{
    codec, format,
    reader::Reader,
    writer::{Header, HeaderOptions, Recorder},
};
use crate::{
    correlate::{Comm, Endpoints, SnapshotSocket},
    decode::Event,
    input::{EndInput, Input, ProcessInput, SnapshotInput, StatsInput},
    kernel::KernelStats,
    replay::{self, Replay},
    sink::JsonSink,
};

pub const MS: u64 = 1_000_000;
pub const SEC: u64 = 1000 * MS;

pub fn header(leak_after_ms: u64) -> Header {
    Header {
        tracer_version: "test".into(),
        hostname: "test".into(),
        kernel_release: "test".into(),
        boot_to_wall_offset_ns: 0,
        started_at: "2026-01-01T00:00:00.000Z".into(),
        options: HeaderOptions {
            pid: None,
            leak_after_ms,
            max_size: None,
        },
    }
}

/// A whole recording file, written with snapshot parts of `part` sockets.
pub fn write(header: &Header, inputs: &[Input], part: usize) -> Vec<u8> {
    let mut r = Recorder::new(Vec::new(), header)
        .expect("in memory")
        .with_snapshot_part(part);
    for input in inputs {
        r.write(input).expect("in memory");
    }
    r.into_inner()
}

/// The same, in blocks that end once their records pass `block_target`
/// bytes (1: every record in a block of its own).
pub fn write_with(header: &Header, inputs: &[Input], part: usize, block_target: usize) -> Vec<u8> {
    let mut r = Recorder::new(Vec::new(), header)
        .expect("in memory")
        .with_snapshot_part(part)
        .with_block_target(block_target);
    for input in inputs {
        r.write(input).expect("in memory");
    }
    r.into_inner()
}

/// The same, each record in a block of its own: damage to a block then
/// hits one record.
pub fn write_blocks(header: &Header, inputs: &[Input], part: usize) -> Vec<u8> {
    let mut r = Recorder::new(Vec::new(), header)
        .expect("in memory")
        .with_snapshot_part(part)
        .with_block_target(1);
    for input in inputs {
        r.write(input).expect("in memory");
    }
    r.into_inner()
}

/// `(offset, length)` of each version-2 block of `file`, from the lengths
/// alone (no checksum is checked).
pub fn blocks(file: &[u8]) -> Vec<(usize, usize)> {
    let hlen = u32::from_le_bytes(file[12..16].try_into().expect("a header")) as usize;
    let mut at = 16 + hlen + 4;
    let mut out = Vec::new();
    while at + format::BLOCK_HEADER <= file.len() {
        let len = u32::from_le_bytes(file[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
        let total = (format::BLOCK_HEADER + len).min(file.len() - at);
        out.push((at, total));
        at += total;
    }
    out
}

/// A version-1 recording of the same inputs, as the tracer wrote them
/// before version 2 (framed records, uncompressed).
pub fn write_v1(header: &Header, inputs: &[Input], part: usize) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("serializes");
    let mut out = format::encode_file_header(format::VERSION_1, &json);
    for input in inputs {
        codec::encode(input, &mut out, part);
    }
    out
}

pub fn replay<'a>(files: &[&'a [u8]]) -> anyhow::Result<Replay<&'a [u8]>> {
    let readers = files
        .iter()
        .enumerate()
        .map(|(i, f)| Reader::new(format!("file{i}"), *f))
        .collect::<Result<Vec<_>, _>>()?;
    Replay::from_readers(readers)
}

/// `tracer report --json` of `files` (the first header's threshold unless
/// `leak_after_ns`): every output object, the summary last.
pub fn report(files: &[&[u8]], leak_after_ns: Option<u64>) -> anyhow::Result<Vec<Value>> {
    let replay = replay(files)?;
    let leak_after = leak_after_ns.unwrap_or_else(|| replay::leak_after_ns(&replay.header));
    let mut out = Vec::new();
    let mut sink = JsonSink::new(&mut out);
    let summary = replay::analyse(replay, None, leak_after, true, false, &mut sink)?;
    crate::sink::Sink::summary(&mut sink, &summary)?;
    Ok(out
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("JSON lines"))
        .collect())
}

pub fn of_type<'a>(objects: &'a [Value], ty: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["type"] == ty).collect()
}

pub fn summary(objects: &[Value]) -> &Value {
    let s = objects.last().expect("output");
    assert_eq!(s["type"], "summary", "{s}");
    s
}

pub fn damage(objects: &[Value]) -> Vec<String> {
    summary(objects)["recording"]["damage"]
        .as_array()
        .expect("recording.damage")
        .iter()
        .map(|d| d.as_str().expect("a string").to_string())
        .collect()
}

fn event_header(kind: EventKind, ns: u64, pid: u32, cookie: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        cpu: 0,
        ktime_ns: ns,
        tgid: pid,
        tid: pid,
        comm: Comm::from_str("client").0,
        cookie,
        skaddr: 0x1000 + cookie,
        ustack: NO_STACK,
        kstack: NO_STACK,
    }
}

pub fn state(ns: u64, pid: u32, cookie: u64, old: u8, new: u8) -> Input {
    Input::Kernel(Event::State(StateEvent {
        header: event_header(EventKind::State, ns, pid, cookie),
        saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        daddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sport: 40000u16.wrapping_add(cookie as u16),
        dport: 8080,
        family: 2,
        oldstate: old,
        newstate: new,
        rx_queue: 27,
        _pad: 0,
    }))
}

pub fn close(ns: u64, pid: u32, cookie: u64, fd: i32) -> Input {
    Input::Kernel(Event::Close(FdEvent {
        header: event_header(EventKind::Close, ns, pid, cookie),
        fd,
        _pad: 0,
    }))
}

/// A client's connection to CLOSE_WAIT: connect at `ns`, FIN at `fin_ns`.
pub fn connect_then_fin(ns: u64, fin_ns: u64, pid: u32, cookie: u64) -> Vec<Input> {
    vec![
        state(ns, pid, cookie, tcp::CLOSE, tcp::SYN_SENT),
        state(ns, pid, cookie, tcp::SYN_SENT, tcp::ESTABLISHED),
        state(fin_ns, pid, cookie, tcp::ESTABLISHED, tcp::CLOSE_WAIT),
    ]
}

pub fn process(pid: u32, comm: &str) -> Input {
    Input::Process(
        serde_json::from_value::<ProcessInput>(serde_json::json!({
            "pid": pid, "comm": comm, "cmdline": format!("{comm} --serve")
        }))
        .expect("a process input"),
    )
}

pub fn socket(cookie: u64, state: u8, holder: u32, last_ack_age_ns: Option<u64>) -> SnapshotSocket {
    let [.., a, b, c] = cookie.to_be_bytes();
    SnapshotSocket {
        cookie,
        state,
        endpoints: Endpoints {
            local: SocketAddr::from(([10, 0, a, b], 1024 + u16::from(c))),
            remote: SocketAddr::from(([10, 1, 0, 1], 443)),
        },
        holder: Some((holder, Comm::from_str("server"), (cookie % 60000) as i32 + 3)),
        last_ack_age_ns,
    }
}

pub fn snapshot(ns: u64, sockets: Vec<SnapshotSocket>) -> Input {
    Input::Snapshot(SnapshotInput { ns, sockets })
}

/// Kernel counters with the fields named in `set` given (all others 0).
pub fn stats(ns: u64, set: &[(&str, u64)]) -> Input {
    let mut v = serde_json::to_value(KernelStats::default()).expect("serializes");
    for (name, n) in set {
        assert!(v.get(*name).is_some(), "KernelStats has no {name}");
        v[*name] = Value::from(*n);
    }
    Input::Stats(StatsInput {
        ns,
        kernel: serde_json::from_value(v).expect("KernelStats"),
    })
}

pub fn end(ns: u64) -> Input {
    Input::End(EndInput {
        ns,
        reason: "duration".into(),
    })
}
