//! Version 2 blocks: records gathered, then written as one zstd frame
//! with a checksum, so that a block is read whole or not at all.
//!
//! ```text
//! block   = magic "TCWB" len:u32 raw_len:u32 codec:u8 reserved[3] crc:u32 body[len]
//! decoded = record*            (raw_len bytes: body, decompressed by codec)
//! record  = kind:varint len:varint payload[len]
//! ```
//! Payloads are those of version 1, except kernel events (kind 1), which
//! are encoded field by field ([`super::events`]) with a context that
//! starts empty in every block: blocks decode independently, and a lost
//! block loses only its own records.

use std::io;

use bytes::{Bytes, BytesMut};

use super::{
    events::{self, get_varint, put_varint},
    format::{self, Kind, BLOCK_HEADER, CODEC_STORED, CODEC_ZSTD, MAX_BLOCK, MAX_RECORD},
};

/// zstd's level. On a loopback churn's events (field-encoded), level 1
/// makes the file 4% larger than 3 (zstd's default) for 25% less
/// compression time, which was a third of the recorder's CPU: the file
/// stays well under the 150 bytes per connection it may take.
pub const LEVEL: i32 = 1;

/// Records being gathered into the next block.
pub struct BlockWriter {
    raw: Vec<u8>,
    records: usize,
    events: events::Context,
    scratch: Vec<u8>,
    compressor: zstd::bulk::Compressor<'static>,
    compressed: Vec<u8>,
}

impl BlockWriter {
    pub fn new() -> io::Result<Self> {
        Ok(BlockWriter {
            raw: Vec::with_capacity(64 << 10),
            records: 0,
            events: events::Context::default(),
            scratch: Vec::with_capacity(256),
            compressor: zstd::bulk::Compressor::new(LEVEL)?,
            compressed: Vec::new(),
        })
    }

    /// Bytes of records gathered (before compression).
    pub fn raw_len(&self) -> usize {
        self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Adds a record. `payload` is the version-1 payload: for a kernel
    /// event, its wire struct.
    pub fn push(&mut self, kind: Kind, payload: &[u8]) {
        put_varint(&mut self.raw, kind as u64);
        if kind == Kind::KernelEvent {
            self.scratch.clear();
            self.events.encode(payload, &mut self.scratch);
            put_varint(&mut self.raw, self.scratch.len() as u64);
            self.raw.extend_from_slice(&self.scratch);
        } else {
            put_varint(&mut self.raw, payload.len() as u64);
            self.raw.extend_from_slice(payload);
        }
        self.records += 1;
    }

    /// Appends the gathered records as one block to `out`, and starts the
    /// next block. Nothing is appended when there is nothing gathered.
    pub fn seal(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        if self.records == 0 {
            return Ok(());
        }
        let bound = zstd::zstd_safe::compress_bound(self.raw.len());
        self.compressed.clear();
        self.compressed.reserve(bound);
        self.compressor
            .compress_to_buffer(&self.raw[..], &mut self.compressed)?;
        if self.compressed.len() < self.raw.len() {
            format::encode_block(out, CODEC_ZSTD, self.raw.len(), &self.compressed);
        } else {
            format::encode_block(out, CODEC_STORED, self.raw.len(), &self.raw);
        }
        self.raw.clear();
        self.records = 0;
        self.events.reset();
        // A burst's buffers are not kept for the quiet that follows.
        if self.raw.capacity() > 4 * format::BLOCK_TARGET {
            self.raw = Vec::with_capacity(64 << 10);
            self.compressed = Vec::new();
        }
        Ok(())
    }
}

/// What is wrong with a block whose checksum is right: a writer's bug or a
/// crafted file. The block's records from there on are lost.
pub type Malformed = &'static str;

/// Decodes a block's body into its records.
pub fn decompress(
    dec: &mut zstd::bulk::Decompressor<'static>,
    codec: u8,
    raw_len: usize,
    body: &[u8],
) -> Result<Bytes, Malformed> {
    match codec {
        CODEC_STORED if body.len() == raw_len => Ok(Bytes::copy_from_slice(body)),
        CODEC_STORED => Err("stored block of the wrong length"),
        CODEC_ZSTD => {
            let mut out = Vec::with_capacity(raw_len);
            let n = dec
                .decompress_to_buffer(body, &mut out)
                .map_err(|_| "zstd frame does not decompress")?;
            if n != raw_len || out.len() != raw_len {
                return Err("block decompresses to another length than it says");
            }
            Ok(Bytes::from(out))
        }
        _ => Err("unknown block codec"),
    }
}

/// The records of a decoded block, in order.
pub struct BlockRecords {
    raw: Bytes,
    at: usize,
    events: events::Context,
    /// Decoded kernel events, handed out as views.
    arena: BytesMut,
    scratch: Vec<u8>,
}

impl BlockRecords {
    /// The records of `raw`, decoded with `events` (reset first).
    pub fn new(raw: Bytes, mut events: events::Context) -> Self {
        events.reset();
        BlockRecords {
            raw,
            at: 0,
            events,
            arena: BytesMut::new(),
            scratch: Vec::with_capacity(256),
        }
    }

    /// Bytes of the decoded block held (tests: the memory bound).
    #[cfg(test)]
    pub fn raw_len(&self) -> usize {
        self.raw.len()
    }

    /// The event context back, for the next block.
    pub fn into_context(self) -> events::Context {
        self.events
    }

    /// The next record as (kind, version-1 payload); None at the block's
    /// end.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<(u16, Bytes), Malformed>> {
        if self.at >= self.raw.len() {
            return None;
        }
        Some(self.record())
    }

    fn record(&mut self) -> Result<(u16, Bytes), Malformed> {
        let mut src = &self.raw[self.at..];
        let before = src.len();
        let kind = get_varint(&mut src)?;
        let kind = u16::try_from(kind).ok().filter(|&k| k != 0).ok_or("bad record kind")?;
        let len = get_varint(&mut src)?;
        if len > u64::from(MAX_RECORD) || len > src.len() as u64 {
            return Err("record runs past its block");
        }
        let start = self.at + (before - src.len());
        let end = start + len as usize;
        self.at = end;
        if kind != Kind::KernelEvent as u16 {
            return Ok((kind, self.raw.slice(start..end)));
        }
        self.scratch.clear();
        self.events.decode(&self.raw[start..end], &mut self.scratch)?;
        if self.arena.capacity() - self.arena.len() < self.scratch.len() {
            self.arena = BytesMut::with_capacity((64 << 10).max(self.scratch.len()));
        }
        self.arena.extend_from_slice(&self.scratch);
        Ok((kind, self.arena.split().freeze()))
    }
}

/// Whether `h` (at least [`BLOCK_HEADER`] bytes) looks like a block
/// header: its magic, and plausible fields. Returns the body's length,
/// codec and decoded length.
pub fn parse_header(h: &[u8]) -> Option<(usize, u8, usize)> {
    if &h[0..4] != format::BLOCK_MAGIC {
        return None;
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let raw_len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let codec = h[12];
    if len > MAX_BLOCK || raw_len > MAX_BLOCK || codec > CODEC_ZSTD || h[13..16] != [0, 0, 0] {
        return None;
    }
    if codec == CODEC_STORED && len != raw_len {
        return None;
    }
    Some((len as usize, codec, raw_len as usize))
}

/// Whether the block at the start of `b` (header and body) has the right
/// checksum.
pub fn crc_ok(b: &[u8], len: usize) -> bool {
    let crc = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
    format::block_crc(&b[4..16], &b[BLOCK_HEADER..BLOCK_HEADER + len]) == crc
}
