//! Reads a recording back: whole records in order, skipping (and
//! reporting) corrupted ones, and stopping cleanly at a cut-short end.

use std::path::Path;

use super::format::{self, Kind, MAX_RECORD, RECORD_HEADER};

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
}

/// Something wrong inside the file, reported and survived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damage {
    /// Bytes at `offset` did not form a valid record; `skipped` bytes were
    /// passed over to the next valid one.
    Corrupt { offset: u64, skipped: u64 },
    /// The file ends inside a record (the tracer was killed, or the disk
    /// filled): everything before `offset` was read.
    Truncated { offset: u64 },
}

#[derive(Debug)]
pub struct Record<'a> {
    pub offset: u64,
    /// Known kind, or None for a kind from a newer minor writer (skipped).
    pub kind: Option<Kind>,
    pub payload: &'a [u8],
}

/// A recording held in memory (recordings are bounded by `--max-size`).
pub struct Recording {
    pub path: String,
    data: Vec<u8>,
    pub header: serde_json::Value,
    body_start: usize,
}

impl Recording {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let name = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("cannot open {name}: {e}"))?;
        if meta.is_dir() {
            anyhow::bail!("{name} is a directory, not a recording");
        }
        let data = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {name}: {e}"))?;
        Ok(Self::from_bytes(name, data)?)
    }

    pub fn from_bytes(path: String, data: Vec<u8>) -> Result<Self, OpenError> {
        if data.is_empty() {
            return Err(OpenError::Empty(path));
        }
        if data.len() < 8 || &data[..8] != format::MAGIC {
            return Err(OpenError::NotARecording(path));
        }
        let u32_at = |o: usize| {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        };
        let version = u32_at(8).ok_or_else(|| OpenError::BadHeader(path.clone()))?;
        if version > format::VERSION {
            return Err(OpenError::NewerVersion {
                path,
                found: version,
                supported: format::VERSION,
            });
        }
        let hlen = u32_at(12).ok_or_else(|| OpenError::BadHeader(path.clone()))? as usize;
        let hend = 16usize
            .checked_add(hlen)
            .ok_or_else(|| OpenError::BadHeader(path.clone()))?;
        let header_bytes = data.get(16..hend).ok_or_else(|| OpenError::BadHeader(path.clone()))?;
        let crc = u32_at(hend).ok_or_else(|| OpenError::BadHeader(path.clone()))?;
        if crc32fast::hash(header_bytes) != crc {
            return Err(OpenError::BadHeader(path));
        }
        let header = serde_json::from_slice(header_bytes).map_err(|_| OpenError::BadHeader(path.clone()))?;
        Ok(Recording {
            path,
            header,
            body_start: hend + 4,
            data,
        })
    }

    pub fn len(&self) -> u64 {
        self.data.len() as u64
    }

    /// Every whole record in order; damage goes to `on_damage`.
    pub fn records(&self, mut on_damage: impl FnMut(Damage)) -> Vec<Record<'_>> {
        let mut out = Vec::new();
        let mut pos = self.body_start;
        let data = &self.data[..];
        while pos < data.len() {
            match parse_at(data, pos) {
                Parsed::Ok(rec, next) => {
                    out.push(rec);
                    pos = next;
                }
                bad => {
                    // Either way, look for a valid record further on first:
                    // a "cut short" record may be a corrupted length field.
                    match resync(data, pos + 1) {
                        Some(next) => {
                            on_damage(Damage::Corrupt {
                                offset: pos as u64,
                                skipped: (next - pos) as u64,
                            });
                            pos = next;
                        }
                        None => {
                            on_damage(match bad {
                                Parsed::Truncated => Damage::Truncated { offset: pos as u64 },
                                _ => Damage::Corrupt {
                                    offset: pos as u64,
                                    skipped: (data.len() - pos) as u64,
                                },
                            });
                            break;
                        }
                    }
                }
            }
        }
        out
    }
}

enum Parsed<'a> {
    Ok(Record<'a>, usize),
    /// Not enough bytes left for the record the header announces.
    Truncated,
    Bad,
}

fn parse_at(data: &[u8], pos: usize) -> Parsed<'_> {
    let Some(h) = data.get(pos..pos + RECORD_HEADER) else {
        return Parsed::Truncated;
    };
    let len = u32::from_le_bytes(h[0..4].try_into().expect("4"));
    let kind = u16::from_le_bytes(h[4..6].try_into().expect("2"));
    let reserved = u16::from_le_bytes(h[6..8].try_into().expect("2"));
    let crc = u32::from_le_bytes(h[8..12].try_into().expect("4"));
    if len > MAX_RECORD || reserved != 0 || kind == 0 {
        return Parsed::Bad;
    }
    let start = pos + RECORD_HEADER;
    let Some(payload) = data.get(start..start + len as usize) else {
        return Parsed::Truncated;
    };
    if format::record_crc(kind, payload) != crc {
        return Parsed::Bad;
    }
    Parsed::Ok(
        Record {
            offset: pos as u64,
            kind: Kind::from_u16(kind),
            payload,
        },
        start + len as usize,
    )
}

