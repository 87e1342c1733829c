//! The recording file format (specified in docs/recording-format.md).
//!
//! ```text
//! file   = magic[8] version:u32 header_len:u32 header[header_len] header_crc:u32 body
//! ```
//! Version 1 (still read): the body is framed records,
//! ```text
//! record = len:u32 kind:u16 reserved:u16 crc:u32 payload[len]
//! ```
//! Version 2 (written): the body is blocks, each a zstd frame of records
//! (see [`super::block`]),
//! ```text
//! block  = magic[4] len:u32 raw_len:u32 codec:u8 reserved[3] crc:u32 body[len]
//! ```
//! All integers little-endian. A record's `crc` is CRC-32 (IEEE) of kind,
//! reserved and payload; a block's of the 12 bytes from `len` to
//! `reserved`, then its body; `header_crc` of the header bytes. The header
//! is JSON.

pub const MAGIC: &[u8; 8] = b"TRACERCW";
/// The version written. Bumped on any incompatible change; readers refuse
/// newer versions.
pub const VERSION: u32 = 2;
/// Framed records, uncompressed: read, no longer written.
pub const VERSION_1: u32 = 1;
/// Larger records are treated as corruption (the reader resynchronises).
pub const MAX_RECORD: u32 = 16 << 20;
/// A version-1 record's framing: len, kind, reserved, crc.
pub const RECORD_HEADER: usize = 12;

/// Version 2: what starts every block.
pub const BLOCK_MAGIC: &[u8; 4] = b"TCWB";
/// Version 2: a block's framing: magic, len, raw_len, codec, reserved, crc.
pub const BLOCK_HEADER: usize = 20;
/// Version 2: largest block body and decoded block. A block holds at most
/// one record past the writer's target size ([`BLOCK_TARGET`]), and a
/// record is at most [`MAX_RECORD`]; larger means corruption.
pub const MAX_BLOCK: u32 = 32 << 20;
/// Version 2: the writer ends a block once its records pass this size
/// (and at every flush, each agent tick).
pub const BLOCK_TARGET: usize = 1 << 20;
/// Block codecs: the body as is, or one zstd frame.
pub const CODEC_STORED: u8 = 0;
pub const CODEC_ZSTD: u8 = 1;

/// Record kinds. Numbers are part of the format: never reuse one.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A kernel event: the `tracer_common` wire struct (version 1: its raw
    /// bytes; version 2: encoded field by field, [`super::events`]).
    KernelEvent = 1,
    /// JSON: a process's name and command line, read while it ran.
    Process = 2,
    /// JSON: a symbolized stack.
    Stack = 3,
    /// JSON: sockets that existed when recording started.
    Snapshot = 4,
    /// JSON: leak-time evidence (unread bytes, holders).
    Evidence = 5,
    /// u64 LE: the agent's clock; drives the leak sweep on replay.
    Tick = 6,
    /// JSON: kernel-side counters (drops) at this time.
    Stats = 7,
    /// JSON: the `--pid` process exited.
    ProcessExit = 8,
    /// JSON: the recording ended cleanly.
    End = 9,
    /// JSON: names and stacks the agent forgot (nothing referred to them).
    Forget = 10,
}

impl Kind {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Kind::KernelEvent,
            2 => Kind::Process,
            3 => Kind::Stack,
            4 => Kind::Snapshot,
            5 => Kind::Evidence,
            6 => Kind::Tick,
            7 => Kind::Stats,
            8 => Kind::ProcessExit,
            9 => Kind::End,
            10 => Kind::Forget,
            _ => return None,
        })
    }
}

/// CRC of a version-1 record.
pub fn record_crc(kind: u16, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&kind.to_le_bytes());
    h.update(&0u16.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends one framed version-1 record to `out` (tests: the tracer writes
/// version 2).
#[cfg(test)]
pub fn encode_record(out: &mut Vec<u8>, kind: Kind, payload: &[u8]) {
    let k = kind as u16;
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&k.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&record_crc(k, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Encodes the file prefix (magic, `version`, header JSON and its CRC).
pub fn encode_file_header(version: u32, header_json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + header_json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(header_json.len() as u32).to_le_bytes());
    out.extend_from_slice(header_json);
    out.extend_from_slice(&crc32fast::hash(header_json).to_le_bytes());
    out
}

/// CRC of a version-2 block: its 12 header bytes from `len` to `reserved`,
/// then its body.
pub fn block_crc(fields: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(fields);
    h.update(body);
    h.finalize()
}

/// Appends one version-2 block (framing and `body`) to `out`.
pub fn encode_block(out: &mut Vec<u8>, codec: u8, raw_len: usize, body: &[u8]) {
    let mut fields = [0u8; 12];
    fields[0..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    fields[4..8].copy_from_slice(&(raw_len as u32).to_le_bytes());
    fields[8] = codec;
    out.extend_from_slice(BLOCK_MAGIC);
    out.extend_from_slice(&fields);
    out.extend_from_slice(&block_crc(&fields, body).to_le_bytes());
    out.extend_from_slice(body);
}
