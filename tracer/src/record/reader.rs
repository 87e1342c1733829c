//! Reads a recording back as a stream: whole records in order, skipping
//! (and reporting) corrupted ones, and stopping cleanly at a cut-short end.
//! Both versions of the format: framed records (1) and compressed blocks
//! of records (2), whose unit of damage is the block.
//!
//! Memory is bounded by the largest record or block, never by the file:
//! the reader holds a window of the file from the current offset on, at
//! most one record (16 MiB) or block (32 MiB, and its decoded records) plus
//! one read ahead, and hands out each payload as a [`Bytes`] view.

use std::{fs::File, io::Read, path::Path};

use bytes::{Buf as _, Bytes, BytesMut};

use super::{
    block::{self, BlockRecords},
    events,
    format::{self, Kind, BLOCK_HEADER, MAX_RECORD, RECORD_HEADER},
};

/// Bytes asked of the file at a time (more when a record needs more).
const READ_CHUNK: usize = 256 << 10;
/// Magic, version and header length: what precedes the header JSON.
const PREFIX: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("{0} is empty: not a recording")]
    Empty(String),
    #[error("{0} is not a tracer recording (bad magic number)")]
    NotARecording(String),
    #[error("{path} is format version {found}, newer than this tracer reads ({supported}): use a newer tracer")]
    NewerVersion { path: String, found: u32, supported: u32 },
    #[error("{0}: the file header is cut short or corrupt")]
    BadHeader(String),
    #[error("cannot read {path}: {error}")]
    Io { path: String, error: String },
}

/// Something wrong inside the file, reported and survived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damage {
    /// Bytes at `offset` did not form a valid record (version 2: block);
    /// `skipped` bytes were passed over to the next valid one. A block
    /// whose checksum is right but whose records are malformed is skipped
    /// from the first malformed record on, reported at the block.
    Corrupt { offset: u64, skipped: u64 },
    /// The file ends inside a record (version 2: block): the tracer was
    /// killed, or the disk filled. Everything before `offset` was read.
    Truncated { offset: u64 },
}

#[derive(Debug)]
pub struct Record {
    /// Where the record is in the file (version 2: its block).
    pub offset: u64,
    /// Known kind, or None for a kind from a newer minor writer (skipped).
    pub kind: Option<Kind>,
    pub payload: Bytes,
}

/// What the reader found next, in file order.
#[derive(Debug)]
pub enum Item {
    Record(Record),
    Damage(Damage),
}

/// The result of looking for a record at the window's start.
enum Parsed {
    /// A valid record with this payload length.
    Ok(usize),
    /// The file ends before the record the header announces does.
    Truncated,
    Bad,
}

pub struct Reader<R> {
    pub path: String,
    pub header: serde_json::Value,
    /// The format version (1 or 2).
    pub version: u32,
    /// The file's size, when known (for progress messages).
    pub size: Option<u64>,
    src: R,
    /// The file from offset `pos` on, as far as read.
    window: BytesMut,
    pos: u64,
    eof: bool,
    /// Payload length of the valid record (version 2: block body) at the
    /// window's start, found while resynchronising (so its CRC is not
    /// computed twice).
    ready: Option<usize>,
    done: bool,
    /// Version 2: the block being read, and its offset and length.
    block: Option<(BlockRecords, u64, u64)>,
    /// Version 2: the kernel-event context, kept between blocks (reset
    /// at each) to spare its allocation.
    events: Option<events::Context>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl Reader<File> {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let name = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("cannot open {name}: {e}"))?;
        if meta.is_dir() {
            anyhow::bail!("{name} is a directory, not a recording");
        }
        let file = File::open(path).map_err(|e| anyhow::anyhow!("cannot open {name}: {e}"))?;
        let mut r = Reader::new(name, file)?;
        r.size = Some(meta.len());
        Ok(r)
    }
}

