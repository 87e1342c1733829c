//! Ring-buffer bytes -> typed events. The only place that interprets raw
//! records; everything downstream works on [`Event`].

use tracer_common::{
    tcp, EventKind, FdEvent, Header, KernelStackEvent, StateEvent, UserFrame, UserStackEvent, MAX_KERNEL_FRAMES,
    MAX_USER_FRAMES, SP_WORDS,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    State(StateEvent),
    Accept(FdEvent),
    Close(FdEvent),
}

impl Event {
    /// Whether the event opens the socket in its owner's own syscall: an
    /// accept, or connect's CLOSE -> SYN_SENT. Its task is the owner.
    pub fn opens_socket(&self) -> bool {
        match self {
            Event::State(s) => s.oldstate == tcp::CLOSE && s.newstate == tcp::SYN_SENT,
            Event::Accept(_) => true,
            Event::Close(_) => false,
        }
    }

    pub fn header(&self) -> &Header {
        match self {
            Event::State(e) => &e.header,
            Event::Accept(e) | Event::Close(e) => &e.header,
        }
    }

    pub fn header_mut(&mut self) -> &mut Header {
        match self {
            Event::State(e) => &mut e.header,
            Event::Accept(e) | Event::Close(e) => &mut e.header,
        }
    }
}

/// A ring-buffer record: an event, or a stack of the event that follows it.
#[derive(Debug)]
pub enum Record {
    Event(Event),
    UserStack(WalkedStack),
    KernelStack(KernelStack),
    /// A followed socket's change into CLOSE_WAIT, spilled from the
    /// kernel's map.
    CloseWait(StateEvent),
}

/// A [`KernelStackEvent`] with only its valid instruction pointers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelStack {
    pub header: Header,
    /// Innermost first.
    pub ips: Vec<u64>,
}

/// A [`UserStackEvent`] with only its valid frames (the record has room
/// for [`MAX_USER_FRAMES`]; copying them all cost the agent more than the
/// rest of its work on a stack).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkedStack {
    pub header: Header,
    pub sp_words: [u64; SP_WORDS],
    /// A `tracer_common::walk_end` value.
    pub end: u32,
    pub frames: Vec<UserFrame>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {need}-byte {what}")]
    Short {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("a stack record where an event was expected")]
    NotAnEvent,
}

fn read<T: Copy>(buf: &[u8], what: &'static str) -> Result<T, DecodeError> {
    let need = std::mem::size_of::<T>();
    if buf.len() < need {
        return Err(DecodeError::Short {
            what,
            len: buf.len(),
            need,
        });
    }
    // SAFETY: length checked; T is a repr(C) plain-old-data wire type, valid
    // for any bit pattern; read_unaligned copes with any alignment.
    Ok(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<T>()) })
}

pub fn decode(buf: &[u8]) -> Result<Event, DecodeError> {
    let header: Header = read(buf, "header")?;
    match EventKind::from_u32(header.kind) {
        Some(EventKind::State) => Ok(Event::State(read(buf, "state event")?)),
        Some(EventKind::Accept) => Ok(Event::Accept(read(buf, "accept event")?)),
        Some(EventKind::Close) => Ok(Event::Close(read(buf, "close event")?)),
        Some(EventKind::UserStack | EventKind::KernelStack | EventKind::CloseWait) => Err(DecodeError::NotAnEvent),
        None => Err(DecodeError::UnknownKind(header.kind)),
    }
}

/// Any ring-buffer record: [`decode`] plus the stack records that only the
/// live agent sees.
pub fn decode_record(buf: &[u8]) -> Result<Record, DecodeError> {
    let header: Header = read(buf, "header")?;
    if header.kind == EventKind::UserStack as u32 {
        let frames = trailing_array(
            buf,
            "user stack",
            std::mem::offset_of!(UserStackEvent, nframes),
            std::mem::offset_of!(UserStackEvent, frames),
            MAX_USER_FRAMES,
        )?;
        return Ok(Record::UserStack(WalkedStack {
            header,
            sp_words: read(&buf[std::mem::offset_of!(UserStackEvent, sp_words)..], "user stack")?,
            end: read(&buf[std::mem::offset_of!(UserStackEvent, end)..], "user stack")?,
            frames,
        }));
    }
    if header.kind == EventKind::KernelStack as u32 {
        let ips = trailing_array(
            buf,
            "kernel stack",
            std::mem::offset_of!(KernelStackEvent, nframes),
            std::mem::offset_of!(KernelStackEvent, ips),
            MAX_KERNEL_FRAMES,
        )?;
        return Ok(Record::KernelStack(KernelStack { header, ips }));
    }
    if header.kind == EventKind::CloseWait as u32 {
        return Ok(Record::CloseWait(read(buf, "close-wait record")?));
    }
    decode(buf).map(Record::Event)
}

/// The valid items of a record's trailing array (only those are sent):
/// their count is the `u32` at `count_at`, capped at `max`, and they start
/// at `items_at`.
fn trailing_array<T: Copy>(
    buf: &[u8],
    what: &'static str,
    count_at: usize,
    items_at: usize,
    max: usize,
) -> Result<Vec<T>, DecodeError> {
    if buf.len() < items_at {
        return Err(DecodeError::Short {
            what,
            len: buf.len(),
            need: items_at,
        });
    }
    let n = (read::<u32>(&buf[count_at..], what)? as usize).min(max);
    let size = std::mem::size_of::<T>();
    let need = items_at + n * size;
    if buf.len() < need {
        return Err(DecodeError::Short {
            what: "stack's frames",
            len: buf.len(),
            need,
        });
    }
    (0..n).map(|i| read(&buf[items_at + i * size..], what)).collect()
}

