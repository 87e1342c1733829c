//! The recording file format (specified in docs/recording-format.md).
//!
//! ```text
//! file   = magic[8] version:u32 header_len:u32 header[header_len] header_crc:u32 record*
//! record = len:u32 kind:u16 reserved:u16 crc:u32 payload[len]
//! ```
//! All integers little-endian. `crc` is CRC-32 (IEEE) of kind, reserved and
//! payload; `header_crc` of the header bytes. The header is JSON.

pub const MAGIC: &[u8; 8] = b"TRACERCW";
/// Bumped on any incompatible change; readers refuse newer versions.
pub const VERSION: u32 = 1;
/// Larger records are treated as corruption (the reader resynchronises).
pub const MAX_RECORD: u32 = 16 << 20;
pub const RECORD_HEADER: usize = 12;

/// Record kinds. Numbers are part of the format: never reuse one.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Raw ring-buffer record (a `tracer_common` wire struct).
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

pub fn record_crc(kind: u16, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&kind.to_le_bytes());
    h.update(&0u16.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends one framed record to `out`.
pub fn encode_record(out: &mut Vec<u8>, kind: Kind, payload: &[u8]) {
    let k = kind as u16;
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&k.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&record_crc(k, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Encodes the file prefix (magic, version, header JSON and its CRC).
pub fn encode_file_header(header_json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + header_json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(header_json.len() as u32).to_le_bytes());
    out.extend_from_slice(header_json);
    out.extend_from_slice(&crc32fast::hash(header_json).to_le_bytes());
    out
}