impl<R: Read> Reader<R> {
    /// Reads and checks the file header; records follow with [`Self::next`].
    pub fn new(path: String, src: R) -> Result<Self, OpenError> {
        let mut r = Reader {
            path,
            header: serde_json::Value::Null,
            version: 0,
            size: None,
            src,
            window: BytesMut::new(),
            pos: 0,
            eof: false,
            ready: None,
            done: false,
            block: None,
            events: None,
            decompressor: None,
        };
        let io = |r: &Reader<R>, e: std::io::Error| OpenError::Io {
            path: r.path.clone(),
            error: e.to_string(),
        };
        let bad = |r: &Reader<R>| OpenError::BadHeader(r.path.clone());
        if !r.fill(1).map_err(|e| io(&r, e))? {
            return Err(OpenError::Empty(r.path));
        }
        if !r.fill(8).map_err(|e| io(&r, e))? || &r.window[..8] != format::MAGIC {
            return Err(OpenError::NotARecording(r.path));
        }
        if !r.fill(12).map_err(|e| io(&r, e))? {
            return Err(bad(&r));
        }
        // The version first: a newer tracer may lay out the rest otherwise.
        let version = le_u32(&r.window[8..12]);
        if version > format::VERSION {
            return Err(OpenError::NewerVersion {
                path: r.path,
                found: version,
                supported: format::VERSION,
            });
        }
        // Version 0 was never written: a damaged version field.
        if version == 0 || !r.fill(PREFIX).map_err(|e| io(&r, e))? {
            return Err(bad(&r));
        }
        let hlen = le_u32(&r.window[12..16]);
        // The header is a small JSON object; a length beyond the record
        // limit is damage, and must not make the reader allocate it.
        if hlen > MAX_RECORD {
            return Err(bad(&r));
        }
        let hend = PREFIX + hlen as usize;
        if !r.fill(hend + 4).map_err(|e| io(&r, e))? {
            return Err(bad(&r));
        }
        let header_bytes = &r.window[PREFIX..hend];
        if crc32fast::hash(header_bytes) != le_u32(&r.window[hend..hend + 4]) {
            return Err(bad(&r));
        }
        r.header = serde_json::from_slice(header_bytes).map_err(|_| bad(&r))?;
        r.consume(hend + 4);
        r.version = version;
        if version > format::VERSION_1 {
            r.events = Some(events::Context::default());
            r.decompressor = Some(zstd::bulk::Decompressor::new().map_err(|e| io(&r, e))?);
        }
        Ok(r)
    }

    /// The next record or damage, in file order; None at the end. Only
    /// I/O errors are errors: damage is an [`Item`].
    pub fn next(&mut self) -> std::io::Result<Option<Item>> {
        if self.version > format::VERSION_1 {
            return self.next_v2();
        }
        if self.done {
            return Ok(None);
        }
        if let Some(len) = self.ready.take() {
            return Ok(Some(Item::Record(self.take_record(len))));
        }
        if !self.fill(1)? {
            self.done = true;
            return Ok(None);
        }
        let bad = match self.parse()? {
            Parsed::Ok(len) => return Ok(Some(Item::Record(self.take_record(len)))),
            bad => bad,
        };
        // Either way, look for a valid record further on first: a "cut
        // short" record may be a corrupted length field.
        let start = self.pos;
        loop {
            self.consume(1);
            if !self.fill(1)? {
                self.done = true;
                return Ok(Some(Item::Damage(match bad {
                    Parsed::Truncated => Damage::Truncated { offset: start },
                    _ => Damage::Corrupt {
                        offset: start,
                        skipped: self.pos - start,
                    },
                })));
            }
            if let Parsed::Ok(len) = self.parse()? {
                self.ready = Some(len);
                return Ok(Some(Item::Damage(Damage::Corrupt {
                    offset: start,
                    skipped: self.pos - start,
                })));
            }
        }
    }

    /// Version 2: the next record of the current block, or of the next
    /// valid block; damage as it is met.
    fn next_v2(&mut self) -> std::io::Result<Option<Item>> {
        loop {
            if let Some((records, offset, len)) = self.block.as_mut() {
                let (offset, len) = (*offset, *len);
                match records.next() {
                    Some(Ok((kind, payload))) => {
                        return Ok(Some(Item::Record(Record {
                            offset,
                            kind: Kind::from_u16(kind),
                            payload,
                        })))
                    }
                    Some(Err(_)) => {
                        self.end_block();
                        return Ok(Some(Item::Damage(Damage::Corrupt { offset, skipped: len })));
                    }
                    None => self.end_block(),
                }
            }
            if self.done {
                return Ok(None);
            }
            let len = match self.ready.take() {
                Some(len) => len,
                None => {
                    if !self.fill(1)? {
                        self.done = true;
                        return Ok(None);
                    }
                    match self.parse_block()? {
                        Parsed::Ok(len) => len,
                        bad => return self.resync_block(bad).map(Some),
                    }
                }
            };
            if let Some(damage) = self.take_block(len) {
                return Ok(Some(Item::Damage(damage)));
            }
        }
    }

    /// The block's records are all read (or the rest lost): its context
    /// goes back for the next.
    fn end_block(&mut self) {
        if let Some((records, _, _)) = self.block.take() {
            self.events = Some(records.into_context());
        }
    }

