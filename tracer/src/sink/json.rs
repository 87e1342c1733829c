//! JSON Lines: one object per line, each with a "type".

use std::io::{self, Write};

use serde::Serialize;
use serde_json::json;

use super::{EventOut, LeakOut, Loss, Sink, Start, Status, Summary};

pub struct JsonSink<W: Write> {
    out: W,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        JsonSink { out }
    }

    /// What was written (tests read it back).
    #[cfg(test)]
    pub fn into_inner(self) -> W {
        self.out
    }

    /// One object: "type" first, then the body's fields, serialized
    /// straight to the output (with `--events` this runs for every kernel
    /// event: going through a `serde_json::Value` cost most of the agent's
    /// time there).
    fn line<T: Serialize>(&mut self, kind: &str, body: &T) -> io::Result<()> {
        #[derive(Serialize)]
        struct Typed<'a, T> {
            #[serde(rename = "type")]
            kind: &'a str,
            #[serde(flatten)]
            body: &'a T,
        }
        serde_json::to_writer(&mut self.out, &Typed { kind, body }).map_err(io::Error::other)?;
        self.out.write_all(b"\n")
    }
}

impl<W: Write> Sink for JsonSink<W> {
    fn start(&mut self, s: &Start) -> io::Result<()> {
        self.line("start", s)?;
        self.flush()
    }

    fn loss(&mut self, l: &Loss) -> io::Result<()> {
        self.line("loss", l)
    }

    fn event(&mut self, e: &EventOut) -> io::Result<()> {
        self.line("event", e)
    }

    fn leak(&mut self, l: &LeakOut) -> io::Result<()> {
        self.line("leak", l)
    }

    fn late_close(&mut self, l: &LeakOut, closed_after_ms: u64, aborted: bool) -> io::Result<()> {
        #[derive(Serialize)]
        struct Late<'a> {
            #[serde(flatten)]
            leak: &'a LeakOut,
            closed_after_ms: u64,
            aborted: bool,
        }
        self.line(
            "late_close",
            &Late {
                leak: l,
                closed_after_ms,
                aborted,
            },
        )
    }

    fn status(&mut self, s: &Status) -> io::Result<()> {
        self.line("status", s)
    }

    fn process_exit(&mut self, pid: u32) -> io::Result<()> {
        self.line("process_exit", &json!({ "pid": pid }))
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        self.line("summary", s)?;
        self.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
