//! Structure-aware property tests of reading recordings. They start from
//! valid files written by the real writer, holding every kind of record
//! with values anywhere in their range (times at the clock's end, any
//! counter, any text), then damage them the ways files get damaged: bytes
//! flipped, inserted, deleted, cut; records repeated, swapped, given
//! another length, checksum or kind; random bytes behind a valid header.
//!
//! The reader, the replay and every export must never panic (these run
//! as a debug build: an overflow panics), and damage must be reported
//! whenever the bytes are no longer a sequence of whole, valid records.

use std::{collections::HashSet, net::SocketAddr};

use proptest::{prelude::*, sample::Index};
use serde_json::{json, Value};
use tracer_common::{tcp, EventKind, FdEvent, Header as EventHeader, StateEvent, NO_STACK};

use super::{
    format::{self, BLOCK_HEADER, MAX_RECORD, RECORD_HEADER},
    reader::{Damage, Item, Reader},
    synth::{self, SEC},
    writer::Header,
};
use crate::{
    correlate::Comm,
    decode::Event,
    export,
    input::Input,
    kernel::KernelStats,
    replay,
    sink::{NullSink, TextSink},
};

// ---------------------------------------------------------------------------
// Valid recordings, with values anywhere in their range
// ---------------------------------------------------------------------------

/// The time a recording is made at: boot, the clock's end (where sums
/// overflow), or any.
fn era() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0), Just(u64::MAX - 30 * SEC), any::<u64>()]
}

/// A time within a minute of the recording's `era` (so that events, ticks
/// and thresholds meet; at the clock's end, half of them are its very
/// last nanosecond), or sometimes any time at all.
fn ns(era: u64) -> impl Strategy<Value = u64> {
    prop_oneof![8 => (0..60 * SEC).prop_map(move |d| era.saturating_add(d)), 1 => any::<u64>()]
}

/// Text that a process can put in its name: separators, whitespace,
/// control characters, non-ASCII.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("leaky".to_string()),
        "[a-z0-9 ;:\n\t\r\u{1}é\\[\\]]{0,24}",
        any::<String>(),
    ]
}

fn stack_id() -> impl Strategy<Value = i32> {
    prop_oneof![Just(NO_STACK), 0i32..4, -40i32..0, any::<i32>()]
}

fn tcp_state() -> impl Strategy<Value = u8> {
    prop_oneof![3 => Just(tcp::CLOSE_WAIT), 6 => 1u8..=12, 1 => any::<u8>()]
}

fn counter() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..200, (0u64..200).prop_map(|d| u64::MAX - d), any::<u64>()]
}

fn event_header(era: u64, kind: EventKind) -> impl Strategy<Value = EventHeader> {
    (ns(era), 1u32..4, 0u64..4, stack_id(), stack_id(), text()).prop_map(move |(ns, pid, cookie, u, k, comm)| {
        EventHeader {
            kind: kind as u32,
            cpu: 0,
            ktime_ns: ns,
            tgid: pid,
            tid: pid,
            comm: Comm::from_str(&comm).0,
            cookie,
            skaddr: 0x1000 + cookie,
            ustack: u,
            kstack: k,
        }
    })
}

fn kernel_event(era: u64) -> impl Strategy<Value = Input> {
    let state = (
        event_header(era, EventKind::State),
        any::<[u8; 16]>(),
        any::<(u16, u16)>(),
        prop_oneof![Just(2u16), Just(10u16), any::<u16>()],
        tcp_state(),
        tcp_state(),
        any::<u32>(),
    )
        .prop_map(|(header, addr, (sport, dport), family, oldstate, newstate, rx_queue)| {
            Input::Kernel(Event::State(StateEvent {
                header,
                saddr: addr,
                daddr: addr,
                sport,
                dport,
                family,
                oldstate,
                newstate,
                rx_queue,
                _pad: 0,
            }))
        });
    let fd = |kind| {
        (event_header(era, kind), any::<i32>()).prop_map(move |(header, fd)| {
            let e = FdEvent { header, fd, _pad: 0 };
            Input::Kernel(if kind == EventKind::Accept {
                Event::Accept(e)
            } else {
                Event::Close(e)
            })
        })
    };
    prop_oneof![3 => state, 1 => fd(EventKind::Accept), 1 => fd(EventKind::Close)]
}

