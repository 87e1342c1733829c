//! Analysis inputs <-> record payloads. Kernel events keep their binary
//! wire layout (the hot path; version 2 encodes it field by field in its
//! blocks, [`super::events`]); everything else is JSON.

use serde::{Deserialize, Serialize};

#[cfg(test)]
use super::format::encode_record;
use super::format::Kind;
use crate::{
    correlate::SnapshotSocket,
    decode,
    input::{Input, SnapshotInput},
};

/// Sockets per snapshot record. One socket is at most about 400 bytes of
/// JSON (two IPv6 endpoints, a comm of escaped bytes, u64 fields), so a
/// part stays far below the 16 MiB record limit whatever the host: a
/// single record held every socket and was dropped as corrupt above ~120k.
pub const SNAPSHOT_PART: usize = 8192;

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("recorded types always serialize")
}

/// One snapshot record as written: `part` of `parts`, all with the same
/// `ns`, and `total` sockets in the whole snapshot (so a reader knows the
/// size from any part).
#[derive(Serialize)]
struct SnapshotPartOut<'a> {
    ns: u64,
    part: u32,
    parts: u32,
    total: u64,
    sockets: &'a [SnapshotSocket],
}

/// A snapshot record as read. Recordings made before snapshots were split
/// have one record without `part`, `parts` and `total`.
#[derive(Deserialize)]
struct SnapshotPartIn {
    ns: u64,
    part: Option<u32>,
    parts: Option<u32>,
    total: Option<u64>,
    sockets: Vec<SnapshotSocket>,
}

/// Where a snapshot record sits in its snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotPart {
    pub ns: u64,
    pub part: u32,
    pub parts: u32,
    /// Sockets in the whole snapshot.
    pub total: u64,
}

/// Appends `input` as framed version-1 records: one, except for a
/// snapshot, which is split into parts of `part_size` sockets
/// ([`SNAPSHOT_PART`]; tests use small parts, to see many). Tests only:
/// the tracer writes version 2.
#[cfg(test)]
pub fn encode(input: &Input, out: &mut Vec<u8>, part_size: usize) {
    payloads(input, part_size, |kind, payload| encode_record(out, kind, payload));
}

/// Gives `input`'s records to `f`, as (kind, payload): one, except for a
/// snapshot, in parts of `part_size` sockets. Kernel events (the bulk)
/// are given as their wire bytes, without a copy.
pub fn payloads(input: &Input, part_size: usize, mut f: impl FnMut(Kind, &[u8])) {
    let (kind, payload) = match input {
        Input::Kernel(ev) => return f(Kind::KernelEvent, kernel_bytes(ev)),
        Input::Snapshot(s) => return snapshot_parts(s, part_size.max(1), f),
        Input::Process(p) => (Kind::Process, json(p)),
        Input::Stack(s) => (Kind::Stack, json(s)),
        Input::Evidence(e) => (Kind::Evidence, json(e)),
        Input::Tick(ns) => (Kind::Tick, ns.to_le_bytes().to_vec()),
        Input::Stats(s) => (Kind::Stats, json(s)),
        Input::ProcessExit(e) => (Kind::ProcessExit, json(e)),
        Input::End(e) => (Kind::End, json(e)),
        Input::Forget(f) => (Kind::Forget, json(f)),
    };
    f(kind, &payload);
}

fn snapshot_parts(s: &SnapshotInput, part_size: usize, mut f: impl FnMut(Kind, &[u8])) {
    // An empty snapshot is still one record: it says when tracing started.
    let chunks: Vec<&[SnapshotSocket]> = if s.sockets.is_empty() {
        vec![&[]]
    } else {
        s.sockets.chunks(part_size).collect()
    };
    let parts = u32::try_from(chunks.len()).expect("fewer than 2^32 snapshot parts");
    for (part, sockets) in (0..parts).zip(chunks) {
        let payload = json(&SnapshotPartOut {
            ns: s.ns,
            part,
            parts,
            total: s.sockets.len() as u64,
            sockets,
        });
        f(Kind::Snapshot, &payload);
    }
}

fn kernel_bytes(ev: &decode::Event) -> &[u8] {
    match ev {
        decode::Event::State(s) => decode::bytes_of(s),
        decode::Event::Accept(f) | decode::Event::Close(f) => decode::bytes_of(f),
    }
}

/// The input a record holds, and for a snapshot record which part of the
/// snapshot it is. A payload that does not parse is an error (reported,
/// and the record skipped).
pub fn decode(kind: Kind, payload: &[u8]) -> Result<(Input, Option<SnapshotPart>), String> {
    let j = |e: serde_json::Error| format!("bad {kind:?} record: {e}");
    Ok((
        match kind {
            Kind::KernelEvent => Input::Kernel(decode::decode(payload).map_err(|e| e.to_string())?),
            Kind::Process => Input::Process(serde_json::from_slice(payload).map_err(j)?),
            Kind::Stack => Input::Stack(serde_json::from_slice(payload).map_err(j)?),
            Kind::Snapshot => return decode_snapshot(payload).map_err(|e| format!("bad Snapshot record: {e}")),
            Kind::Evidence => Input::Evidence(serde_json::from_slice(payload).map_err(j)?),
            Kind::Tick => Input::Tick(u64::from_le_bytes(
                payload.try_into().map_err(|_| "bad tick record".to_string())?,
            )),
            Kind::Stats => Input::Stats(serde_json::from_slice(payload).map_err(j)?),
            Kind::ProcessExit => Input::ProcessExit(serde_json::from_slice(payload).map_err(j)?),
            Kind::End => Input::End(serde_json::from_slice(payload).map_err(j)?),
            Kind::Forget => Input::Forget(serde_json::from_slice(payload).map_err(j)?),
        },
        None,
    ))
}

