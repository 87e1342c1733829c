//! Analysis inputs <-> record payloads. Kernel events keep their binary
//! wire layout (the hot path); everything else is JSON.

use super::format::{encode_record, Kind};
use crate::{decode, input::Input};

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("recorded types always serialize")
}

/// Appends `input` as one framed record. Kernel events (the bulk) are
/// framed straight from their bytes, without an intermediate copy.
pub fn encode(input: &Input, out: &mut Vec<u8>) {
    let (kind, payload) = match input {
        Input::Kernel(ev) => return encode_record(out, Kind::KernelEvent, kernel_bytes(ev)),
        Input::Process(p) => (Kind::Process, json(p)),
        Input::Stack(s) => (Kind::Stack, json(s)),
        Input::Snapshot(s) => (Kind::Snapshot, json(s)),
        Input::Evidence(e) => (Kind::Evidence, json(e)),
        Input::Tick(ns) => (Kind::Tick, ns.to_le_bytes().to_vec()),
        Input::Stats(s) => (Kind::Stats, json(s)),
        Input::ProcessExit(e) => (Kind::ProcessExit, json(e)),
        Input::End(e) => (Kind::End, json(e)),
    };
    encode_record(out, kind, &payload);
}

fn kernel_bytes(ev: &decode::Event) -> &[u8] {
    match ev {
        decode::Event::State(s) => decode::bytes_of(s),
        decode::Event::Accept(f) | decode::Event::Close(f) => decode::bytes_of(f),
    }
}

/// The input a record holds. A payload that does not parse is an error
/// (reported, and the record skipped).
pub fn decode(kind: Kind, payload: &[u8]) -> Result<Input, String> {
    let j = |e: serde_json::Error| format!("bad {kind:?} record: {e}");
    Ok(match kind {
        Kind::KernelEvent => Input::Kernel(decode::decode(payload).map_err(|e| e.to_string())?),
        Kind::Process => Input::Process(serde_json::from_slice(payload).map_err(j)?),
        Kind::Stack => Input::Stack(serde_json::from_slice(payload).map_err(j)?),
        Kind::Snapshot => Input::Snapshot(serde_json::from_slice(payload).map_err(j)?),
        Kind::Evidence => Input::Evidence(serde_json::from_slice(payload).map_err(j)?),
        Kind::Tick => Input::Tick(u64::from_le_bytes(
            payload.try_into().map_err(|_| "bad tick record".to_string())?,
        )),
        Kind::Stats => Input::Stats(serde_json::from_slice(payload).map_err(j)?),
        Kind::ProcessExit => Input::ProcessExit(serde_json::from_slice(payload).map_err(j)?),
        Kind::End => Input::End(serde_json::from_slice(payload).map_err(j)?),
    })
}
