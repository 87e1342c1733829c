//! Writes a recording (format version 2): records gathered into blocks,
//! each compressed and written whole, at least on every agent tick (so a
//! SIGKILL loses at most one tick), bounded by `--max-size`, and with
//! `--rotate N` continued in numbered files of which the last N are kept.
//! Files are what `record` writes; tests write the same bytes to memory.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    block::BlockWriter,
    codec,
    format::{self, Kind, BLOCK_HEADER},
};
use crate::{
    input::{EndInput, Input, StatsInput},
    kernel::KernelStats,
};

/// The file header: enough to interpret the records on another machine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Header {
    pub tracer_version: String,
    pub hostname: String,
    pub kernel_release: String,
    /// Add to a kernel timestamp (CLOCK_MONOTONIC ns) to get Unix-epoch ns.
    pub boot_to_wall_offset_ns: i64,
    pub started_at: String,
    pub options: HeaderOptions,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeaderOptions {
    pub pid: Option<u32>,
    pub leak_after_ms: u64,
    pub max_size: Option<u64>,
}

/// Room kept under `--max-size` for the final Stats and End records (and
/// a rotated file's End).
const RESERVE: u64 = 1024;

/// The name of segment `index` of a rotated recording `path`:
/// `path.000000`, `path.000001`, ... Six digits at least, so that the
/// names sort in sequence (`tracer report path.*`) up to a million files.
pub fn segment_path(path: &Path, index: u64) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(format!(".{index:06}"));
    PathBuf::from(s)
}

/// Whether `name` is a segment name of the recording named `base`.
fn is_segment_name(name: &str, base: &str) -> bool {
    name.strip_prefix(base)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|digits| digits.len() >= 6 && digits.bytes().all(|b| b.is_ascii_digit()))
}

pub struct Recorder<W: Write = File> {
    /// None only once taken back by `into_inner`.
    out: Option<W>,
    block: BlockWriter,
    /// A sealed block on its way to `out`.
    sealed: Vec<u8>,
    /// Records staged by `write`: their kinds and ends in `staged`.
    staged: Vec<u8>,
    staged_items: Vec<(Kind, usize)>,
    /// Bytes written to every file of the recording so far.
    pub written: u64,
    /// Bytes in the current file.
    file_written: u64,
    /// Whether the current file holds more than its prefix (its header and
    /// a rotated file's carried names and stacks).
    has_content: bool,
    max_size: Option<u64>,
    /// Sockets per snapshot record.
    snapshot_part: usize,
    /// A block ends once its records pass this size.
    block_target: usize,
    header: Header,
    /// The latest time seen in an input.
    last_ns: u64,
    segments: Option<Segments<W>>,
}

/// A rotated recording: how to open and remove its files, and what each
/// new file repeats so that it stands alone.
struct Segments<W> {
    index: u64,
    keep: u64,
    open: Box<dyn FnMut(u64) -> io::Result<W>>,
    remove: Box<dyn FnMut(u64)>,
    /// Names and stacks not forgotten, as recorded: a file repeats them
    /// first, so a socket of an earlier (maybe removed) file keeps them.
    names: BTreeMap<u32, Vec<u8>>,
    stacks: BTreeMap<(u32, i32), Vec<u8>>,
    /// Kernel counters when this file started (the last written in the
    /// file before): each recording counts from zero, so a file's counters
    /// are written relative to them, and `report` of the files summed
    /// gives the totals.
    base: KernelStats,
    /// The last counters written.
    last_stats: KernelStats,
}

pub enum Written {
    Ok,
    /// The next record would pass `--max-size`: nothing more is written.
    Full,
}