fn decode_snapshot(payload: &[u8]) -> Result<(Input, Option<SnapshotPart>), String> {
    let p: SnapshotPartIn = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let n = p.sockets.len() as u64;
    let place = match (p.part, p.parts, p.total) {
        (None, None, None) => SnapshotPart {
            ns: p.ns,
            part: 0,
            parts: 1,
            total: n,
        },
        (Some(part), Some(parts), Some(total)) if part < parts && n <= total => SnapshotPart {
            ns: p.ns,
            part,
            parts,
            total,
        },
        _ => return Err("inconsistent part, parts and total".into()),
    };
    Ok((
        Input::Snapshot(SnapshotInput {
            ns: p.ns,
            sockets: p.sockets,
        }),
        Some(place),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::format::{MAX_RECORD, RECORD_HEADER};

    /// The largest socket JSON there is: IPv6 endpoints with the longest
    /// text, a comm of bytes that are all escaped, every number at its
    /// maximum.
    fn worst_socket() -> SnapshotSocket {
        serde_json::from_value(serde_json::json!({
            "cookie": u64::MAX,
            "state": 255,
            "endpoints": {
                "local": "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535",
                "remote": "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535",
            },
            "holder": [u32::MAX, "\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}", i32::MIN],
            "last_ack_age_ns": u64::MAX,
        }))
        .expect("a snapshot socket")
    }

    #[test]
    fn a_full_part_of_the_largest_sockets_fits_in_a_record() {
        let s = worst_socket();
        let one = serde_json::to_vec(&s).unwrap().len();
        assert!(one > 250, "the worst case should be long: {one} bytes");
        let input = Input::Snapshot(SnapshotInput {
            ns: u64::MAX,
            sockets: vec![s; SNAPSHOT_PART + 1],
        });
        let mut out = Vec::new();
        encode(&input, &mut out, SNAPSHOT_PART);
        let first = u32::from_le_bytes(out[..4].try_into().unwrap());
        // With a 4x margin: a record that passes MAX_RECORD is dropped.
        assert!(first < MAX_RECORD / 4, "part of {first} bytes");
        let second_at = RECORD_HEADER + first as usize;
        let second = u32::from_le_bytes(out[second_at..second_at + 4].try_into().unwrap());
        assert_eq!(out.len(), second_at + RECORD_HEADER + second as usize, "two records");
    }

    #[test]
    fn snapshot_parts_round_trip_and_old_records_still_read() {
        let sockets: Vec<SnapshotSocket> = (0..5)
            .map(|i| {
                let mut s = worst_socket();
                s.cookie = i;
                s
            })
            .collect();
        let mut out = Vec::new();
        encode(
            &Input::Snapshot(SnapshotInput {
                ns: 7,
                sockets: sockets.clone(),
            }),
            &mut out,
            2,
        );
        let mut at = 0;
        let mut got = Vec::new();
        while at < out.len() {
            let len = u32::from_le_bytes(out[at..at + 4].try_into().unwrap()) as usize;
            let payload = &out[at + RECORD_HEADER..at + RECORD_HEADER + len];
            let (input, place) = decode(Kind::Snapshot, payload).unwrap();
            let Input::Snapshot(s) = input else {
                panic!("a snapshot")
            };
            got.push((place.unwrap(), s.sockets.iter().map(|s| s.cookie).collect::<Vec<_>>()));
            at += RECORD_HEADER + len;
        }
        let place = |part| SnapshotPart {
            ns: 7,
            part,
            parts: 3,
            total: 5,
        };
        assert_eq!(
            got,
            vec![(place(0), vec![0, 1]), (place(1), vec![2, 3]), (place(2), vec![4])]
        );

        // Version 1 as first written: the whole snapshot in one record.
        let old = serde_json::to_vec(&serde_json::json!({"ns": 9, "sockets": sockets})).unwrap();
        let (_, place) = decode(Kind::Snapshot, &old).unwrap();
        assert_eq!(
            place,
            Some(SnapshotPart {
                ns: 9,
                part: 0,
                parts: 1,
                total: 5
            })
        );
        for bad in [
            r#"{"ns":1,"part":2,"parts":2,"total":0,"sockets":[]}"#,
            r#"{"ns":1,"part":0,"parts":1,"sockets":[]}"#,
        ] {
            assert!(decode(Kind::Snapshot, bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
