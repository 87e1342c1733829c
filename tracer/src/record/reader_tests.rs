//! The reader's tests: framing, damage, versions, bounded memory.

use std::io::Read;

use super::format::{self, Kind};
use super::reader::*;
use crate::record::format::{encode_file_header, encode_record};
use proptest::prelude::*;

const HEADER: &[u8] = br#"{"tracer_version":"test"}"#;

fn sample(n: usize) -> Vec<u8> {
    let mut f = encode_file_header(format::VERSION_1, HEADER);
    for i in 0..n {
        encode_record(&mut f, Kind::Tick, &(i as u64).to_le_bytes());
    }
    f
}

fn body_start() -> usize {
    encode_file_header(format::VERSION_1, HEADER).len()
}

fn open(data: &[u8]) -> Result<Reader<&[u8]>, OpenError> {
    Reader::new("x".into(), data)
}

fn read_all<R: Read>(mut r: Reader<R>) -> (Vec<u64>, Vec<Damage>) {
    let (mut ticks, mut damage) = (Vec::new(), Vec::new());
    while let Some(item) = r.next().expect("in memory") {
        match item {
            Item::Record(rec) => ticks.push(u64::from_le_bytes(rec.payload[..].try_into().unwrap())),
            Item::Damage(d) => damage.push(d),
        }
    }
    (ticks, damage)
}

fn ticks(data: &[u8]) -> (Vec<u64>, Vec<Damage>) {
    read_all(open(data).unwrap())
}

/// Gives at most `step` bytes per read, as a pipe or a slow disk may.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.step).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn round_trip() {
    let data = sample(5);
    let r = open(&data).unwrap();
    assert_eq!(r.header["tracer_version"], "test");
    assert_eq!(read_all(r), ((0..5).collect(), vec![]));
}

#[test]
fn short_reads_give_the_same_records_and_damage() {
    let mut f = sample(40);
    let rec = 12 + 8;
    f[body_start() + 7 * rec + 13] ^= 0x10;
    f.truncate(f.len() - 3);
    for step in [1, 3, 13, 4096] {
        let r = Reader::new("x".into(), Trickle { data: &f, step }).unwrap();
        assert_eq!(read_all(r), ticks(&f), "reads of {step} bytes");
    }
}

#[test]
fn cut_short_is_read_up_to_the_last_whole_record() {
    let full = sample(5);
    let rec = 12 + 8;
    let cut = &full[..body_start() + 3 * rec + 7];
    let (t, d) = ticks(cut);
    assert_eq!(t, vec![0, 1, 2]);
    assert_eq!(
        d,
        vec![Damage::Truncated {
            offset: (body_start() + 3 * rec) as u64
        }]
    );
}

#[test]
fn corrupt_record_in_the_middle_is_skipped() {
    let mut f = sample(5);
    let rec = 12 + 8;
    f[body_start() + 2 * rec + 14] ^= 0xff; // payload byte of record 2
    let (t, d) = ticks(&f);
    assert_eq!(t, vec![0, 1, 3, 4]);
    assert_eq!(
        d,
        vec![Damage::Corrupt {
            offset: (body_start() + 2 * rec) as u64,
            skipped: rec as u64
        }]
    );
}

#[test]
fn garbage_to_the_end_is_one_corruption() {
    let mut f = sample(2);
    let at = f.len();
    f.extend_from_slice(&[0xee; 100]);
    assert_eq!(
        ticks(&f),
        (
            vec![0, 1],
            vec![Damage::Corrupt {
                offset: at as u64,
                skipped: 100
            }]
        )
    );
}

#[test]
fn refuses_newer_versions_and_non_recordings() {
    let mut f = sample(1);
    f[8..12].copy_from_slice(&(format::VERSION + 1).to_le_bytes());
    assert!(matches!(open(&f), Err(OpenError::NewerVersion { .. })));
    f[8..12].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(open(&f), Err(OpenError::BadHeader(_))));
    assert!(matches!(open(&[]), Err(OpenError::Empty(_))));
    assert!(matches!(
        open(b"hello world, not a recording"),
        Err(OpenError::NotARecording(_))
    ));
    assert!(matches!(open(b"TRACER"), Err(OpenError::NotARecording(_))));
    let mut f = sample(1);
    f[17] ^= 1; // header JSON
    assert!(matches!(open(&f), Err(OpenError::BadHeader(_))));
    // A header length of 4 GiB in a small file: refused, not allocated.
    let mut f = sample(1);
    f[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(open(&f), Err(OpenError::BadHeader(_))));
}