    /// Looks for the next valid block past a bad one at the window's
    /// start: the damage, the valid block (if any) being `ready`.
    fn resync_block(&mut self, bad: Parsed) -> std::io::Result<Item> {
        // A "cut short" block may be a corrupted length field: look for a
        // valid block further on first.
        let start = self.pos;
        loop {
            self.consume(1);
            if !self.fill(1)? {
                self.done = true;
                return Ok(Item::Damage(match bad {
                    Parsed::Truncated => Damage::Truncated { offset: start },
                    _ => Damage::Corrupt {
                        offset: start,
                        skipped: self.pos - start,
                    },
                }));
            }
            // Only where a block's magic starts (cheap to rule out).
            if self.window[0] != format::BLOCK_MAGIC[0] {
                continue;
            }
            if let Parsed::Ok(len) = self.parse_block()? {
                self.ready = Some(len);
                return Ok(Item::Damage(Damage::Corrupt {
                    offset: start,
                    skipped: self.pos - start,
                }));
            }
        }
    }

    /// Is there a whole block with the right checksum at the window's
    /// start? Its body length if so.
    fn parse_block(&mut self) -> std::io::Result<Parsed> {
        if !self.fill(BLOCK_HEADER)? {
            return Ok(Parsed::Truncated);
        }
        let Some((len, _, _)) = block::parse_header(&self.window[..BLOCK_HEADER]) else {
            return Ok(Parsed::Bad);
        };
        if !self.fill(BLOCK_HEADER + len)? {
            return Ok(Parsed::Truncated);
        }
        Ok(if block::crc_ok(&self.window, len) {
            Parsed::Ok(len)
        } else {
            Parsed::Bad
        })
    }

    /// Takes the valid block of body length `len` at the window's start
    /// and starts reading its records; damage if it does not decompress.
    fn take_block(&mut self, len: usize) -> Option<Damage> {
        let offset = self.pos;
        let (_, codec, raw_len) = block::parse_header(&self.window[..BLOCK_HEADER]).expect("checked by parse_block");
        self.consume(BLOCK_HEADER);
        let body = self.window.split_to(len);
        self.pos += len as u64;
        let total = (BLOCK_HEADER + len) as u64;
        let dec = self.decompressor.as_mut().expect("version 2");
        match block::decompress(dec, codec, raw_len, &body) {
            Ok(raw) => {
                let events = self.events.take().unwrap_or_default();
                self.block = Some((BlockRecords::new(raw, events), offset, total));
                None
            }
            Err(_) => Some(Damage::Corrupt { offset, skipped: total }),
        }
    }

    /// Is there a whole, valid record at the window's start?
    fn parse(&mut self) -> std::io::Result<Parsed> {
        if !self.fill(RECORD_HEADER)? {
            return Ok(Parsed::Truncated);
        }
        let h = &self.window[..RECORD_HEADER];
        let len = le_u32(&h[0..4]);
        let kind = u16::from_le_bytes([h[4], h[5]]);
        let reserved = u16::from_le_bytes([h[6], h[7]]);
        let crc = le_u32(&h[8..12]);
        if len > MAX_RECORD || reserved != 0 || kind == 0 {
            return Ok(Parsed::Bad);
        }
        let end = RECORD_HEADER + len as usize;
        if !self.fill(end)? {
            return Ok(Parsed::Truncated);
        }
        Ok(if format::record_crc(kind, &self.window[RECORD_HEADER..end]) == crc {
            Parsed::Ok(len as usize)
        } else {
            Parsed::Bad
        })
    }

    /// The valid record of payload length `len` at the window's start.
    fn take_record(&mut self, len: usize) -> Record {
        let offset = self.pos;
        let kind = u16::from_le_bytes([self.window[4], self.window[5]]);
        self.consume(RECORD_HEADER);
        let payload = self.window.split_to(len).freeze();
        self.pos += len as u64;
        Record {
            offset,
            kind: Kind::from_u16(kind),
            payload,
        }
    }

    fn consume(&mut self, n: usize) {
        self.window.advance(n);
        self.pos += n as u64;
    }

    /// Reads until the window holds `n` bytes, or the file ends; whether
    /// it holds them.
    fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        while self.window.len() < n && !self.eof {
            let have = self.window.len();
            let want = (n - have).max(READ_CHUNK);
            self.window.resize(have + want, 0);
            let got = loop {
                match self.src.read(&mut self.window[have..]) {
                    Ok(got) => break got,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.window.truncate(have);
                        return Err(e);
                    }
                }
            };
            self.window.truncate(have + got);
            self.eof = got == 0;
        }
        Ok(self.window.len() >= n)
    }

    /// Bytes held in memory now (tests: the bound).
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.window.capacity() + self.block.as_ref().map_or(0, |(b, _, _)| b.raw_len())
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
