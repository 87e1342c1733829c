//! Reading recordings back into analysis inputs, and `tracer report`:
//! the same engine and sinks as `tracer live`, fed from files.
//!
//! Inputs are streamed: each record is decoded and fed to the engine
//! before the next is read, so memory follows what the analysis keeps
//! (sockets, names, stacks), never the size of the files.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    fs::File,
    io::{self, IsTerminal, Read},
    path::PathBuf,
};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::{
    cli::ReportArgs,
    clock::WallClock,
    correlate::Correlator,
    engine::Engine,
    input::{Input, StackKey},
    kernel::KernelStats,
    record::{
        codec::{self, SnapshotPart},
        reader::{Damage, Item, Reader},
        writer::Header,
    },
    sink::{self, RecordingInfo, Sink, Start},
};

/// Most inputs read ahead, before the analysis starts, to find how many
/// sockets the start-up snapshot holds (only process names precede it).
const READ_AHEAD: usize = 65536;

/// Recordings opened, their headers checked, ready to be read in order.
pub struct Replay<R = File> {
    /// The first file's header: its clock and options apply.
    pub header: Header,
    files: Vec<Reader<R>>,
}

impl Replay<File> {
    /// Opens every file first, so that a bad one fails before any output.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let readers = paths.iter().map(|p| Reader::open(p)).collect::<Result<Vec<_>>>()?;
        Replay::from_readers(readers)
    }
}

impl<R: Read> Replay<R> {
    pub fn from_readers(files: Vec<Reader<R>>) -> Result<Self> {
        let mut header = None;
        for r in &files {
            let h: Header = serde_json::from_value(r.header.clone())
                .with_context(|| format!("{}: the header is not a tracer recording header", r.path))?;
            header.get_or_insert(h);
        }
        Ok(Replay {
            header: header.context("no recording given")?,
            files,
        })
    }

    /// The inputs of every file, in order. With `warn`, damage is printed
    /// on stderr (one line each) as it is found; it is in
    /// [`Inputs::finish`]'s info either way.
    pub fn inputs(self, warn: bool) -> Inputs<R> {
        Inputs {
            files: self.files.into_iter(),
            file: None,
            info: RecordingInfo::default(),
            end_reason: None,
            warn,
            progress: warn && io::stderr().is_terminal(),
            counters_done: KernelStats::default(),
            first_snapshot: None,
            stack_ids: StackRenumbering::default(),
        }
    }
}

/// The leak threshold a recording was made with, in ns (saturating: the
/// header is data from a file).
pub fn leak_after_ns(header: &Header) -> u64 {
    header.options.leak_after_ms.saturating_mul(1_000_000)
}

/// A stream of inputs over the files of a [`Replay`].
pub struct Inputs<R> {
    files: std::vec::IntoIter<Reader<R>>,
    file: Option<FileRead<R>>,
    info: RecordingInfo,
    end_reason: Option<String>,
    warn: bool,
    progress: bool,
    /// Kernel counters of the files read so far, summed.
    counters_done: KernelStats,
    /// Sockets in the first start-up snapshot.
    first_snapshot: Option<u64>,
    stack_ids: StackRenumbering,
}

/// Stack ids restart in each recording, so the same id in two files is
/// two stacks (kernel stacks, pid 0, always collide). Ids are renumbered
/// per file, so that a leak still open from an earlier file keeps its own
/// stack. Forgotten ids (`forget` records) leave the table: it stays as
/// bounded as the agent's.
#[derive(Default)]
struct StackRenumbering {
    file: u32,
    ids: HashMap<(u32, i32), i32>,
    next: i32,
}

impl StackRenumbering {
    /// Error codes (negative) are not ids.
    fn id(&mut self, id: i32) -> i32 {
        if id < 0 {
            return id;
        }
        let next = &mut self.next;
        *self.ids.entry((self.file, id)).or_insert_with(|| {
            *next = if *next == i32::MAX { 0 } else { *next + 1 };
            *next
        })
    }

    fn forget(&mut self, id: i32) -> Option<i32> {
        self.ids.remove(&(self.file, id))
    }

    fn renumber(&mut self, input: Input) -> Input {
        match input {
            Input::Kernel(mut ev) => {
                let h = ev.header_mut();
                h.ustack = self.id(h.ustack);
                h.kstack = self.id(h.kstack);
                Input::Kernel(ev)
            }
            Input::Stack(mut s) => {
                s.key.id = self.id(s.key.id);
                Input::Stack(s)
            }
            Input::Forget(mut f) => {
                f.stacks = f
                    .stacks
                    .into_iter()
                    .filter_map(|k| self.forget(k.id).map(|id| StackKey { pid: k.pid, id }))
                    .collect();
                Input::Forget(f)
            }
            other => other,
        }
    }
}

