//! Kernel events in format version 2: each `tracer_common` wire struct
//! encoded field by field, against a *reference*: the previous event of
//! the same socket in the block, or else the previous event. What repeats
//! (a socket's addresses, ports and `skaddr`, the task's pid and comm,
//! stack ids) costs one bit of a mask; `ktime_ns` and the cookie are
//! deltas from the previous event. Every byte of the struct is kept:
//! decoding gives back the very bytes that were encoded, whatever they
//! hold (a field this code does not know is carried as it is).
//!
//! The context starts empty at every block, so each block decodes alone.
//! The layout is specified in docs/recording-format.md (version 2).

/// Bytes of an event kept as a reference: the longest struct known.
pub const CONTEXT_LEN: usize = 112;
/// The common header every event starts with.
pub const HEADER_LEN: usize = 64;
/// Sockets remembered per class in a block: slot `cookie % SLOTS`.
pub const SLOTS: usize = 4096;
/// Longest event accepted: more is corruption.
pub const MAX_EVENT: usize = 4096;

const COOKIE_AT: usize = 40;
const KTIME_AT: usize = 8;

/// How a field is written when it differs from the reference's.
#[derive(Clone, Copy, Debug)]
enum Coding {
    /// Its value, unsigned, as a varint.
    Uint,
    /// zigzag(value − reference's value), wrapping in the field's width.
    Delta,
    /// Its bytes as they are.
    Bytes,
    /// Compared with the reference's `newstate` (a socket leaves the state
    /// it last entered); written as its byte.
    AfterNewstate,
}

#[derive(Clone, Copy, Debug)]
struct Field {
    at: usize,
    size: usize,
    coding: Coding,
}

const fn f(at: usize, size: usize, coding: Coding) -> Field {
    Field { at, size, coding }
}

use Coding::*;

const CPU: Field = f(4, 4, Uint);
const TGID: Field = f(16, 4, Uint);
const TID: Field = f(20, 4, Uint);
const COMM: Field = f(24, 16, Bytes);
const SKADDR: Field = f(48, 8, Delta);
const USTACK: Field = f(56, 4, Delta);
const KSTACK: Field = f(60, 4, Delta);

/// The classes of events, each with its fields in mask-bit order (bit 0
/// first), the bytes they cover, and its own references.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// A TCP state change: kind 1, 112 bytes or more.
    State = 0,
    /// An accept or a close: kinds 2 and 3, 72 bytes or more.
    Fd = 1,
    /// Any other kind, or a struct shorter than its kind's: the header.
    Other = 2,
}

const STATE: [Field; 16] = [
    f(103, 1, Bytes), // newstate
    f(102, 1, AfterNewstate),
    f(96, 2, Uint),  // sport
    f(104, 4, Uint), // rx_queue
    CPU,
    TGID,
    TID,
    USTACK,
    KSTACK,
    f(98, 2, Uint),   // dport
    f(64, 16, Bytes), // saddr
    f(80, 16, Bytes), // daddr
    SKADDR,
    COMM,
    f(100, 2, Uint), // family
    f(108, 4, Uint), // padding
];
const FD: [Field; 9] = [
    f(64, 4, Delta),
    CPU,
    TGID,
    TID,
    USTACK,
    KSTACK,
    SKADDR,
    COMM,
    f(68, 4, Uint),
];
const OTHER: [Field; 7] = [CPU, TGID, TID, USTACK, KSTACK, SKADDR, COMM];

impl Class {
    fn of(kind: u32, len: usize) -> Class {
        match kind {
            1 if len >= 112 => Class::State,
            2 | 3 if len >= 72 => Class::Fd,
            _ => Class::Other,
        }
    }

    /// The fields, and the bytes they (with kind, ktime and cookie) cover:
    /// the rest of the struct is carried as it is.
    fn schema(self) -> (&'static [Field], usize) {
        match self {
            Class::State => (&STATE, 112),
            Class::Fd => (&FD, 72),
            Class::Other => (&OTHER, HEADER_LEN),
        }
    }
}

/// The usual length of a kind's struct: written only when it is another.
fn natural_len(kind: u32) -> usize {
    match kind {
        1 => 112,
        2 | 3 => 72,
        _ => HEADER_LEN,
    }
}