impl Recorder<File> {
    /// A recording to `path`; with `rotate` (`--rotate N`), to its
    /// segments `path.000000`, ... of which the last N are kept.
    pub fn create(path: &Path, header: &Header, rotate: Option<u32>) -> Result<Self> {
        let Some(keep) = rotate else {
            let file = create_file(path)?;
            return Recorder::new(file, header).with_context(|| format!("cannot write {}", path.display()));
        };
        anyhow::ensure!(
            header.options.max_size.is_some() && keep > 0,
            "--rotate needs --max-size and at least one file"
        );
        remove_stale_segments(path)?;
        eprintln!(
            "tracer: --rotate {keep}: the recording goes to {}, {}, ... (the last {keep} kept)",
            segment_path(path, 0).display(),
            segment_path(path, 1).display()
        );
        let base = path.to_path_buf();
        let open = move |index| {
            let p = segment_path(&base, index);
            create_file(&p).map_err(|e| io::Error::other(format!("{e:#}")))
        };
        let base = path.to_path_buf();
        let remove = move |index| {
            let p = segment_path(&base, index);
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("cannot remove {}, an old file of the recording: {e}", p.display());
                }
            }
        };
        Recorder::rotating(header, keep, Box::new(open), Box::new(remove))
            .with_context(|| format!("cannot write {}", segment_path(path, 0).display()))
    }
}

/// Creates (or truncates) `path`, mode 0600.
fn create_file(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        // It holds command lines and addresses.
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    // `mode` applies only to new files; an existing one is tightened too.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict permissions of {}", path.display()))?;
    Ok(file)
}

/// Removes the files of an earlier rotated recording to `path`, as
/// recording without rotation overwrites `path`: `report path.*` must not
/// read them with the new ones.
fn remove_stale_segments(path: &Path) -> Result<()> {
    let Some(base) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // Creating the first file says what is wrong with the directory.
        Err(_) => return Ok(()),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_segment_name(name, base) && entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(entry.path()).with_context(|| {
                format!(
                    "cannot remove {}, a file of an earlier recording",
                    entry.path().display()
                )
            })?;
        }
    }
    Ok(())
}

impl<W: Write> Recorder<W> {
    /// Writes the file header to `out`; records follow with [`Self::write`].
    pub fn new(out: W, header: &Header) -> io::Result<Self> {
        let mut r = Recorder::empty(header)?;
        r.start_file(out, None)?;
        Ok(r)
    }

    /// A recording in files of `header.options.max_size` bytes, of which the
    /// last `keep` are kept: file `i` is written to `open(i)`, and
    /// `remove(i)` is called when it is no longer kept.
    pub fn rotating(
        header: &Header,
        keep: u32,
        mut open: Box<dyn FnMut(u64) -> io::Result<W>>,
        remove: Box<dyn FnMut(u64)>,
    ) -> io::Result<Self> {
        let mut r = Recorder::empty(header)?;
        let first = open(0)?;
        r.segments = Some(Segments {
            index: 0,
            keep: u64::from(keep.max(1)),
            open,
            remove,
            names: BTreeMap::new(),
            stacks: BTreeMap::new(),
            base: KernelStats::default(),
            last_stats: KernelStats::default(),
        });
        r.start_file(first, Some(0))?;
        Ok(r)
    }

    /// The file written now: `segment_path(path, index)` when rotating.
    pub fn current_segment(&self) -> Option<u64> {
        self.segments.as_ref().map(|s| s.index)
    }

    fn empty(header: &Header) -> io::Result<Self> {
        Ok(Recorder {
            out: None,
            block: BlockWriter::new()?,
            sealed: Vec::new(),
            staged: Vec::with_capacity(256),
            staged_items: Vec::with_capacity(4),
            written: 0,
            file_written: 0,
            has_content: false,
            max_size: header.options.max_size,
            snapshot_part: codec::SNAPSHOT_PART,
            block_target: format::BLOCK_TARGET,
            header: header.clone(),
            last_ns: 0,
            segments: None,
        })
    }

    /// Starts a file: its header, which says which segment it is of a
    /// rotated recording.
    fn start_file(&mut self, mut out: W, segment: Option<u64>) -> io::Result<()> {
        let mut json = serde_json::to_value(&self.header)?;
        if let (Some(index), Some(s), Some(obj)) = (segment, &self.segments, json.as_object_mut()) {
            obj.insert("segment".into(), serde_json::json!({"index": index, "rotate": s.keep}));
        }
        let prefix = format::encode_file_header(format::VERSION, &serde_json::to_vec(&json)?);
        out.write_all(&prefix)?;
        self.out = Some(out);
        self.written += prefix.len() as u64;
        self.file_written = prefix.len() as u64;
        self.has_content = false;
        Ok(())
    }

