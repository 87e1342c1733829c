//! Reading the target JVM's memory. Live reads go through `/proc/PID/mem`
//! (one `pread` each, no stopping of the process); tests replay memory that
//! was recorded from a real JVM, so the decoding runs on real bytes.
//!
//! Everything read is untrusted: the JVM runs concurrently and any pointer
//! may be stale, so callers bound every length and loop.

use std::{fs::File, io, os::unix::fs::FileExt as _};

/// A source of target memory.
pub trait Memory {
    /// Fills `buf` from `addr`, or fails: a short read is an error.
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// The live process, through `/proc/PID/mem`.
pub struct ProcMem {
    file: File,
}

impl ProcMem {
    pub fn open(pid: u32) -> io::Result<Self> {
        Ok(ProcMem {
            file: File::open(format!("/proc/{pid}/mem"))?,
        })
    }
}

impl Memory for ProcMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, addr)
    }
}

const PAGE: u64 = 4096;

/// Typed reads on top of [`Memory`].
pub trait MemoryExt: Memory {
    fn bytes(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0; len];
        self.read(addr, &mut v)?;
        Ok(v)
    }
    fn u8(&self, addr: u64) -> io::Result<u8> {
        let mut b = [0; 1];
        self.read(addr, &mut b)?;
        Ok(b[0])
    }
    fn u16(&self, addr: u64) -> io::Result<u16> {
        let mut b = [0; 2];
        self.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    fn i32(&self, addr: u64) -> io::Result<i32> {
        let mut b = [0; 4];
        self.read(addr, &mut b)?;
        Ok(i32::from_le_bytes(b))
    }
    fn u64(&self, addr: u64) -> io::Result<u64> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// A NUL-terminated string of at most `max` bytes. Reads page by page
    /// so a string that ends just before an unmapped page still reads.
    fn cstr(&self, addr: u64, max: usize) -> io::Result<String> {
        let mut out = Vec::new();
        let mut at = addr;
        while out.len() < max {
            let to_page_end = (PAGE - at % PAGE) as usize;
            // Small chunks keep recorded fixtures small; most names are short.
            let n = to_page_end.min(64).min(max - out.len());
            let chunk = self.bytes(at, n)?;
            if let Some(end) = chunk.iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..end]);
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&chunk);
            at = at.wrapping_add(n as u64);
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("string at {addr:#x} is not terminated within {max} bytes"),
        ))
    }
}

impl<M: Memory + ?Sized> MemoryExt for M {}

#[cfg(test)]
pub use recorded::{Recorder, Replay};

#[cfg(test)]
mod recorded {
    //! Capture and replay of target memory for fixtures. The file format is
    //! `JVMMEM1\n` then records of (u64 address, u32 length, bytes), little
    //! endian, sorted and coalesced.

    use std::{
        collections::BTreeMap,
        io,
        sync::{Arc, Mutex},
    };

    use super::Memory;

    const MAGIC: &[u8] = b"JVMMEM1\n";

    type Log = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    /// Wraps a memory and logs every successful read.
    pub struct Recorder<M> {
        inner: M,
        log: Log,
    }

    /// The reads a [`Recorder`] logged; kept by the caller while the
    /// recorder itself is owned by a `Jvm`.
    #[derive(Clone)]
    pub struct RecordLog(Log);

    impl<M: Memory> Recorder<M> {
        pub fn new(inner: M) -> (Self, RecordLog) {
            let log = Log::default();
            (
                Recorder {
                    inner,
                    log: log.clone(),
                },
                RecordLog(log),
            )
        }
    }

    impl RecordLog {
        /// The recorded regions, coalesced, in the fixture format.
        pub fn serialize(&self) -> Vec<u8> {
            let mut regions: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let log = self.0.lock().unwrap_or_else(|e| e.into_inner());
            for (addr, bytes) in log.iter() {
                insert(&mut regions, *addr, bytes);
            }
            let mut out = MAGIC.to_vec();
            for (addr, bytes) in regions {
                out.extend_from_slice(&addr.to_le_bytes());
                out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(&bytes);
            }
            out
        }
    }