fn frame() -> impl Strategy<Value = Value> {
    (
        text(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(any::<u32>()),
        any::<bool>(),
        prop_oneof![
            Just("native"),
            Just("kernel"),
            Just("interpreted"),
            Just("compiled"),
            Just("inlined")
        ],
    )
        .prop_map(|(ip, symbol, module, line, kernel, kind)| {
            json!({"ip": ip, "symbol": symbol, "module": module, "offset": module.as_ref().map(|_| "0x10"),
                   "file": null, "line": line, "kernel": kernel, "kind": kind})
        })
}

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("generated to match the type")
}

fn snapshot_socket() -> impl Strategy<Value = Value> {
    (
        0u64..4,
        tcp_state(),
        any::<(SocketAddr, SocketAddr)>(),
        proptest::option::of((1u32..4, text(), any::<i32>())),
        proptest::option::of(counter()),
    )
        .prop_map(|(cookie, state, (local, remote), holder, age)| {
            json!({"cookie": cookie, "state": state, "endpoints": {"local": local, "remote": remote},
                   "holder": holder, "last_ack_age_ns": age})
        })
}

fn snapshot(era: u64) -> impl Strategy<Value = Input> {
    (ns(era), proptest::collection::vec(snapshot_socket(), 0..8))
        .prop_map(|(ns, sockets)| Input::Snapshot(from_json(json!({"ns": ns, "sockets": sockets}))))
}

fn stats(era: u64) -> impl Strategy<Value = Input> {
    (ns(era), proptest::collection::vec(counter(), 16)).prop_map(|(ns, values)| {
        let mut k = serde_json::to_value(KernelStats::default()).expect("serializes");
        for ((_, v), n) in k.as_object_mut().expect("an object").iter_mut().zip(values) {
            *v = n.into();
        }
        Input::Stats(from_json(json!({"ns": ns, "kernel": k})))
    })
}

/// Any input but a snapshot and the end (placed by [`recording`]).
fn body_input(era: u64) -> impl Strategy<Value = Input> {
    let process = (1u32..4, text(), text()).prop_map(|(pid, comm, cmdline)| {
        Input::Process(from_json(json!({"pid": pid, "comm": comm, "cmdline": cmdline})))
    });
    let stack = (
        0u32..4,
        stack_id(),
        prop_oneof![
            proptest::collection::vec(frame(), 0..4).prop_map(|f| json!({ "Ok": f })),
            text().prop_map(|e| json!({ "Err": e })),
        ],
        proptest::option::of(text()),
    )
        .prop_map(|(pid, id, frames, truncated)| {
            Input::Stack(from_json(
                json!({"key": {"pid": pid, "id": id}, "frames": frames, "truncated": truncated}),
            ))
        });
    let holder =
        (1u32..4, text(), any::<i32>()).prop_map(|(pid, comm, fd)| json!({"pid": pid, "comm": comm, "fd": fd}));
    let evidence = (
        ns(era),
        proptest::collection::vec(
            (
                0u64..4,
                proptest::option::of(any::<u32>()),
                proptest::collection::vec(holder, 0..3),
                any::<bool>(),
            ),
            0..3,
        ),
    )
        .prop_map(|(ns, items)| {
            let items: Vec<Value> = items
                .into_iter()
                .map(|(c, unread, holders, found)| json!([c, {"unread_now": unread, "holders": holders, "found": found}]))
                .collect();
            Input::Evidence(from_json(json!({"ns": ns, "items": items})))
        });
    let exit = (ns(era), 1u32..4).prop_map(|(ns, pid)| Input::ProcessExit(from_json(json!({"ns": ns, "pid": pid}))));
    let forget = (
        ns(era),
        proptest::collection::vec(0u32..4, 0..3),
        proptest::collection::vec((0u32..4, any::<i32>()), 0..3),
    )
        .prop_map(|(ns, pids, stacks)| {
            let stacks: Vec<Value> = stacks
                .into_iter()
                .map(|(pid, id)| json!({"pid": pid, "id": id}))
                .collect();
            Input::Forget(from_json(json!({"ns": ns, "pids": pids, "stacks": stacks})))
        });
    prop_oneof![
        8 => kernel_event(era),
        3 => ns(era).prop_map(Input::Tick),
        1 => process,
        1 => stack,
        1 => evidence,
        1 => stats(era),
        1 => exit,
        1 => forget,
    ]
}

