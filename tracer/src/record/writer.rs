//! Writes a recording: buffered in large chunks, flushed on every agent
//! tick (so a SIGKILL loses at most one tick), bounded by `--max-size`.
//! Files are what `record` writes; tests write the same bytes to memory.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{codec, format};
use crate::input::Input;

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

pub struct Recorder<W: Write = File> {
    out: BufWriter<W>,
    buf: Vec<u8>,
    pub written: u64,
    max_size: Option<u64>,
    /// Sockets per snapshot record.
    snapshot_part: usize,
}

pub enum Written {
    Ok,
    /// The next record would pass `--max-size`: nothing more is written.
    Full,
}

impl Recorder<File> {
    pub fn create(path: &Path, header: &Header) -> Result<Self> {
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
        Recorder::new(file, header).with_context(|| format!("cannot write {}", path.display()))
    }
}

impl<W: Write> Recorder<W> {
    /// Writes the file header to `out`; records follow with [`Self::write`].
    pub fn new(out: W, header: &Header) -> io::Result<Self> {
        let mut out = BufWriter::with_capacity(1 << 20, out);
        let prefix = format::encode_file_header(&serde_json::to_vec(header)?);
        out.write_all(&prefix)?;
        Ok(Recorder {
            out,
            buf: Vec::with_capacity(4096),
            written: prefix.len() as u64,
            max_size: header.options.max_size,
            snapshot_part: codec::SNAPSHOT_PART,
        })
    }

    /// Snapshot records of `n` sockets instead of [`codec::SNAPSHOT_PART`]
    /// (tests: many parts from a small snapshot).
    #[cfg(test)]
    pub fn with_snapshot_part(mut self, n: usize) -> Self {
        self.snapshot_part = n;
        self
    }

    /// The bytes written, flushed (tests).
    #[cfg(test)]
    pub fn into_inner(self) -> W {
        self.out.into_inner().map_err(|e| e.into_error()).expect("flushed")
    }

    pub fn write(&mut self, input: &Input) -> io::Result<Written> {
        self.buf.clear();
        codec::encode(input, &mut self.buf, self.snapshot_part);
        if let Some(max) = self.max_size {
            // Keep room for the final Stats and End records.
            if self.written + self.buf.len() as u64 + 1024 > max && !matches!(input, Input::End(_) | Input::Stats(_)) {
                return Ok(Written::Full);
            }
        }
        self.out.write_all(&self.buf)?;
        self.written += self.buf.len() as u64;
        Ok(Written::Ok)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