type Event = [u8; CONTEXT_LEN];

fn le(b: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    v[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(v)
}

/// A field's bytes as a little-endian number (fields are 1 to 16 bytes).
#[inline(always)]
fn load(ev: &Event, fl: &Field) -> u128 {
    let b = &ev[fl.at..];
    match fl.size {
        1 => u128::from(b[0]),
        2 => u128::from(u16::from_le_bytes([b[0], b[1]])),
        4 => u128::from(u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))),
        8 => u128::from(u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))),
        _ => u128::from_le_bytes(b[..16].try_into().expect("16 bytes")),
    }
}

fn put_le(b: &mut [u8], v: u64) {
    let n = b.len();
    b.copy_from_slice(&v.to_le_bytes()[..n]);
}

#[inline(always)]
fn width_mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * size)) - 1
    }
}

/// `v` (of `size` bytes) sign-extended to 64 bits.
#[inline(always)]
fn sign_extend(v: u64, size: usize) -> i64 {
    let shift = 64 - 8 * size as u32;
    ((v << shift) as i64) >> shift
}

pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 varint of at most 10 bytes from the front of `src`.
pub fn get_varint(src: &mut &[u8]) -> Result<u64, &'static str> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&b, rest) = src.split_first().ok_or("cut short")?;
        *src = rest;
        if i == 9 && b > 1 {
            return Err("varint overflows 64 bits");
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes")
}

fn take<'a>(src: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
    if src.len() < n {
        return Err("cut short");
    }
    let (a, b) = src.split_at(n);
    *src = b;
    Ok(a)
}

/// One class's references: its previous event, and its last event of
/// each socket (by slot).
struct Refs {
    prev: Event,
    slots: Vec<Event>,
    used: Vec<bool>,
}

impl Refs {
    fn new() -> Self {
        Refs {
            prev: [0; CONTEXT_LEN],
            slots: vec![[0; CONTEXT_LEN]; SLOTS],
            used: vec![false; SLOTS],
        }
    }

    fn reset(&mut self) {
        self.prev = [0; CONTEXT_LEN];
        self.used.fill(false);
    }

    fn slot(cookie: u64) -> usize {
        (cookie % SLOTS as u64) as usize
    }

    /// The reference of an event with this cookie.
    fn get(&self, cookie: u64) -> &Event {
        let s = Self::slot(cookie);
        if self.used[s] && le(&self.slots[s][COOKIE_AT..COOKIE_AT + 8]) == cookie {
            &self.slots[s]
        } else {
            &self.prev
        }
    }

    fn remember(&mut self, ev: &Event, cookie: u64) {
        let s = Self::slot(cookie);
        self.slots[s] = *ev;
        self.used[s] = true;
        self.prev = *ev;
    }
}

/// Bit `i` set: byte `i` of `a` and `b` differ. Eight bytes at a time
/// (the writer's hot path): the high bit of each byte of `x` set where
/// `x`'s byte is not zero, then those 8 bits gathered by a multiply.
#[inline(always)]
fn differing_bytes(a: &Event, b: &Event) -> u128 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut m = 0u128;
    for (w, (x, y)) in a.chunks_exact(8).zip(b.chunks_exact(8)).enumerate() {
        let x = u64::from_le_bytes(x.try_into().expect("8 bytes")) ^ u64::from_le_bytes(y.try_into().expect("8 bytes"));
        let nonzero = (((x & LOW7) + LOW7) | x) & HIGH;
        let bits = (nonzero >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56;
        m |= u128::from(bits) << (8 * w);
    }
    m
}

/// A schema's fields by byte: which field (mask bit) each byte belongs
/// to, and each field's bytes. `oldstate` (compared with another byte of
/// the reference) is in neither: it is compared on its own.
struct ByteMap {
    field_of: [u8; CONTEXT_LEN],
    spans: [u128; 16],
    /// The bytes that belong to a field compared byte for byte.
    covered: u128,
    /// The bit of the `oldstate` field, if the schema has one.
    after_newstate: Option<(usize, usize)>,
}