fn header() -> impl Strategy<Value = Header> {
    (
        prop_oneof![4 => 0u64..3000, 1 => Just(u64::MAX), 1 => any::<u64>()],
        proptest::option::of(1u32..4),
        any::<i64>(),
    )
        .prop_map(|(leak_after_ms, pid, offset)| {
            let mut h = synth::header(leak_after_ms);
            h.options.pid = pid;
            h.boot_to_wall_offset_ns = offset;
            h
        })
}

/// A valid recording: a header, inputs with at most one start-up snapshot
/// (in parts of 1 to 3 sockets), and usually an End record last; written
/// as version 1 (`bytes`) and as version 2 (`v2`, in blocks of one
/// record to all of them).
#[derive(Debug, Clone)]
struct Recording {
    bytes: Vec<u8>,
    v2: Vec<u8>,
    ended: bool,
}

fn recording() -> impl Strategy<Value = Recording> {
    era()
        .prop_flat_map(|era| {
            (
                header(),
                proptest::collection::vec(body_input(era), 0..30),
                proptest::option::of((any::<Index>(), snapshot(era))),
                1usize..4,
                prop_oneof![4 => Just(true), 1 => Just(false)],
                ns(era),
                prop_oneof![Just(1usize), 1usize..600, Just(format::BLOCK_TARGET)],
            )
        })
        .prop_map(|(header, mut inputs, snap, part, ended, end_ns, block_target)| {
            if let Some((at, s)) = snap {
                inputs.insert(at.index(inputs.len() + 1), s);
            }
            if ended {
                inputs.push(synth::end(end_ns));
            }
            Recording {
                bytes: synth::write_v1(&header, &inputs, part),
                v2: synth::write_with(&header, &inputs, part, block_target),
                ended,
            }
        })
}

// ---------------------------------------------------------------------------
// Running every reader of recordings
// ---------------------------------------------------------------------------

/// `report --json` (with `--events`), `report` as text, and every export:
/// the damage `report` found and the records it read.
fn read_every_way(files: &[&[u8]]) -> (Vec<String>, u64) {
    let out = synth::report(files, None).expect("damage after the header is never fatal");
    let damage = synth::damage(&out);
    let records = synth::summary(&out)["recording"]["records"].as_u64().expect("records");

    let r = synth::replay(files).expect("opens");
    let leak_after = replay::leak_after_ns(&r.header);
    let (mut text, mut err) = (Vec::new(), Vec::new());
    let mut sink = TextSink::new(&mut text, &mut err);
    let summary = replay::analyse(r, Some(2), leak_after / 2, true, false, &mut sink).expect("analysed");
    crate::sink::Sink::summary(&mut sink, &summary).expect("in memory");

    let mut sink = Vec::new();
    export::jsonl(synth::replay(files).expect("opens"), &mut sink).expect("jsonl");
    let mut sink = Vec::new();
    export::chrome_trace(synth::replay(files).expect("opens"), &mut sink).expect("chrome-trace");
    let lines = export::folded(synth::replay(files).expect("opens")).expect("folded");
    for l in &lines {
        // `frames count`: one space, before the count.
        let (stack, n) = l.rsplit_once(' ').expect("a count");
        assert!(
            !stack.contains(char::is_whitespace) && n.parse::<u64>().is_ok(),
            "{l:?}"
        );
    }
    let _ = replay::analyse(
        synth::replay(files).expect("opens"),
        None,
        0,
        false,
        false,
        &mut NullSink,
    );
    (damage, records)
}