/// A recording generated on the fly, so that a file far larger than
/// memory can be read: its header, then `left` times what `next` appends
/// (one record, or one block), each of one record of an unknown kind (the
/// reader frames it, nothing decodes it) with `payload` bytes.
struct Generated {
    pending: Vec<u8>,
    at: usize,
    left: usize,
    payload: Vec<u8>,
    next: fn(&mut Vec<u8>, &[u8]),
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.pending.len() {
            if self.left == 0 {
                return Ok(0);
            }
            self.left -= 1;
            self.pending.clear();
            self.at = 0;
            (self.next)(&mut self.pending, &self.payload);
        }
        let n = buf.len().min(self.pending.len() - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

const UNKNOWN_KIND: u16 = 999;

fn v1_record(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&UNKNOWN_KIND.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&format::record_crc(UNKNOWN_KIND, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn v2_block(out: &mut Vec<u8>, payload: &[u8]) {
    let mut raw = Vec::new();
    crate::record::events::put_varint(&mut raw, u64::from(UNKNOWN_KIND));
    crate::record::events::put_varint(&mut raw, payload.len() as u64);
    raw.extend_from_slice(payload);
    format::encode_block(out, format::CODEC_STORED, raw.len(), &raw);
}

/// Reads 64 MiB of 1 MiB records; returns the largest amount the reader
/// held at once.
fn peak_held(version: u32, next: fn(&mut Vec<u8>, &[u8])) -> usize {
    let count = 64;
    let src = Generated {
        pending: encode_file_header(version, HEADER),
        at: 0,
        left: count,
        payload: vec![7u8; 1 << 20],
        next,
    };
    let mut r = Reader::new("x".into(), src).unwrap();
    let (mut n, mut peak) = (0, 0);
    while let Some(item) = r.next().unwrap() {
        let Item::Record(rec) = item else {
            panic!("damage: {item:?}")
        };
        assert_eq!((rec.kind, rec.payload.len()), (None, 1 << 20));
        n += 1;
        peak = peak.max(r.held());
    }
    assert_eq!(n, count);
    peak
}

#[test]
fn memory_is_bounded_by_the_largest_record_not_the_file() {
    // 64 MiB read through a window of a few MiB.
    let peak = peak_held(format::VERSION_1, v1_record);
    assert!(peak < 4 << 20, "the reader held {peak} bytes");
}

#[test]
fn version_2_memory_is_bounded_by_the_largest_block_not_the_file() {
    // 64 MiB read with a few MiB held.
    let peak = peak_held(format::VERSION, v2_block);
    assert!(peak < 6 << 20, "the reader held {peak} bytes");
}

#[test]
fn refuses_version_3() {
    let mut f = encode_file_header(format::VERSION, HEADER);
    f[8..12].copy_from_slice(&3u32.to_le_bytes());
    assert!(matches!(
        open(&f),
        Err(OpenError::NewerVersion {
            found: 3,
            supported: 2,
            ..
        })
    ));
}

proptest! {
    /// Any bytes at all: an error or some records, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        if let Ok(r) = open(&data) {
            let _ = read_all(r);
        }
        // Behind a version-2 header too.
        let mut f = encode_file_header(format::VERSION, HEADER);
        f.extend_from_slice(&data);
        let mut r = open(&f).unwrap();
        while r.next().expect("in memory").is_some() {}
    }

    /// A valid file with any byte flipped or cut anywhere still reads,
    /// and every record it yields is one that was written.
    #[test]
    fn damaged_files_yield_only_written_records(n in 1usize..20, pos in any::<prop::sample::Index>(), flip in 1u8..=255, cut in any::<bool>()) {
        let mut f = sample(n);
        let at = pos.index(f.len());
        if cut { f.truncate(at) } else { f[at] ^= flip }
        if let Ok(r) = open(&f) {
            let (t, _) = read_all(r);
            prop_assert!(t.iter().all(|&v| (v as usize) < n));
            prop_assert!(t.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
