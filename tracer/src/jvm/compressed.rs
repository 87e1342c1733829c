//! HotSpot's compressed streams (`CompressedReadStream`): the UNSIGNED5
//! integer coding used by debug-info scopes and by the line-number table,
//! and the line-number table itself.
//!
//! UNSIGNED5: a byte below L = 192 ends the number; each earlier byte adds
//! its value times 64^i (lg H = 6), at most 5 bytes. Signed values are
//! zigzag coded: `(v >> 1) ^ -(v & 1)`.

const L: u32 = 192;
const LG_H: u32 = 6;
const MAX_BYTES: usize = 5;

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    /// `read_int`: one UNSIGNED5 number; `None` past the end of the buffer.
    pub fn int(&mut self) -> Option<u32> {
        let mut sum: u32 = 0;
        for i in 0..MAX_BYTES {
            let b = u32::from(self.byte()?);
            sum = sum.wrapping_add(b.wrapping_shl(LG_H * i as u32));
            if b < L || i == MAX_BYTES - 1 {
                break;
            }
        }
        Some(sum)
    }

    /// `read_signed_int`.
    pub fn signed_int(&mut self) -> Option<i32> {
        let v = self.int()?;
        Some(((v >> 1) as i32) ^ -((v & 1) as i32))
    }
}

/// Line of `bci` from a compressed line-number table (what
/// `Method::line_number_from_bci` does): the exact entry, else the one with
/// the largest bci below it. Pairs are deltas from (bci 0, line 0): a byte
/// `b` (not 0, not 0xFF) adds `b >> 3` to bci and `b & 7` to line; 0xFF
/// is followed by two signed ints; 0 ends the table.
pub fn line_for_bci(table: &[u8], bci: i32) -> Option<u32> {
    let mut r = Reader::new(table);
    let (mut cur_bci, mut cur_line) = (0i32, 0i32);
    let (mut best_bci, mut best_line) = (0i32, None);
    // Each entry takes at least one byte, so the buffer bounds the loop.
    loop {
        match r.byte()? {
            0 => break,
            0xFF => {
                cur_bci = cur_bci.wrapping_add(r.signed_int()?);
                cur_line = cur_line.wrapping_add(r.signed_int()?);
            }
            b => {
                cur_bci = cur_bci.wrapping_add(i32::from(b >> 3));
                cur_line = cur_line.wrapping_add(i32::from(b & 7));
            }
        }
        if cur_bci == bci {
            return u32::try_from(cur_line).ok();
        }
        if cur_bci < bci && cur_bci >= best_bci {
            best_bci = cur_bci;
            best_line = Some(cur_line);
        }
    }
    best_line.and_then(|l| u32::try_from(l).ok())
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// The writer side (`CompressedWriteStream::write_int`), to build test
    /// streams; kept with the tests only.
    pub fn write_int(out: &mut Vec<u8>, mut v: u32) {
        for _ in 0..MAX_BYTES - 1 {
            if v < L {
                break;
            }
            out.push((L + (v - L) % 64) as u8);
            v = (v - L) >> LG_H;
        }
        out.push(v as u8);
    }

    pub fn write_signed_int(out: &mut Vec<u8>, v: i32) {
        write_int(out, ((v << 1) ^ (v >> 31)) as u32);
    }

    #[test]
    fn unsigned5_known_bytes() {
        // Single bytes below L stand for themselves.
        assert_eq!(Reader::new(&[0]).int(), Some(0));
        assert_eq!(Reader::new(&[191]).int(), Some(191));
        // 192 + 0*64 = 192; 200 + 3*64 = 392.
        assert_eq!(Reader::new(&[192, 0]).int(), Some(192));
        assert_eq!(Reader::new(&[200, 3]).int(), Some(392));
        // A high byte with nothing after it is truncated.
        assert_eq!(Reader::new(&[200]).int(), None);
        // Five bytes at most, even if the fifth is >= L.
        let mut r = Reader::new(&[255, 255, 255, 255, 255, 7]);
        let all = [0u32, 6, 12, 18, 24]
            .iter()
            .fold(0u32, |s, &sh| s.wrapping_add(255 << sh));
        assert_eq!(r.int(), Some(all));
        assert_eq!(r.byte(), Some(7));
    }

    #[test]
    fn unsigned5_and_zigzag_round_trip() {
        let values = [
            0u32,
            1,
            63,
            191,
            192,
            193,
            255,
            256,
            12_345,
            1 << 20,
            u32::MAX / 3,
            u32::MAX,
        ];
        let mut buf = Vec::new();
        for v in values {
            write_int(&mut buf, v);
        }
        let signed = [0i32, -1, 1, -2, 100, -100, i32::MAX, i32::MIN];
        for v in signed {
            write_signed_int(&mut buf, v);
        }
        let mut r = Reader::new(&buf);
        for v in values {
            assert_eq!(r.int(), Some(v));
        }
        for v in signed {
            assert_eq!(r.signed_int(), Some(v));
        }
        assert_eq!(r.int(), None);
        // Zigzag: 1 -> -1, 2 -> 1, 3 -> -2.
        assert_eq!(Reader::new(&[1, 2, 3]).signed_int(), Some(-1));
    }

    #[test]
    fn line_table_by_hand() {
        // (bci 0, line 10) escaped; (bci 4, line 11) = 4<<3|1; (bci 9, line 13) = 5<<3|2;
        // (bci 300, line 7) escaped (line goes back: a loop header).
        let mut t = vec![0xFF];
        write_signed_int(&mut t, 0);
        write_signed_int(&mut t, 10);
        t.push((4 << 3) | 1);
        t.push((5 << 3) | 2);
        t.push(0xFF);
        write_signed_int(&mut t, 291);
        write_signed_int(&mut t, -6);
        t.push(0);
        assert_eq!(line_for_bci(&t, 0), Some(10));
        assert_eq!(line_for_bci(&t, 3), Some(10));
        assert_eq!(line_for_bci(&t, 4), Some(11));
        assert_eq!(line_for_bci(&t, 8), Some(11));
        assert_eq!(line_for_bci(&t, 9), Some(13));
        assert_eq!(line_for_bci(&t, 299), Some(13));
        assert_eq!(line_for_bci(&t, 300), Some(7));
        assert_eq!(line_for_bci(&t, 5000), Some(7));
        // Empty table; table without the terminator (truncated read) is not trusted.
        assert_eq!(line_for_bci(&[0], 3), None);
        assert_eq!(line_for_bci(&t[..t.len() - 1], 5000), None);
    }
}