/// The file being read.
struct FileRead<R> {
    reader: Reader<R>,
    records: u64,
    /// Offset of the (first) End record, once read.
    ended_at: Option<u64>,
    /// A record after the End record was reported.
    after_end_said: bool,
    /// The file is cut short (and already said so).
    truncated: bool,
    /// Each kernel counter's highest value in this file. Every recording
    /// counts from zero, so files are summed, never subtracted; and a
    /// counter never goes down, even in a damaged or crafted file.
    counters: KernelStats,
    snapshot: Option<SnapshotParts>,
}

/// The parts of the start-up snapshot seen in one file.
struct SnapshotParts {
    ns: u64,
    parts: u32,
    seen: BTreeSet<u32>,
}

impl<R: Read> Inputs<R> {
    /// The next input; None after the last file. Errors are I/O errors
    /// only: damage is reported and read past.
    pub fn next(&mut self) -> Result<Option<Input>> {
        loop {
            let Some(f) = self.file.as_mut() else {
                match self.files.next() {
                    Some(reader) => self.start_file(reader),
                    None => return Ok(None),
                }
                continue;
            };
            let item = f.reader.next().with_context(|| format!("reading {}", f.reader.path))?;
            let rec = match item {
                None => {
                    self.end_file();
                    continue;
                }
                Some(Item::Damage(d)) => {
                    let path = &f.reader.path;
                    let msg = match d {
                        Damage::Corrupt { offset, skipped } => format!(
                            "{path}: corrupt data at byte {offset}; skipped {skipped} bytes to the next valid record"
                        ),
                        Damage::Truncated { offset } => {
                            f.truncated = true;
                            format!(
                                "{path}: the recording ends early at byte {offset} (cut short: the tracer was killed or the disk filled)"
                            )
                        }
                    };
                    say(&mut self.info, self.warn, msg);
                    continue;
                }
                Some(Item::Record(rec)) => rec,
            };
            self.info.records += 1;
            f.records += 1;
            if let (Some(end), false) = (f.ended_at, f.after_end_said) {
                // Once per file; what follows is read anyway.
                f.after_end_said = true;
                let msg = format!(
                    "{}: record at byte {} follows the end record at byte {end} (records repeated, or files joined); read anyway",
                    f.reader.path, rec.offset
                );
                say(&mut self.info, self.warn, msg);
            }
            let Some(kind) = rec.kind else {
                // A kind from a newer writer of the same format version.
                continue;
            };
            let (input, part) = match codec::decode(kind, &rec.payload) {
                Ok(decoded) => decoded,
                Err(e) => {
                    let msg = format!("{}: record at byte {}: {e}; skipped", f.reader.path, rec.offset);
                    say(&mut self.info, self.warn, msg);
                    continue;
                }
            };
            let input = match input {
                Input::End(e) => {
                    f.ended_at.get_or_insert(rec.offset);
                    self.end_reason = Some(e.reason.clone());
                    Input::End(e)
                }
                Input::Stats(mut s) => {
                    f.counters = combine(&f.counters, &s.kernel, u64::max);
                    s.kernel = combine(&self.counters_done, &f.counters, u64::saturating_add);
                    Input::Stats(s)
                }
                Input::Snapshot(s) => {
                    let Some(p) = part else { continue };
                    if let Err(problem) = f.snapshot_part(p) {
                        let msg = format!(
                            "{}: snapshot record at byte {} {problem}; skipped",
                            f.reader.path, rec.offset
                        );
                        say(&mut self.info, self.warn, msg);
                        continue;
                    }
                    self.first_snapshot.get_or_insert(p.total);
                    Input::Snapshot(s)
                }
                other => self.stack_ids.renumber(other),
            };
            return Ok(Some(input));
        }
    }

    /// Sockets in the first start-up snapshot read so far.
    pub fn first_snapshot_sockets(&self) -> Option<u64> {
        self.first_snapshot
    }

    /// What was read: files, records, damage; and why the recording
    /// ended, from its (last) End record.
    pub fn finish(self) -> (RecordingInfo, Option<String>) {
        (self.info, self.end_reason)
    }

    fn start_file(&mut self, reader: Reader<R>) {
        if self.progress && reader.size.is_some_and(|s| s > 16 << 20) {
            eprintln!(
                "tracer: reading {} ({:.0} MiB)...",
                reader.path,
                reader.size.unwrap_or(0) as f64 / 1048576.0
            );
        }
        self.info.files.push(reader.path.clone());
        self.stack_ids.file += 1;
        self.file = Some(FileRead {
            reader,
            records: 0,
            ended_at: None,
            after_end_said: false,
            truncated: false,
            counters: KernelStats::default(),
            snapshot: None,
        });
    }

    fn end_file(&mut self) {
        let Some(f) = self.file.take() else { return };
        let path = &f.reader.path;
        if let Some(s) = &f.snapshot {
            let missing = u64::from(s.parts).saturating_sub(s.seen.len() as u64);
            if missing > 0 {
                self.damage(format!(
                    "{path}: {missing} of the {} parts of the start-up snapshot are missing: the sockets in them are unknown to the analysis",
                    s.parts
                ));
            }
        }
        if f.ended_at.is_none() {
            self.info.ended_early = true;
            if !f.truncated {
                self.damage(format!(
                    "{path}: the recording ends early after {} records (no clean end: the tracer was killed)",
                    f.records
                ));
            }
        }
        self.counters_done = combine(&self.counters_done, &f.counters, u64::saturating_add);
    }