/// The file's records, if its body is exactly a sequence of whole,
/// valid records (checked here independently of the reader).
fn tiles(file: &[u8], body: usize) -> Option<Vec<&[u8]>> {
    let mut at = body;
    let mut out = Vec::new();
    while at < file.len() {
        let h = file.get(at..at + RECORD_HEADER)?;
        let len = u32::from_le_bytes(h[0..4].try_into().ok()?);
        let kind = u16::from_le_bytes([h[4], h[5]]);
        if len > MAX_RECORD || kind == 0 || h[6..8] != [0, 0] {
            return None;
        }
        let end = at + RECORD_HEADER + len as usize;
        let payload = file.get(at + RECORD_HEADER..end)?;
        if format::record_crc(kind, payload) != u32::from_le_bytes(h[8..12].try_into().ok()?) {
            return None;
        }
        out.push(&file[at..end]);
        at = end;
    }
    Some(out)
}

fn body_start(file: &[u8]) -> usize {
    let hlen = u32::from_le_bytes(file[12..16].try_into().unwrap()) as usize;
    16 + hlen + 4
}

/// Every record the reader yields, whole (header and payload).
fn records_read(file: &[u8]) -> Vec<Vec<u8>> {
    let mut r = Reader::new("x".into(), file).expect("a valid header");
    let mut out = Vec::new();
    while let Some(item) = r.next().expect("in memory") {
        if let Item::Record(rec) = item {
            let at = rec.offset as usize;
            out.push(file[at..at + RECORD_HEADER + rec.payload.len()].to_vec());
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Damage
// ---------------------------------------------------------------------------

/// Damage to whole records: what a valid sequence of records can become.
#[derive(Debug, Clone)]
enum RecordOp {
    Duplicate(Index),
    Swap(Index, Index),
    Drop(Index),
    SetLen(Index, u32),
    SetCrc(Index, u32),
    SetKind(Index, u16),
}

/// Damage to bytes anywhere after the file header.
#[derive(Debug, Clone)]
enum ByteOp {
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Truncate(Index),
}

fn record_op() -> impl Strategy<Value = RecordOp> {
    let len = prop_oneof![0u32..200, Just(MAX_RECORD), Just(MAX_RECORD + 1), any::<u32>()];
    prop_oneof![
        any::<Index>().prop_map(RecordOp::Duplicate),
        any::<(Index, Index)>().prop_map(|(a, b)| RecordOp::Swap(a, b)),
        any::<Index>().prop_map(RecordOp::Drop),
        (any::<Index>(), len).prop_map(|(i, l)| RecordOp::SetLen(i, l)),
        any::<(Index, u32)>().prop_map(|(i, c)| RecordOp::SetCrc(i, c)),
        any::<(Index, u16)>().prop_map(|(i, k)| RecordOp::SetKind(i, k)),
    ]
}

fn byte_op() -> impl Strategy<Value = ByteOp> {
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(i, x)| ByteOp::Flip(i, x)),
        (any::<Index>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| ByteOp::Insert(i, b)),
        (any::<Index>(), 1usize..40).prop_map(|(i, n)| ByteOp::Delete(i, n)),
        any::<Index>().prop_map(ByteOp::Truncate),
    ]
}

fn apply_record_op(records: &mut Vec<Vec<u8>>, op: &RecordOp) {
    if records.is_empty() {
        return;
    }
    let n = records.len();
    match op {
        RecordOp::Duplicate(i) => {
            let r = records[i.index(n)].clone();
            records.insert(i.index(n), r);
        }
        RecordOp::Swap(a, b) => records.swap(a.index(n), b.index(n)),
        RecordOp::Drop(i) => {
            records.remove(i.index(n));
        }
        RecordOp::SetLen(i, l) => records[i.index(n)][0..4].copy_from_slice(&l.to_le_bytes()),
        RecordOp::SetCrc(i, c) => records[i.index(n)][8..12].copy_from_slice(&c.to_le_bytes()),
        RecordOp::SetKind(i, k) => records[i.index(n)][4..6].copy_from_slice(&k.to_le_bytes()),
    }
}

fn apply_byte_op(file: &mut Vec<u8>, body: usize, op: &ByteOp) {
    // Positions after the header: header damage is a one-line error,
    // tested with the reader.
    let at = |i: &Index, file: &Vec<u8>| body + i.index(file.len() - body + 1);
    match op {
        ByteOp::Flip(i, x) if file.len() > body => {
            let p = body + i.index(file.len() - body);
            file[p] ^= x;
        }
        ByteOp::Flip(..) => {}
        ByteOp::Insert(i, bytes) => {
            let p = at(i, file);
            file.splice(p..p, bytes.iter().copied());
        }
        ByteOp::Delete(i, n) => {
            let p = at(i, file);
            let end = (p + n).min(file.len());
            file.drain(p..end);
        }
        ByteOp::Truncate(i) => {
            let p = at(i, file);
            file.truncate(p);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Valid recordings with any values read without damage (or with only
    /// the missing end, when there is none), every record counted.
    #[test]
    fn valid_recordings_replay_every_way(rec in recording()) {
        let body = body_start(&rec.bytes);
        let written = tiles(&rec.bytes, body).expect("the writer writes whole records").len();
        let (damage, records) = read_every_way(&[&rec.bytes]);
        prop_assert_eq!(records, written as u64);
        if rec.ended {
            prop_assert!(damage.is_empty(), "{:?}", damage);
        } else {
            prop_assert_eq!(damage.len(), 1, "{:?}", damage);
            prop_assert!(damage[0].contains("ends early"), "{:?}", damage);
        }
    }

    /// Damaged recordings: never a panic; damage reported whenever the
    /// bytes are not whole valid records; only records that were written
    /// come out.
    #[test]
    fn damaged_recordings_are_read_and_reported(
        rec in recording(),
        record_ops in proptest::collection::vec(record_op(), 0..3),
        byte_ops in proptest::collection::vec(byte_op(), 0..3),
        then_the_original in any::<bool>(),
    ) {
        let body = body_start(&rec.bytes);
        let original = tiles(&rec.bytes, body).expect("whole records");
        let written: HashSet<&[u8]> = original.iter().copied().collect();
        let mut records: Vec<Vec<u8>> = original.iter().map(|r| r.to_vec()).collect();
        for op in &record_ops {
            apply_record_op(&mut records, op);
        }
        let mut file = rec.bytes[..body].to_vec();
        file.extend(records.concat());
        for op in &byte_ops {
            apply_byte_op(&mut file, body, op);
        }

        let files: Vec<&[u8]> = if then_the_original { vec![&file, &rec.bytes] } else { vec![&file] };
        let (damage, _) = read_every_way(&files);
        if tiles(&file, body).is_none() {
            prop_assert!(!damage.is_empty(), "damage not reported");
        }
        // A record that comes out is one that went in (a damaged one
        // passing its CRC is a 2^-32 chance).
        for r in records_read(&file) {
            prop_assert!(written.contains(&r[..]), "a record never written: {:?}", r);
        }
    }

    /// Random bytes behind a valid header: damage, never a panic.
    #[test]
    fn random_bytes_behind_a_valid_header(h in header(), junk in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut file = synth::write(&h, &[], 1);
        file.extend_from_slice(&junk);
        let (damage, _) = read_every_way(&[&file]);
        prop_assert!(!damage.is_empty());
    }
}

// ---------------------------------------------------------------------------
// Version 2: blocks
// ---------------------------------------------------------------------------

/// The file's blocks, if its body is exactly a sequence of whole blocks
/// with the right checksums (checked here independently of the reader).
fn block_tiles(file: &[u8], body: usize) -> Option<Vec<&[u8]>> {
    let mut at = body;
    let mut out = Vec::new();
    while at < file.len() {
        let h = file.get(at..at + BLOCK_HEADER)?;
        if &h[0..4] != format::BLOCK_MAGIC {
            return None;
        }
        let len = u32::from_le_bytes(h[4..8].try_into().ok()?) as usize;
        let end = at + BLOCK_HEADER + len;
        let b = file.get(at + BLOCK_HEADER..end)?;
        if format::block_crc(&h[4..16], b) != u32::from_le_bytes(h[16..20].try_into().ok()?) {
            return None;
        }
        out.push(&file[at..end]);
        at = end;
    }
    Some(out)
}

/// A record as read: its kind (None: unknown) and version-1 payload.
type Rec = (Option<format::Kind>, Vec<u8>);

/// Every record the reader yields, and the damage, in order.
fn read_v2(file: &[u8]) -> (Vec<Rec>, Vec<Damage>) {
    let mut r = Reader::new("x".into(), file).expect("a valid header");
    let (mut recs, mut damage) = (Vec::new(), Vec::new());
    while let Some(item) = r.next().expect("in memory") {
        match item {
            Item::Record(rec) => recs.push((rec.kind, rec.payload.to_vec())),
            Item::Damage(d) => damage.push(d),
        }
    }
    (recs, damage)
}

/// The records of a version-1 file, as [`read_v2`] gives them.
fn read_v1(file: &[u8]) -> Vec<Rec> {
    records_read(file)
        .into_iter()
        .map(|r| {
            let kind = format::Kind::from_u16(u16::from_le_bytes([r[4], r[5]]));
            (kind, r[RECORD_HEADER..].to_vec())
        })
        .collect()
}

/// Damage to whole blocks: what a valid sequence of blocks can become.
#[derive(Debug, Clone)]
enum BlockOp {
    Duplicate(Index),
    Swap(Index, Index),
    Drop(Index),
    SetLen(Index, u32),
    SetRawLen(Index, u32),
    SetCrc(Index, u32),
    SetCodec(Index, u8),
}

fn block_op() -> impl Strategy<Value = BlockOp> {
    let len = prop_oneof![
        0u32..200,
        Just(format::MAX_BLOCK),
        Just(format::MAX_BLOCK + 1),
        any::<u32>()
    ];
    prop_oneof![
        any::<Index>().prop_map(BlockOp::Duplicate),
        any::<(Index, Index)>().prop_map(|(a, b)| BlockOp::Swap(a, b)),
        any::<Index>().prop_map(BlockOp::Drop),
        (any::<Index>(), len.clone()).prop_map(|(i, l)| BlockOp::SetLen(i, l)),
        (any::<Index>(), len).prop_map(|(i, l)| BlockOp::SetRawLen(i, l)),
        any::<(Index, u32)>().prop_map(|(i, c)| BlockOp::SetCrc(i, c)),
        any::<(Index, u8)>().prop_map(|(i, c)| BlockOp::SetCodec(i, c)),
    ]
}

fn apply_block_op(blocks: &mut Vec<Vec<u8>>, op: &BlockOp) {
    if blocks.is_empty() {
        return;
    }
    let n = blocks.len();
    match op {
        BlockOp::Duplicate(i) => {
            let b = blocks[i.index(n)].clone();
            blocks.insert(i.index(n), b);
        }
        BlockOp::Swap(a, b) => blocks.swap(a.index(n), b.index(n)),
        BlockOp::Drop(i) => {
            blocks.remove(i.index(n));
        }
        BlockOp::SetLen(i, l) => blocks[i.index(n)][4..8].copy_from_slice(&l.to_le_bytes()),
        BlockOp::SetRawLen(i, l) => blocks[i.index(n)][8..12].copy_from_slice(&l.to_le_bytes()),
        BlockOp::SetCodec(i, c) => blocks[i.index(n)][12] = *c,
        BlockOp::SetCrc(i, c) => blocks[i.index(n)][16..20].copy_from_slice(&c.to_le_bytes()),
    }
}

/// The records in each of a version-2 file's blocks.
fn records_per_block(file: &[u8], blocks: &[&[u8]]) -> Vec<Vec<Rec>> {
    let body = body_start(file);
    blocks
        .iter()
        .map(|b| {
            let mut one = file[..body].to_vec();
            one.extend_from_slice(b);
            let (recs, damage) = read_v2(&one);
            assert!(damage.is_empty(), "{damage:?}");
            recs
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Version 2 gives back exactly the records version 1 holds, and
    /// replays them the same, every way.
    #[test]
    fn v2_holds_the_records_of_v1(rec in recording()) {
        let (v2, damage) = read_v2(&rec.v2);
        prop_assert!(damage.is_empty(), "{:?}", damage);
        prop_assert!(v2 == read_v1(&rec.bytes), "the records differ");
        prop_assert!(block_tiles(&rec.v2, body_start(&rec.v2)).is_some(), "the writer writes whole blocks");
        let (damage, records) = read_every_way(&[&rec.v2]);
        prop_assert_eq!(records, v2.len() as u64);
        if rec.ended {
            prop_assert!(damage.is_empty(), "{:?}", damage);
        } else {
            prop_assert_eq!(damage.len(), 1, "{:?}", damage);
        }
        let out = |f: &[u8]| synth::report(&[f], None).expect("reads");
        prop_assert_eq!(out(&rec.v2), out(&rec.bytes));
    }

    /// Damaged version-2 recordings: never a panic; damage reported
    /// whenever the bytes are not whole valid blocks; only records that
    /// were written come out, and a block's records all or none (but at
    /// a cut end).
    #[test]
    fn damaged_v2_recordings_are_read_and_reported(
        rec in recording(),
        block_ops in proptest::collection::vec(block_op(), 0..3),
        byte_ops in proptest::collection::vec(byte_op(), 0..3),
        then_the_original in any::<bool>(),
    ) {
        let body = body_start(&rec.v2);
        let original = block_tiles(&rec.v2, body).expect("whole blocks");
        let written: HashSet<Rec> = read_v2(&rec.v2).0.into_iter().collect();
        let mut blocks: Vec<Vec<u8>> = original.iter().map(|b| b.to_vec()).collect();
        for op in &block_ops {
            apply_block_op(&mut blocks, op);
        }
        let mut file = rec.v2[..body].to_vec();
        file.extend(blocks.concat());
        for op in &byte_ops {
            apply_byte_op(&mut file, body, op);
        }
        let files: Vec<&[u8]> = if then_the_original { vec![&file, &rec.v2] } else { vec![&file] };
        let (damage, _) = read_every_way(&files);
        if block_tiles(&file, body).is_none() {
            prop_assert!(!damage.is_empty(), "damage not reported");
        }
        for r in read_v2(&file).0 {
            prop_assert!(written.contains(&r), "a record never written: {:?}", r);
        }
    }

    /// A file cut anywhere in its last block: every record of the blocks
    /// before, and the cut said where the block starts.
    #[test]
    fn a_cut_in_the_last_block_loses_that_block_only(rec in recording()) {
        let body = body_start(&rec.v2);
        let blocks = block_tiles(&rec.v2, body).expect("whole blocks");
        let Some(last) = blocks.last() else { return Ok(()) };
        let last_at = rec.v2.len() - last.len();
        let per_block = records_per_block(&rec.v2, &blocks);
        let before: Vec<_> = per_block[..per_block.len() - 1].concat();
        for cut in last_at..rec.v2.len() {
            let (recs, damage) = read_v2(&rec.v2[..cut]);
            prop_assert!(recs == before, "cut at {}: other records", cut);
            if cut == last_at {
                prop_assert!(damage.is_empty(), "{:?}", damage);
            } else {
                prop_assert_eq!(&damage, &vec![Damage::Truncated { offset: last_at as u64 }], "cut at {}", cut);
            }
        }
    }

    /// Any byte of a block changed: that block is skipped and reported
    /// where it starts, with its length; every other block is read.
    #[test]
    fn a_corrupt_block_is_skipped_whole(rec in recording(), which in any::<Index>(), pos in any::<Index>(), flip in 1u8..=255) {
        let body = body_start(&rec.v2);
        let blocks = block_tiles(&rec.v2, body).expect("whole blocks");
        prop_assume!(!blocks.is_empty());
        let i = which.index(blocks.len());
        let at: usize = body + blocks[..i].iter().map(|b| b.len()).sum::<usize>();
        let mut file = rec.v2.clone();
        let p = pos.index(blocks[i].len());
        file[at + p] ^= flip;
        let per_block = records_per_block(&rec.v2, &blocks);
        let mut want = per_block.clone();
        want.remove(i);
        let (recs, damage) = read_v2(&file);
        prop_assert!(recs == want.concat(), "other records than all the blocks but #{}", i);
        let corrupt = vec![Damage::Corrupt { offset: at as u64, skipped: blocks[i].len() as u64 }];
        // The last block's length made longer than the file: it looks cut
        // short (as it would be, cut in its body).
        let cut = vec![Damage::Truncated { offset: at as u64 }];
        let last_len = i == blocks.len() - 1 && (4..8).contains(&p);
        prop_assert!(damage == corrupt || (last_len && damage == cut), "{:?}", damage);
    }
}