    /// Snapshot records of `n` sockets instead of [`codec::SNAPSHOT_PART`]
    /// (tests: many parts from a small snapshot).
    #[cfg(test)]
    pub fn with_snapshot_part(mut self, n: usize) -> Self {
        self.snapshot_part = n;
        self
    }

    /// Blocks that end once their records pass `n` bytes instead of
    /// [`format::BLOCK_TARGET`] (tests: 1 puts every record in a block of
    /// its own).
    #[cfg(test)]
    pub fn with_block_target(mut self, n: usize) -> Self {
        self.block_target = n;
        self
    }

    /// The bytes written, flushed (tests).
    #[cfg(test)]
    pub fn into_inner(mut self) -> W {
        self.flush().expect("in memory");
        self.out.take().expect("present")
    }

    fn out(&mut self) -> &mut W {
        self.out.as_mut().expect("present until into_inner")
    }

    pub fn write(&mut self, input: &Input) -> io::Result<Written> {
        self.note(input);
        self.stage(input);
        if let Some(max) = self.max_size {
            // Room is kept for the End record, and without rotation for the
            // final counters (the agent writes nothing else once full).
            let exempt = match input {
                Input::End(_) => true,
                Input::Stats(_) => self.segments.is_none(),
                _ => false,
            };
            if !exempt && self.over(max) {
                // The size of what is gathered is known once compressed.
                self.seal()?;
                if self.over(max) {
                    match &self.segments {
                        Some(_) if self.has_content => {
                            self.rotate()?;
                            // Counters are written relative to the new file.
                            self.stage(input);
                        }
                        // A file of its prefix alone takes the record.
                        Some(_) => {}
                        None => return Ok(Written::Full),
                    }
                }
            }
        }
        let mut start = 0;
        for i in 0..self.staged_items.len() {
            let (kind, end) = self.staged_items[i];
            self.block.push(kind, &self.staged[start..end]);
            start = end;
            // Within an input too: a snapshot's parts make many blocks.
            if self.block.raw_len() >= self.block_target {
                self.seal()?;
            }
        }
        self.has_content = true;
        if let (Input::Stats(st), Some(s)) = (input, self.segments.as_mut()) {
            s.last_stats = st.kernel;
        }
        Ok(Written::Ok)
    }

    /// Whether the staged records may not fit under `max`: at most their
    /// size (and framing) plus what is gathered, uncompressed.
    fn over(&self, max: u64) -> bool {
        let staged = (self.staged.len() + 16 * self.staged_items.len() + BLOCK_HEADER) as u64;
        self.file_written + self.block.raw_len() as u64 + staged + RESERVE > max
    }

    /// Keeps what a rotated file repeats, and the latest time.
    fn note(&mut self, input: &Input) {
        let ns = match input {
            Input::Kernel(ev) => Some(ev.header().ktime_ns),
            Input::Snapshot(s) => Some(s.ns),
            Input::Evidence(e) => Some(e.ns),
            Input::Tick(ns) => Some(*ns),
            Input::Stats(s) => Some(s.ns),
            Input::ProcessExit(e) => Some(e.ns),
            Input::End(e) => Some(e.ns),
            Input::Forget(f) => Some(f.ns),
            Input::Process(_) | Input::Stack(_) => None,
        };
        if let Some(ns) = ns {
            self.last_ns = self.last_ns.max(ns);
        }
        let Some(s) = self.segments.as_mut() else { return };
        match input {
            Input::Process(p) => {
                s.names.insert(p.pid, serde_json::to_vec(p).expect("serializes"));
            }
            Input::Stack(st) => {
                s.stacks
                    .insert((st.key.pid, st.key.id), serde_json::to_vec(st).expect("serializes"));
            }
            Input::Forget(f) => {
                for pid in &f.pids {
                    s.names.remove(pid);
                }
                for k in &f.stacks {
                    s.stacks.remove(&(k.pid, k.id));
                }
            }
            _ => {}
        }
    }

