//! The file layout of a recording, as documented, read from the bytes
//! alone (no CRC is checked: the tests damage files, the tracer judges
//! them), and what damaging files needs: [`crc32`], a deterministic
//! generator ([`Rng`]) and [`hex_around`] for messages.

use std::fmt::Write as _;
use std::sync::OnceLock;

use serde_json::Value;

/// The file's first 8 bytes.
pub const MAGIC: &[u8; 8] = b"TRACERCW";
/// The format version this tracer writes: compressed blocks of records.
pub const FORMAT_VERSION: u32 = 2;
/// Version 1, framed records uncompressed: still read, and what the
/// synthetic writer ([`super::synth`]) writes.
pub const VERSION_1: u32 = 1;
/// What starts every block of version 2.
pub const BLOCK_MAGIC: &[u8; 4] = b"TCWB";
/// Where the version field is.
pub const VERSION_OFFSET: usize = 8;

/// Where the parts of a recording are, from the lengths alone (no CRC is
/// checked: the tests damage files, the tracer judges them).
#[derive(Clone, Debug)]
pub struct Layout {
    pub version: u32,
    /// The header JSON.
    pub header: Value,
    /// Offset of the first record (after the header's CRC).
    pub header_end: usize,
    /// `(offset, total length)` of every record (version 2: block),
    /// framing included.
    pub records: Vec<(usize, usize)>,
}

impl Layout {
    /// Offset of a byte of the length field of the record (version 2:
    /// block) at `at`.
    pub fn length_field(&self, at: usize) -> usize {
        if self.version >= 2 {
            at + 5
        } else {
            at + 1
        }
    }
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Parses the layout of an intact recording: magic, version, header,
/// and records that tile the rest of the file exactly.
pub fn parse_layout(bytes: &[u8]) -> Result<Layout, String> {
    if bytes.get(..8) != Some(&MAGIC[..]) {
        return Err("no TRACERCW magic".to_string());
    }
    let version = le_u32(bytes, VERSION_OFFSET).ok_or("cut in the version")?;
    let header_len = le_u32(bytes, 12).ok_or("cut in the header length")? as usize;
    let json = bytes.get(16..16 + header_len).ok_or("cut in the header")?;
    let header: Value = serde_json::from_slice(json).map_err(|e| format!("header is not JSON: {e}"))?;
    let header_end = 16 + header_len + 4;
    if bytes.len() < header_end {
        return Err("cut in the header CRC".to_string());
    }
    let mut records = Vec::new();
    let mut at = header_end;
    while at < bytes.len() {
        // Version 1: `len kind reserved crc payload`; version 2: `magic len
        // raw_len codec reserved crc body`.
        let (len_at, framing) = if version >= 2 { (at + 4, 20) } else { (at, 12) };
        if version >= 2 && bytes.get(at..at + 4) != Some(&BLOCK_MAGIC[..]) {
            return Err(format!("block at {at}: no block magic"));
        }
        let len = le_u32(bytes, len_at).ok_or_else(|| format!("record at {at}: cut in its length"))? as usize;
        let total = framing + len;
        if at + total > bytes.len() {
            return Err(format!(
                "record at {at} ({total} bytes) runs past the end ({})",
                bytes.len()
            ));
        }
        records.push((at, total));
        at += total;
    }
    Ok(Layout {
        version,
        header,
        header_end,
        records,
    })
}

/// `bytes` with the format version field set to `version`.
pub fn with_version(bytes: &[u8], version: u32) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[VERSION_OFFSET..VERSION_OFFSET + 4].copy_from_slice(&version.to_le_bytes());
    out
}

/// A file with only a header: magic, `version`, the header JSON and its
/// CRC32.
pub fn header_only(version: u32, header_json: &str) -> Vec<u8> {
    let json = header_json.as_bytes();
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&u32::try_from(json.len()).expect("small header").to_le_bytes());
    out.extend_from_slice(json);
    out.extend_from_slice(&crc32(json).to_le_bytes());
    out
}

/// CRC-32 (IEEE 802.3, the zlib one). A byte at a time from a table: the
/// big synthetic recordings are hundreds of MiB, checksummed by a debug
/// build.
pub fn crc32(data: &[u8]) -> u32 {
    crc32_of(&[data])
}

/// CRC-32 of `parts` one after the other (a record's CRC covers its kind
/// and reserved fields, then its payload).
pub fn crc32_of(parts: &[&[u8]]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (n, slot) in (0u32..).zip(t.iter_mut()) {
            let mut c = n;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
            }
            *slot = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in parts.iter().flat_map(|p| p.iter()) {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// A small deterministic generator (xorshift64*), so that damage is the
/// same on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        assert!(hi > lo, "empty range {lo}..{hi}");
        lo + (self.next_u64() % (hi - lo) as u64) as usize
    }

    /// A byte that is not zero (an XOR with it changes something).
    pub fn nonzero_byte(&mut self) -> u8 {
        (self.next_u64() % 255) as u8 + 1
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Hex dump of `bytes[at - 8 .. at + 8]`, for messages about damage.
pub fn hex_around(bytes: &[u8], at: usize) -> String {
    let lo = at.saturating_sub(8);
    let hi = (at + 8).min(bytes.len());
    let mut out = format!("@{lo}:");
    for b in &bytes[lo..hi] {
        let _ = write!(out, " {b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            let x = a.range(10, 20);
            assert_eq!(x, b.range(10, 20));
            assert!((10..20).contains(&x));
            assert_ne!(a.nonzero_byte(), 0);
            b.nonzero_byte();
        }
    }

    #[test]
    fn layout_of_a_synthetic_file() {
        let mut file = header_only(VERSION_1, r#"{"a":1}"#);
        let header_end = file.len();
        // Two records: 3 and 0 payload bytes.
        for payload in [&b"xyz"[..], &b""[..]] {
            file.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
            file.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
            file.extend_from_slice(payload);
        }
        let l = parse_layout(&file).unwrap();
        assert_eq!(l.version, VERSION_1);
        assert_eq!(l.header["a"], 1);
        assert_eq!(l.header_end, header_end);
        assert_eq!(l.records, vec![(header_end, 15), (header_end + 15, 12)]);
        assert!(parse_layout(&file[..file.len() - 1]).is_err());
        assert!(parse_layout(b"TRACERCX").is_err());
        // The same bytes as version 2 are not blocks.
        assert!(parse_layout(&with_version(&file, 2)).is_err());

        // Version 2: two blocks of 3 and 0 body bytes.
        let mut file = header_only(FORMAT_VERSION, r#"{"a":1}"#);
        for body in [&b"xyz"[..], &b""[..]] {
            file.extend_from_slice(BLOCK_MAGIC);
            file.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
            file.extend_from_slice(&[0; 12]);
            file.extend_from_slice(body);
        }
        let l = parse_layout(&file).unwrap();
        assert_eq!(l.version, FORMAT_VERSION);
        assert_eq!(l.records, vec![(header_end, 23), (header_end + 23, 20)]);
        assert_eq!(l.length_field(header_end), header_end + 5);
        assert!(parse_layout(&file[..file.len() - 1]).is_err());
    }
}