const fn byte_map(fields: &[Field]) -> ByteMap {
    let mut m = ByteMap {
        field_of: [u8::MAX; CONTEXT_LEN],
        spans: [0; 16],
        covered: 0,
        after_newstate: None,
    };
    let mut bit = 0;
    while bit < fields.len() {
        let fl = &fields[bit];
        if let AfterNewstate = fl.coding {
            m.after_newstate = Some((bit, fl.at));
        } else {
            let span = ((1u128 << fl.size) - 1) << fl.at;
            m.spans[bit] = span;
            m.covered |= span;
            let mut i = fl.at;
            while i < fl.at + fl.size {
                m.field_of[i] = bit as u8;
                i += 1;
            }
        }
        bit += 1;
    }
    m
}

const STATE_MAP: ByteMap = byte_map(&STATE);
const FD_MAP: ByteMap = byte_map(&FD);
const OTHER_MAP: ByteMap = byte_map(&OTHER);

/// The mask of the fields of `ev` that differ from the reference `r`,
/// then those fields. The mask costs a step per differing field, not per
/// field (the writer's hot path).
#[inline(always)]
fn encode_fields(fields: &[Field], map: &ByteMap, ev: &Event, r: &Event, out: &mut Vec<u8>) {
    let mut diff = differing_bytes(ev, r) & map.covered;
    let mut mask = 0u64;
    while diff != 0 {
        let bit = map.field_of[diff.trailing_zeros() as usize];
        mask |= 1 << bit;
        diff &= !map.spans[usize::from(bit)];
    }
    if let Some((bit, at)) = map.after_newstate {
        mask |= u64::from(ev[at] != r[103]) << bit;
    }
    put_varint(out, mask);
    let mut m = mask;
    while m != 0 {
        let fl = &fields[m.trailing_zeros() as usize];
        m &= m - 1;
        match fl.coding {
            Uint => put_varint(out, load(ev, fl) as u64),
            Delta => {
                let d = (load(ev, fl) as u64).wrapping_sub(load(r, fl) as u64) & width_mask(fl.size);
                put_varint(out, zigzag(sign_extend(d, fl.size)));
            }
            Bytes | AfterNewstate => out.extend_from_slice(&ev[fl.at..fl.at + fl.size]),
        }
    }
}

/// The state shared by the encoder and the decoder of one block.
pub struct Context {
    /// The previous event's cookie and time (any class).
    cookie: u64,
    ktime: u64,
    refs: [Refs; 3],
}

impl Default for Context {
    fn default() -> Self {
        Context {
            cookie: 0,
            ktime: 0,
            refs: [Refs::new(), Refs::new(), Refs::new()],
        }
    }
}

impl Context {
    /// A new block: nothing is known.
    pub fn reset(&mut self) {
        self.cookie = 0;
        self.ktime = 0;
        for r in &mut self.refs {
            r.reset();
        }
    }

    /// Appends the encoding of the wire struct `wire` to `out`.
    pub fn encode(&mut self, wire: &[u8], out: &mut Vec<u8>) {
        let len = wire.len();
        if len < HEADER_LEN {
            // Tag 1: kind 0, length given; the bytes as they are.
            put_varint(out, 1);
            put_varint(out, len as u64);
            out.extend_from_slice(wire);
            return;
        }
        let kind = le(&wire[0..4]) as u32;
        let natural = len == natural_len(kind);
        put_varint(out, (u64::from(kind) << 1) | u64::from(!natural));
        if !natural {
            put_varint(out, len as u64);
        }
        let mut ev: Event = [0; CONTEXT_LEN];
        let n = len.min(CONTEXT_LEN);
        ev[..n].copy_from_slice(&wire[..n]);
        let cookie = le(&ev[COOKIE_AT..COOKIE_AT + 8]);
        put_varint(out, zigzag(cookie.wrapping_sub(self.cookie) as i64));
        let ktime = le(&ev[KTIME_AT..KTIME_AT + 8]);
        put_varint(out, zigzag(ktime.wrapping_sub(self.ktime) as i64));
        let class = Class::of(kind, len);
        let known = class.schema().1;
        let refs = &mut self.refs[class as usize];
        let r = refs.get(cookie);
        match class {
            Class::State => encode_fields(&STATE, &STATE_MAP, &ev, r, out),
            Class::Fd => encode_fields(&FD, &FD_MAP, &ev, r, out),
            Class::Other => encode_fields(&OTHER, &OTHER_MAP, &ev, r, out),
        }
        out.extend_from_slice(&wire[known..]);
        refs.remember(&ev, cookie);
        self.cookie = cookie;
        self.ktime = ktime;
    }