    fn damage(&mut self, msg: String) {
        say(&mut self.info, self.warn, msg);
    }
}

/// Damage goes in the summary, and (with `warn`) on stderr as it is found.
fn say(info: &mut RecordingInfo, warn: bool, msg: String) {
    if warn {
        eprintln!("tracer: warning: {msg}");
    }
    info.damage.push(msg);
}

impl<R> FileRead<R> {
    /// Checks a snapshot part against the ones seen in this file: Ok to
    /// feed it, or what is wrong with it.
    fn snapshot_part(&mut self, p: SnapshotPart) -> Result<(), &'static str> {
        let s = self.snapshot.get_or_insert_with(|| SnapshotParts {
            ns: p.ns,
            parts: p.parts,
            seen: BTreeSet::new(),
        });
        if (s.ns, s.parts) != (p.ns, p.parts) {
            Err("is not part of the file's start-up snapshot")
        } else if !s.seen.insert(p.part) {
            Err("repeats a part of the start-up snapshot")
        } else {
            Ok(())
        }
    }
}

/// `a` and `b` combined counter by counter. Through JSON, so that every
/// counter KernelStats has, or gains later, is summed the same way.
fn combine(a: &KernelStats, b: &KernelStats, op: fn(u64, u64) -> u64) -> KernelStats {
    let (Ok(Value::Object(mut out)), Ok(Value::Object(b_fields))) = (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return *a;
    };
    for (name, v) in out.iter_mut() {
        if let (Some(x), Some(y)) = (v.as_u64(), b_fields.get(name).and_then(Value::as_u64)) {
            *v = Value::from(op(x, y));
        }
    }
    serde_json::from_value(Value::Object(out)).unwrap_or(*a)
}

/// Runs recordings through the engine into `sink`; returns the summary.
/// Errors: reading a file, or writing to `sink` ("writing output").
pub fn analyse<R: Read>(
    replay: Replay<R>,
    pid: Option<u32>,
    leak_after_ns: u64,
    events: bool,
    warn: bool,
    sink: &mut dyn Sink,
) -> Result<sink::Summary> {
    let out = |e: io::Error| anyhow::Error::new(e).context("writing output");
    let wall = WallClock::from_offset(replay.header.boot_to_wall_offset_ns);
    let filter_pid = pid.or(replay.header.options.pid);
    let mut engine = Engine::new(Correlator::new(leak_after_ns, pid, usize::MAX), wall, events);
    let mut inputs = replay.inputs(warn);
    // The start line says how many sockets predate the recording: read up
    // to the snapshot (process names come before it), no further.
    let mut ahead = VecDeque::new();
    while ahead.len() < READ_AHEAD {
        let Some(input) = inputs.next()? else { break };
        let names = matches!(input, Input::Process(_));
        ahead.push_back(input);
        if !names {
            break;
        }
    }
    sink.start(&Start {
        hooks: Vec::new(),
        filter_pid,
        leak_after_ms: leak_after_ns / 1_000_000,
        preexisting_sockets: inputs
            .first_snapshot_sockets()
            .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX)),
        kernel: None,
        snapshot_error: None,
        fallbacks: Vec::new(),
    })
    .map_err(out)?;
    for input in ahead {
        engine.feed(&input, sink).map_err(out)?;
    }
    while let Some(input) = inputs.next()? {
        engine.feed(&input, sink).map_err(out)?;
    }
    let (info, end_reason) = inputs.finish();
    let reason = match end_reason.as_deref() {
        Some("duration") => "duration",
        Some("signal") => "signal",
        Some("process_exit") => "process_exit",
        Some("max_size") => "max_size",
        // The last file read was rotated: the recording goes on in a file
        // not given (or no longer kept).
        Some("rotated") => "rotated",
        _ => "recording_ends_early",
    };
    let mut summary = engine.summary(reason, 0, sink).map_err(out)?;
    summary.recording = Some(info);
    Ok(summary)
}

/// Whether `e` is stdout closed by its reader (`report | head`): not an
/// error.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

pub fn report(args: &ReportArgs) -> Result<()> {
    let replay = Replay::open(&args.files)?;
    let leak_after_ns = match args.leak_after {
        Some(d) => u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        None => leak_after_ns(&replay.header),
    };
    let stdout = io::stdout();
    let mut sink: Box<dyn Sink> = if args.json {
        Box::new(sink::JsonSink::new(io::BufWriter::new(stdout)))
    } else {
        Box::new(sink::TextSink::new(io::BufWriter::new(stdout), io::stderr()))
    };
    let result = analyse(replay, args.pid, leak_after_ns, args.events, true, sink.as_mut())
        .and_then(|summary| sink.summary(&summary).context("writing output"));
    match result {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}
