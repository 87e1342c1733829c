//! Reading recordings back into analysis inputs, and `tracer report`:
//! the same engine and sinks as `tracer live`, fed from files.

use std::{
    io::{self, IsTerminal},
    path::PathBuf,
};

use anyhow::{Context as _, Result};

use crate::{
    cli::ReportArgs,
    clock::WallClock,
    correlate::Correlator,
    engine::Engine,
    input::Input,
    record::{
        codec,
        reader::{Damage, Recording},
        writer::Header,
    },
    sink::{self, RecordingInfo, Sink, Start},
};

pub struct Replay {
    pub header: Header,
    pub inputs: Vec<Input>,
    pub info: RecordingInfo,
    /// Why the recording ended, from its End record.
    pub end_reason: Option<String>,
}

/// Reads `files` in order. Damage is reported on stderr (one line each)
/// and in `info`, never fatal; a file that is not a recording is.
pub fn load(files: &[PathBuf]) -> Result<Replay> {
    let mut inputs = Vec::new();
    let mut info = RecordingInfo::default();
    let mut header = None;
    let mut end_reason = None;
    let progress = io::stderr().is_terminal();
    for path in files {
        let rec = Recording::open(path)?;
        let h: Header = serde_json::from_value(rec.header.clone())
            .with_context(|| format!("{}: the header is not a tracer recording header", rec.path))?;
        header.get_or_insert(h);
        if progress && rec.len() > 16 << 20 {
            eprintln!(
                "tracer: reading {} ({:.0} MiB)...",
                rec.path,
                rec.len() as f64 / 1048576.0
            );
        }
        info.files.push(rec.path.clone());
        let mut damage = Vec::new();
        let records = rec.records(|d| damage.push(d));
        let mut ended = false;
        for r in &records {
            info.records += 1;
            let Some(kind) = r.kind else {
                // A kind from a newer writer of the same format version.
                continue;
            };
            match codec::decode(kind, r.payload) {
                Ok(Input::End(e)) => {
                    ended = true;
                    end_reason = Some(e.reason.clone());
                    inputs.push(Input::End(e));
                }
                Ok(input) => inputs.push(input),
                Err(e) => info
                    .damage
                    .push(format!("{}: record at byte {}: {e}; skipped", rec.path, r.offset)),
            }
        }
        for d in damage {
            info.damage.push(match d {
                Damage::Corrupt { offset, skipped } => {
                    format!("{}: corrupt data at byte {offset}; skipped {skipped} bytes to the next valid record", rec.path)
                }
                Damage::Truncated { offset } => format!(
                    "{}: the recording ends early at byte {offset} (cut short: the tracer was killed or the disk filled)",
                    rec.path
                ),
            });
        }
        if !ended {
            info.ended_early = true;
            if !info
                .damage
                .iter()
                .any(|d| d.starts_with(&rec.path) && d.contains("ends early"))
            {
                info.damage.push(format!(
                    "{}: the recording ends early after {} records (no clean end: the tracer was killed)",
                    rec.path,
                    records.len()
                ));
            }
        }
    }
    for d in &info.damage {
        eprintln!("tracer: warning: {d}");
    }
    Ok(Replay {
        header: header.context("no recording given")?,
        inputs,
        info,
        end_reason,
    })
}

/// Runs a recording through the engine into `sink`; returns the summary.
pub fn analyse(
    replay: &Replay,
    pid: Option<u32>,
    leak_after_ns: u64,
    events: bool,
    sink: &mut dyn Sink,
) -> io::Result<sink::Summary> {
    let wall = WallClock::from_offset(replay.header.boot_to_wall_offset_ns);
    let mut engine = Engine::new(Correlator::new(leak_after_ns, pid, usize::MAX), wall, events);
    let preexisting = replay
        .inputs
        .iter()
        .find_map(|i| match i {
            Input::Snapshot(s) => Some(s.sockets.len()),
            _ => None,
        })
        .unwrap_or(0);
    sink.start(&Start {
        hooks: Vec::new(),
        filter_pid: pid.or(replay.header.options.pid),
        leak_after_ms: leak_after_ns / 1_000_000,
        preexisting_sockets: preexisting,
    })?;
    for input in &replay.inputs {
        engine.feed(input, sink)?;
    }
    let reason = match replay.end_reason.as_deref() {
        Some("duration") => "duration",
        Some("signal") => "signal",
        Some("process_exit") => "process_exit",
        Some("max_size") => "max_size",
        _ => "recording_ends_early",
    };
    let mut summary = engine.summary(reason, 0, sink)?;
    summary.recording = Some(RecordingInfo {
        files: replay.info.files.clone(),
        records: replay.info.records,
        damage: replay.info.damage.clone(),
        ended_early: replay.info.ended_early,
    });
    Ok(summary)
}

pub fn report(args: &ReportArgs) -> Result<()> {
    let replay = load(&args.files)?;
    let leak_after_ns = match args.leak_after {
        Some(d) => d.as_nanos() as u64,
        None => replay.header.options.leak_after_ms * 1_000_000,
    };
    let stdout = io::stdout();
    let mut sink: Box<dyn Sink> = if args.json {
        Box::new(sink::JsonSink::new(io::BufWriter::new(stdout)))
    } else {
        Box::new(sink::TextSink::new(io::BufWriter::new(stdout), io::stderr()))
    };
    let result = analyse(&replay, args.pid, leak_after_ns, args.events, sink.as_mut())
        .and_then(|summary| sink.summary(&summary));
    match result {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing output"),
    }
}
