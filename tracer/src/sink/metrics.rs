//! The daemon's sink: the leaks open now and the agent's health, kept on a
//! board that the HTTP server reads on each scrape, and each new leak and
//! late close also written as one JSON line for log pipelines.
//!
//! The board is what a scrape sees; it holds only what is open now (a
//! leak leaves it at its late close), so its size follows the host's leaks,
//! not the daemon's age.

use std::{
    collections::HashMap,
    io::{self, Write},
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use super::{EventOut, JsonSink, LeakOut, Loss, Sink, Start, Status, Summary};
use crate::kernel::KernelStats;

/// A leak open now, with when it was reported (its age grows from there).
#[derive(Clone, Debug)]
pub struct OpenLeak {
    pub leak: LeakOut,
    pub reported_at: Instant,
}

impl OpenLeak {
    /// How long the socket has been in CLOSE_WAIT at `now`.
    pub fn close_wait_ms(&self, now: Instant) -> u64 {
        self.leak.close_wait_ms + now.saturating_duration_since(self.reported_at).as_millis() as u64
    }
}

/// What the daemon knows now: read by every scrape.
#[derive(Debug, Default)]
pub struct Board {
    /// The programs are attached and the start-up snapshot is in.
    pub ready: bool,
    /// Leaks open now, by socket cookie.
    pub leaks: HashMap<u64, OpenLeak>,
    pub leaks_total: u64,
    pub late_closes_total: u64,
    /// The latest status: events analysed, sockets tracked, drops.
    pub status: Option<StatusCounts>,
    /// Kernel-side loss counters, totals as of the latest loss.
    pub kernel: KernelStats,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct StatusCounts {
    pub events: u64,
    pub sockets_tracked: usize,
    pub ringbuf_drops: u64,
}

/// The board, shared between the tracing loop and the HTTP server.
#[derive(Clone, Debug, Default)]
pub struct SharedBoard(Arc<Mutex<Board>>);

impl SharedBoard {
    /// The board; a writer that panicked left it consistent (each update
    /// is one assignment or insertion), so a poisoned lock is still read.
    pub fn lock(&self) -> MutexGuard<'_, Board> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct MetricsSink<W: Write> {
    board: SharedBoard,
    log: JsonSink<W>,
}

impl<W: Write> MetricsSink<W> {
    pub fn new(board: SharedBoard, log: W) -> Self {
        MetricsSink {
            board,
            log: JsonSink::new(log),
        }
    }
}

impl<W: Write> Sink for MetricsSink<W> {
    fn start(&mut self, s: &Start) -> io::Result<()> {
        self.board.lock().ready = true;
        self.log.start(s)
    }

    fn loss(&mut self, l: &Loss) -> io::Result<()> {
        self.board.lock().kernel = l.kernel;
        self.log.loss(l)
    }

    fn event(&mut self, _: &EventOut) -> io::Result<()> {
        Ok(())
    }

    fn leak(&mut self, l: &LeakOut) -> io::Result<()> {
        {
            let mut b = self.board.lock();
            b.leaks_total += 1;
            b.leaks.insert(
                l.cookie,
                OpenLeak {
                    leak: l.clone(),
                    reported_at: Instant::now(),
                },
            );
        }
        self.log.leak(l)
    }

    fn late_close(&mut self, l: &LeakOut, closed_after_ms: u64, aborted: bool) -> io::Result<()> {
        {
            let mut b = self.board.lock();
            b.late_closes_total += 1;
            b.leaks.remove(&l.cookie);
        }
        self.log.late_close(l, closed_after_ms, aborted)
    }

    fn status(&mut self, s: &Status) -> io::Result<()> {
        let mut b = self.board.lock();
        b.status = Some(StatusCounts {
            events: s.events,
            sockets_tracked: s.sockets_tracked,
            ringbuf_drops: s.ringbuf_drops,
        });
        b.kernel.ringbuf_drops = b.kernel.ringbuf_drops.max(s.ringbuf_drops);
        Ok(())
    }

    fn process_exit(&mut self, _: u32) -> io::Result<()> {
        Ok(())
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        self.board.lock().ready = false;
        self.log.summary(s)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.log.flush()
    }
}