    /// Decodes one event encoding (all of `src`) into its wire struct,
    /// appended to `out`. Anything malformed is an error, never a panic.
    pub fn decode(&mut self, mut src: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
        let src = &mut src;
        let tag = get_varint(src)?;
        let kind = u32::try_from(tag >> 1).map_err(|_| "kind out of range")?;
        let len = if tag & 1 != 0 {
            let l = get_varint(src)?;
            if l > MAX_EVENT as u64 {
                return Err("kernel event too long");
            }
            l as usize
        } else {
            natural_len(kind)
        };
        if len < HEADER_LEN {
            if kind != 0 {
                return Err("short event with a kind");
            }
            out.extend_from_slice(take(src, len)?);
            return if src.is_empty() { Ok(()) } else { Err("trailing bytes") };
        }
        let cookie = self.cookie.wrapping_add(unzigzag(get_varint(src)?) as u64);
        let ktime = self.ktime.wrapping_add(unzigzag(get_varint(src)?) as u64);
        let class = Class::of(kind, len);
        let (fields, known) = class.schema();
        let refs = &mut self.refs[class as usize];
        let r = *refs.get(cookie);
        let mut ev: Event = [0; CONTEXT_LEN];
        put_le(&mut ev[0..4], u64::from(kind));
        put_le(&mut ev[KTIME_AT..KTIME_AT + 8], ktime);
        put_le(&mut ev[COOKIE_AT..COOKIE_AT + 8], cookie);
        let mask = get_varint(src)?;
        if mask >> fields.len() != 0 {
            return Err("mask names fields the event does not have");
        }
        for (bit, fl) in fields.iter().enumerate() {
            let at = fl.at..fl.at + fl.size;
            if mask & (1 << bit) == 0 {
                if let AfterNewstate = fl.coding {
                    ev[fl.at] = r[103];
                } else {
                    ev[at.clone()].copy_from_slice(&r[at]);
                }
                continue;
            }
            match fl.coding {
                Uint => {
                    let v = get_varint(src)?;
                    if v & !width_mask(fl.size) != 0 {
                        return Err("field value out of range");
                    }
                    put_le(&mut ev[at], v);
                }
                Delta => {
                    let d = unzigzag(get_varint(src)?);
                    if sign_extend(d as u64 & width_mask(fl.size), fl.size) != d {
                        return Err("field delta out of range");
                    }
                    let v = le(&r[at.clone()]).wrapping_add(d as u64);
                    put_le(&mut ev[at], v);
                }
                Bytes | AfterNewstate => ev[at].copy_from_slice(take(src, fl.size)?),
            }
        }
        let tail = take(src, len - known)?;
        if !src.is_empty() {
            return Err("trailing bytes");
        }
        out.extend_from_slice(&ev[..known]);
        out.extend_from_slice(tail);
        // The reference holds the struct's first bytes, zero past its end.
        let n = len.min(CONTEXT_LEN);
        ev[known..n].copy_from_slice(&tail[..n - known]);
        refs.remember(&ev, cookie);
        self.cookie = cookie;
        self.ktime = ktime;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(events: &[Vec<u8>]) -> Vec<u8> {
        let (mut enc, mut dec) = (Context::default(), Context::default());
        let mut all = Vec::new();
        for ev in events {
            let mut one = Vec::new();
            enc.encode(ev, &mut one);
            let mut back = Vec::new();
            dec.decode(&one, &mut back).unwrap_or_else(|e| panic!("{e}: {ev:?}"));
            assert_eq!(&back, ev);
            all.extend(one);
        }
        all
    }

    fn event(kind: u32, len: usize, cookie: u64, ktime: u64, fill: u8) -> Vec<u8> {
        let mut v = vec![fill; len];
        if len >= 4 {
            v[0..4].copy_from_slice(&kind.to_le_bytes());
        }
        if len >= 48 {
            v[8..16].copy_from_slice(&ktime.to_le_bytes());
            v[40..48].copy_from_slice(&cookie.to_le_bytes());
        }
        v
    }

    #[test]
    fn differing_bytes_is_byte_by_byte() {
        let a: Event = std::array::from_fn(|i| i as u8);
        for i in 0..CONTEXT_LEN {
            for x in [1u8, 0x80, 0xff, 0x7f] {
                let mut b = a;
                b[i] ^= x;
                assert_eq!(differing_bytes(&a, &b), 1u128 << i, "byte {i} ^ {x:#x}");
            }
        }
        let z = [0u8; CONTEXT_LEN];
        let f = [0xffu8; CONTEXT_LEN];
        assert_eq!(differing_bytes(&z, &f), (1u128 << CONTEXT_LEN) - 1);
        assert_eq!(differing_bytes(&f, &f), 0);
    }

    #[test]
    fn varints_and_zigzag() {
        for v in [0, 1, 127, 128, 300, u64::MAX, u64::MAX - 1, 1 << 63] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut s = &b[..];
            assert_eq!(get_varint(&mut s), Ok(v));
            assert!(s.is_empty());
        }
        for v in [0, 1, -1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        assert!(get_varint(&mut &[0x80u8; 11][..]).is_err());
        assert!(get_varint(&mut &[0xffu8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02][..]).is_err());
        assert!(get_varint(&mut &[0x80u8][..]).is_err());
    }

    #[test]
    fn a_socket_seen_again_costs_little() {
        let a = event(1, 112, 1000, 5_000_000, 0x11);
        let mut b = a.clone();
        b[8..16].copy_from_slice(&5_000_500u64.to_le_bytes());
        b[102] = a[103];
        b[103] = 4;
        let other = event(1, 112, 2000, 5_000_100, 0x22);
        let all = round_trip(&[a.clone(), other, b]);
        let mut enc = Context::default();
        let mut out = Vec::new();
        enc.encode(&a, &mut out);
        let first = out.len();
        enc.encode(&event(1, 112, 2000, 5_000_100, 0x22), &mut out);
        let second = out.len() - first;
        let third = all.len() - out.len();
        // len, cookie delta, ktime delta, mask, newstate.
        assert!(third <= 8, "{third} bytes for a state change of a known socket");
        assert!(second > third && first > third, "{first} {second} {third}");
    }

    #[test]
    fn every_kind_and_length_round_trips() {
        let mut evs = Vec::new();
        for (i, (kind, len)) in [
            (1, 112),
            (2, 72),
            (3, 72),
            (1, 72),
            (2, 64),
            (9, 64),
            (1, 200),
            (3, 80),
            (0, 10),
            (1, 0),
            (u32::MAX, 112),
        ]
        .into_iter()
        .enumerate()
        {
            evs.push(event(
                kind,
                len,
                i as u64 % 3,
                u64::MAX - i as u64,
                (i as u8).wrapping_mul(37),
            ));
        }
        round_trip(&evs);
    }

    proptest! {
        /// Any sequence of structs of any bytes and length comes back.
        #[test]
        fn any_events_round_trip(evs in proptest::collection::vec(
            (prop_oneof![Just(1u32), Just(2), Just(3), any::<u32>()],
             prop_oneof![Just(112usize), Just(72), 0usize..300],
             0u64..5, any::<u64>(), proptest::collection::vec(any::<u8>(), 300)),
            0..40)) {
            let evs: Vec<Vec<u8>> = evs
                .into_iter()
                .map(|(kind, len, cookie, ktime, bytes)| {
                    let mut v = bytes[..len].to_vec();
                    if len >= 48 {
                        v[0..4].copy_from_slice(&kind.to_le_bytes());
                        v[8..16].copy_from_slice(&ktime.to_le_bytes());
                        v[40..48].copy_from_slice(&cookie.to_le_bytes());
                    }
                    v
                })
                .collect();
            round_trip(&evs);
        }

        /// Any bytes: an error or an event, never a panic.
        #[test]
        fn any_bytes_decode_or_fail(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut c = Context::default();
            let mut out = Vec::new();
            let _ = c.decode(&data, &mut out);
        }
    }
}