/// Bytes of a wire struct, for writing records.
pub fn bytes_of<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a repr(C) wire type with explicit padding (no
    // uninitialised bytes); the slice lives as long as the borrow.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::COMM_LEN;

    fn header(kind: EventKind) -> Header {
        Header {
            kind: kind as u32,
            cpu: 1,
            ktime_ns: 42,
            tgid: 7,
            tid: 8,
            comm: [b'x'; COMM_LEN],
            cookie: 99,
            skaddr: 0xffff_0000,
            ustack: 3,
            kstack: tracer_common::NO_STACK,
        }
    }

    #[test]
    fn round_trips_every_kind() {
        let st = StateEvent {
            header: header(EventKind::State),
            saddr: [1; 16],
            daddr: [2; 16],
            sport: 1000,
            dport: 80,
            family: 2,
            oldstate: 1,
            newstate: 8,
            rx_queue: 27,
            _pad: 0,
        };
        assert_eq!(decode(bytes_of(&st)), Ok(Event::State(st)));
        for kind in [EventKind::Accept, EventKind::Close] {
            let fe = FdEvent {
                header: header(kind),
                fd: 5,
                _pad: 0,
            };
            let ev = decode(bytes_of(&fe)).unwrap();
            assert_eq!(ev.header().kind, kind as u32);
            match ev {
                Event::Accept(e) | Event::Close(e) => assert_eq!(e, fe),
                Event::State(_) => panic!("wrong kind"),
            }
        }
    }

    #[test]
    fn rejects_short_and_unknown() {
        let st = StateEvent {
            header: header(EventKind::State),
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 0,
            dport: 0,
            family: 2,
            oldstate: 1,
            newstate: 8,
            rx_queue: 27,
            _pad: 0,
        };
        let b = bytes_of(&st);
        assert!(matches!(
            decode(&b[..100]),
            Err(DecodeError::Short {
                what: "state event",
                ..
            })
        ));
        assert!(matches!(
            decode(&b[..10]),
            Err(DecodeError::Short { what: "header", .. })
        ));
        let mut h = header(EventKind::State);
        h.kind = 77;
        assert_eq!(decode(bytes_of(&h)), Err(DecodeError::UnknownKind(77)));
    }

    #[test]
    fn user_stacks_decode_only_as_records() {
        let mut w = UserStackEvent {
            header: header(EventKind::UserStack),
            sp_words: [0x401234; tracer_common::SP_WORDS],
            nframes: 2,
            end: tracer_common::walk_end::OUTERMOST,
            frames: [tracer_common::UserFrame::default(); tracer_common::MAX_USER_FRAMES],
        };
        w.frames[1] = tracer_common::UserFrame {
            pc: 0x7f00_0000_1000,
            method_slot: 0x8000_0010,
            bcp_slot: 0x8000_0080,
        };
        match decode_record(bytes_of(&w)) {
            Ok(Record::UserStack(got)) => assert_eq!(
                got,
                WalkedStack {
                    header: w.header,
                    sp_words: w.sp_words,
                    end: w.end,
                    frames: w.frames[..2].to_vec(),
                }
            ),
            other => panic!("expected a user stack, got {other:?}"),
        }
        // Only the valid frames need to be there.
        let valid = std::mem::offset_of!(UserStackEvent, frames) + 2 * std::mem::size_of::<UserFrame>();
        assert!(matches!(
            decode_record(&bytes_of(&w)[..valid]),
            Ok(Record::UserStack(_))
        ));
        assert!(matches!(
            decode_record(&bytes_of(&w)[..valid - 1]),
            Err(DecodeError::Short {
                what: "stack's frames",
                ..
            })
        ));
        assert_eq!(decode(bytes_of(&w)), Err(DecodeError::NotAnEvent));
        assert!(matches!(
            decode_record(&bytes_of(&w)[..100]),
            Err(DecodeError::Short { what: "user stack", .. })
        ));
        // Kernel stacks likewise: only the valid instruction pointers.
        let mut k = KernelStackEvent {
            header: header(EventKind::KernelStack),
            nframes: 3,
            _pad: 0,
            ips: [0; MAX_KERNEL_FRAMES],
        };
        k.ips[..3].copy_from_slice(&[0xffff_ffff_8100_0001, 0xffff_ffff_8100_0002, 0xffff_ffff_8100_0003]);
        let valid = std::mem::offset_of!(KernelStackEvent, ips) + 3 * 8;
        match decode_record(&bytes_of(&k)[..valid]) {
            Ok(Record::KernelStack(got)) => assert_eq!(
                got,
                KernelStack {
                    header: k.header,
                    ips: k.ips[..3].to_vec()
                }
            ),
            other => panic!("expected a kernel stack, got {other:?}"),
        }
        assert!(matches!(
            decode_record(&bytes_of(&k)[..valid - 1]),
            Err(DecodeError::Short { .. })
        ));
        assert_eq!(decode(bytes_of(&k)), Err(DecodeError::NotAnEvent));
        let st = match decode_record(bytes_of(&header(EventKind::Close))) {
            Err(DecodeError::Short { what, .. }) => what,
            other => panic!("expected a short close event, got {other:?}"),
        };
        assert_eq!(st, "close event");
    }
}