    /// Encodes `input`'s records into `staged`; a rotated file's counters
    /// relative to its start.
    fn stage(&mut self, input: &Input) {
        self.staged.clear();
        self.staged_items.clear();
        let rebased;
        let input = match (input, &self.segments) {
            (Input::Stats(st), Some(s)) if s.index > 0 => {
                rebased = Input::Stats(StatsInput {
                    ns: st.ns,
                    kernel: since(&st.kernel, &s.base),
                });
                &rebased
            }
            _ => input,
        };
        let (staged, items) = (&mut self.staged, &mut self.staged_items);
        codec::payloads(input, self.snapshot_part, |kind, payload| {
            staged.extend_from_slice(payload);
            items.push((kind, staged.len()));
        });
    }

    /// Ends this file (an End record, reason "rotated") and goes on in the
    /// next, which first repeats the names and stacks still known; the
    /// oldest file beyond the kept number is removed.
    fn rotate(&mut self) -> io::Result<()> {
        let end = Input::End(EndInput {
            ns: self.last_ns,
            reason: "rotated".into(),
        });
        let mut payload = Vec::new();
        codec::payloads(&end, 1, |_, p| payload = p.to_vec());
        self.block.push(Kind::End, &payload);
        self.flush()?;
        let s = self.segments.as_mut().expect("rotating");
        s.index += 1;
        s.base = s.last_stats;
        let index = s.index;
        let next = (s.open)(index)?;
        self.start_file(next, Some(index))?;
        let s = self.segments.as_mut().expect("rotating");
        for p in s.names.values() {
            self.block.push(Kind::Process, p);
        }
        for st in s.stacks.values() {
            self.block.push(Kind::Stack, st);
        }
        if index >= s.keep {
            (s.remove)(index - s.keep);
        }
        Ok(())
    }

    /// Compresses and writes what is gathered, as one block.
    fn seal(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        self.sealed.clear();
        self.block.seal(&mut self.sealed)?;
        let mut sealed = std::mem::take(&mut self.sealed);
        let r = self.out().write_all(&sealed);
        let n = sealed.len() as u64;
        sealed.clear();
        self.sealed = sealed;
        r?;
        self.written += n;
        self.file_written += n;
        Ok(())
    }

    /// Writes what is gathered (a block) and flushes it to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        self.seal()?;
        self.out().flush()
    }
}

impl<W: Write> Drop for Recorder<W> {
    /// What is gathered is written, as a flushed buffer would be.
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = self.flush();
        }
    }
}

/// Each counter of `now` less its value in `base` (counters only grow;
/// one that went down counts from zero).
fn since(now: &KernelStats, base: &KernelStats) -> KernelStats {
    let (Ok(serde_json::Value::Object(mut out)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(now), serde_json::to_value(base))
    else {
        return *now;
    };
    for (name, v) in out.iter_mut() {
        if let (Some(x), Some(y)) = (v.as_u64(), b.get(name).and_then(serde_json::Value::as_u64)) {
            *v = (x.saturating_sub(y)).into();
        }
    }
    serde_json::from_value(serde_json::Value::Object(out)).unwrap_or(*now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_sort_in_sequence() {
        let p = Path::new("/tmp/rec.trc");
        assert_eq!(segment_path(p, 0), Path::new("/tmp/rec.trc.000000"));
        assert_eq!(segment_path(p, 42), Path::new("/tmp/rec.trc.000042"));
        let mut names: Vec<String> = [3, 10, 999_999, 0, 100]
            .iter()
            .map(|&i| segment_path(p, i).display().to_string())
            .collect();
        let by_name = {
            let mut n = names.clone();
            n.sort();
            n
        };
        names.sort_by_key(|n| n.rsplit('.').next().unwrap().parse::<u64>().unwrap());
        assert_eq!(names, by_name);
        assert!(is_segment_name("rec.trc.000007", "rec.trc"));
        assert!(is_segment_name("rec.trc.1234567", "rec.trc"));
        assert!(!is_segment_name("rec.trc.7", "rec.trc"));
        assert!(!is_segment_name("rec.trc", "rec.trc"));
        assert!(!is_segment_name("rec.trc.00000x", "rec.trc"));
        assert!(!is_segment_name("other.000001", "rec.trc"));
    }
}