    /// Adds a read to the region map, merging it with every region it
    /// overlaps or touches (the first bytes read win where they overlap).
    fn insert(regions: &mut BTreeMap<u64, Vec<u8>>, addr: u64, bytes: &[u8]) {
        let mut start = addr;
        let mut merged = bytes.to_vec();
        let end = addr + bytes.len() as u64;
        let touching: Vec<u64> = regions
            .range(..=end)
            .filter(|(s, b)| **s + b.len() as u64 >= addr)
            .map(|(s, _)| *s)
            .collect();
        for s in touching {
            let old = regions.remove(&s).unwrap_or_default();
            let new_start = start.min(s);
            let new_end = (start + merged.len() as u64).max(s + old.len() as u64);
            let mut buf = vec![0; (new_end - new_start) as usize];
            let at = (start - new_start) as usize;
            buf[at..at + merged.len()].copy_from_slice(&merged);
            let at = (s - new_start) as usize;
            buf[at..at + old.len()].copy_from_slice(&old);
            start = new_start;
            merged = buf;
        }
        regions.insert(start, merged);
    }

    impl<M: Memory> Memory for Recorder<M> {
        fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
            self.inner.read(addr, buf)?;
            let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            log.push((addr, buf.to_vec()));
            Ok(())
        }
    }

    /// Memory recorded earlier; reads outside it fail like unmapped memory.
    pub struct Replay {
        regions: BTreeMap<u64, Vec<u8>>,
    }

    impl Replay {
        pub fn parse(data: &[u8]) -> io::Result<Self> {
            let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
            let mut rest = data.strip_prefix(MAGIC).ok_or_else(|| bad("not a JVMMEM1 file"))?;
            let mut regions = BTreeMap::new();
            while !rest.is_empty() {
                if rest.len() < 12 {
                    return Err(bad("truncated record header"));
                }
                let addr = u64::from_le_bytes(rest[..8].try_into().map_err(|_| bad("header"))?);
                let len = u32::from_le_bytes(rest[8..12].try_into().map_err(|_| bad("header"))?) as usize;
                let body = rest.get(12..12 + len).ok_or_else(|| bad("truncated record"))?;
                regions.insert(addr, body.to_vec());
                rest = &rest[12 + len..];
            }
            Ok(Replay { regions })
        }
    }

    impl Memory for Replay {
        fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
            let hit = self.regions.range(..=addr).next_back();
            if let Some((start, bytes)) = hit {
                let off = (addr - start) as usize;
                if let Some(src) = bytes.get(off..off + buf.len()) {
                    buf.copy_from_slice(src);
                    return Ok(());
                }
            }
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} bytes at {addr:#x} were not recorded", buf.len()),
            ))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::jvm::memory::MemoryExt as _;

        #[test]
        fn coalesces_and_replays_reads() {
            let mut regions = BTreeMap::new();
            insert(&mut regions, 100, &[1, 2, 3]);
            insert(&mut regions, 103, &[4]);
            insert(&mut regions, 98, &[9, 9, 1]);
            insert(&mut regions, 200, &[7]);
            assert_eq!(regions.len(), 2);
            assert_eq!(regions[&98], vec![9, 9, 1, 2, 3, 4]);
            let mut out = MAGIC.to_vec();
            for (a, b) in &regions {
                out.extend_from_slice(&a.to_le_bytes());
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
            let r = Replay::parse(&out).unwrap();
            assert_eq!(r.bytes(99, 4).unwrap(), vec![9, 1, 2, 3]);
            assert!(r.bytes(102, 3).is_err());
            assert_eq!(r.u8(200).unwrap(), 7);
            assert!(Replay::parse(b"nope").is_err());
        }
    }
}