/// The next offset at or after `from` where a valid record starts.
fn resync(data: &[u8], from: usize) -> Option<usize> {
    (from..data.len()).find(|&p| matches!(parse_at(data, p), Parsed::Ok(..)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::format::{encode_file_header, encode_record};
    use proptest::prelude::*;

    fn sample(n: usize) -> Vec<u8> {
        let mut f = encode_file_header(br#"{"tracer_version":"test"}"#);
        for i in 0..n {
            encode_record(&mut f, Kind::Tick, &(i as u64).to_le_bytes());
        }
        f
    }

    fn ticks(r: &Recording) -> (Vec<u64>, Vec<Damage>) {
        let mut damage = Vec::new();
        let t = r
            .records(|d| damage.push(d))
            .iter()
            .map(|rec| u64::from_le_bytes(rec.payload.try_into().unwrap()))
            .collect();
        (t, damage)
    }

    #[test]
    fn round_trip() {
        let r = Recording::from_bytes("x".into(), sample(5)).unwrap();
        assert_eq!(r.header["tracer_version"], "test");
        assert_eq!(ticks(&r), ((0..5).collect(), vec![]));
    }

    #[test]
    fn cut_short_is_read_up_to_the_last_whole_record() {
        let full = sample(5);
        let body_start = encode_file_header(br#"{"tracer_version":"test"}"#).len();
        let rec = 12 + 8;
        let cut = full[..body_start + 3 * rec + 7].to_vec();
        let r = Recording::from_bytes("x".into(), cut).unwrap();
        let (t, d) = ticks(&r);
        assert_eq!(t, vec![0, 1, 2]);
        assert_eq!(
            d,
            vec![Damage::Truncated {
                offset: (body_start + 3 * rec) as u64
            }]
        );
    }

    #[test]
    fn corrupt_record_in_the_middle_is_skipped() {
        let mut f = sample(5);
        let body_start = encode_file_header(br#"{"tracer_version":"test"}"#).len();
        let rec = 12 + 8;
        f[body_start + 2 * rec + 14] ^= 0xff; // payload byte of record 2
        let r = Recording::from_bytes("x".into(), f).unwrap();
        let (t, d) = ticks(&r);
        assert_eq!(t, vec![0, 1, 3, 4]);
        assert_eq!(
            d,
            vec![Damage::Corrupt {
                offset: (body_start + 2 * rec) as u64,
                skipped: rec as u64
            }]
        );
    }

    #[test]
    fn refuses_newer_versions_and_non_recordings() {
        let mut f = sample(1);
        f[8..12].copy_from_slice(&(format::VERSION + 1).to_le_bytes());
        assert!(matches!(
            Recording::from_bytes("x".into(), f),
            Err(OpenError::NewerVersion { .. })
        ));
        assert!(matches!(
            Recording::from_bytes("x".into(), vec![]),
            Err(OpenError::Empty(_))
        ));
        assert!(matches!(
            Recording::from_bytes("x".into(), b"hello world, not a recording".to_vec()),
            Err(OpenError::NotARecording(_))
        ));
        let mut f = sample(1);
        f[17] ^= 1; // header JSON
        assert!(matches!(
            Recording::from_bytes("x".into(), f),
            Err(OpenError::BadHeader(_))
        ));
    }

    proptest! {
        /// Any bytes at all: an error or some records, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            if let Ok(r) = Recording::from_bytes("x".into(), data) {
                let _ = r.records(|_| {});
            }
        }

        /// A valid file with any byte flipped or cut anywhere still reads,
        /// and every record it yields is one that was written.
        #[test]
        fn damaged_files_yield_only_written_records(n in 1usize..20, pos in any::<prop::sample::Index>(), flip in 1u8..=255, cut in any::<bool>()) {
            let mut f = sample(n);
            let at = pos.index(f.len());
            if cut { f.truncate(at) } else { f[at] ^= flip }
            if let Ok(r) = Recording::from_bytes("x".into(), f) {
                let (t, _) = ticks(&r);
                prop_assert!(t.iter().all(|&v| (v as usize) < n));
                prop_assert!(t.windows(2).all(|w| w[0] < w[1]));
            }
        }
    }
}
