//! Human output: leaks as they are found, a status line now and then (on
//! stderr, so stdout stays clean when piped), and a grouped summary.

use std::io::{self, Write};

use super::{EventOut, LeakOut, Sink, Start, Status, Summary};

pub struct TextSink<W: Write, E: Write> {
    out: W,
    err: E,
}

impl<W: Write, E: Write> TextSink<W, E> {
    pub fn new(out: W, err: E) -> Self {
        TextSink { out, err }
    }
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn who(l: &LeakOut) -> String {
    match l.pid {
        Some(pid) => format!("pid {pid} ({})", l.comm),
        None => "owner unknown".into(),
    }
}

fn describe(l: &LeakOut) -> String {
    let fd = l.fd.map(|fd| format!(" fd {fd}")).unwrap_or_default();
    let est = if l.close_wait_estimated {
        " (at least; was already there at start)"
    } else {
        ""
    };
    let mut s = format!(
        "{}{fd}  {} -> {}  in CLOSE_WAIT {}{est}  cookie {}",
        who(l),
        l.local,
        l.remote,
        secs(l.close_wait_ms),
        l.cookie
    );
    if let Some(c) = l.fd_closed_by {
        s.push_str(&format!(
            "  [fd {} closed by pid {} tid {}, socket still held elsewhere]",
            c.fd, c.pid, c.tid
        ));
    }
    s
}

impl<W: Write, E: Write> Sink for TextSink<W, E> {
    fn start(&mut self, s: &Start) -> io::Result<()> {
        let scope = match s.filter_pid {
            Some(pid) => format!("pid {pid}"),
            None => "every process".into(),
        };
        writeln!(
            self.err,
            "tracer: watching TCP sockets of {scope}; a socket in CLOSE_WAIT for {} is a leak; {} sockets already open",
            secs(s.leak_after_ms),
            s.preexisting_sockets
        )?;
        for h in s.hooks.iter().filter(|h| !h.attached) {
            writeln!(
                self.err,
                "tracer: warning: {} not attached; lost: {}",
                h.hook,
                h.lost.unwrap_or("?")
            )?;
        }
        self.err.flush()
    }

    fn event(&mut self, e: &EventOut) -> io::Result<()> {
        write!(
            self.out,
            "{} {:6} cookie {} task {}/{} ({})",
            e.time, e.kind, e.cookie, e.task_pid, e.task_tid, e.task_comm
        )?;
        if let (Some(o), Some(n)) = (e.old_state, e.new_state) {
            write!(self.out, " {o} -> {n}")?;
        }
        if let (Some(l), Some(r)) = (&e.local, &e.remote) {
            write!(self.out, " {l} -> {r}")?;
        }
        if let Some(fd) = e.fd {
            write!(self.out, " fd {fd}")?;
        }
        writeln!(self.out)
    }

    fn leak(&mut self, l: &LeakOut) -> io::Result<()> {
        writeln!(self.out, "LEAK  {}", describe(l))
    }

    fn late_close(&mut self, l: &LeakOut, closed_after_ms: u64, aborted: bool) -> io::Result<()> {
        let how = if aborted { "aborted (RST)" } else { "closed" };
        writeln!(
            self.out,
            "LATE  {}  {} -> {} {how} {} after it was reported  cookie {}",
            who(l),
            l.local,
            l.remote,
            secs(closed_after_ms),
            l.cookie
        )
    }

    fn status(&mut self, s: &Status) -> io::Result<()> {
        writeln!(
            self.err,
            "[{}] events {}  sockets {}  leaked now {}  ring-buffer drops {}",
            s.time, s.events, s.sockets_tracked, s.leaks_now, s.ringbuf_drops
        )
    }

    fn process_exit(&mut self, pid: u32) -> io::Result<()> {
        writeln!(self.out, "process {pid} exited")
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        let o = &mut self.out;
        writeln!(o)?;
        writeln!(o, "=== summary after {} ({}) ===", secs(s.duration_ms), s.reason)?;
        if s.leaks.is_empty() {
            writeln!(o, "no socket leaked in CLOSE_WAIT")?;
        } else {
            writeln!(o, "{} socket(s) leaked in CLOSE_WAIT:", s.leaks.len())?;
            for g in &s.groups {
                let who = match g.pid {
                    Some(pid) => format!("pid {pid} ({})", g.comm),
                    None => "owner unknown".into(),
                };
                writeln!(
                    o,
                    "  {who}: {} socket(s) to {}, none closed; oldest in CLOSE_WAIT {}",
                    g.count,
                    g.remote,
                    secs(g.oldest_close_wait_ms)
                )?;
            }
            writeln!(o, "details:")?;
            for l in &s.leaks {
                writeln!(o, "  {}", describe(l))?;
                if !l.cmdline.is_empty() {
                    writeln!(o, "      cmdline: {}", l.cmdline)?;
                }
            }
        }
        let k = &s.stats.kernel;
        writeln!(
            o,
            "events: kernel generated {}, ring-buffer drops {}, agent processed {}, sockets seen {}, untracked (table full) {}, decode errors {}",
            k.generated, k.ringbuf_drops, s.stats.agent.events, s.stats.agent.sockets_seen, s.stats.agent.untracked_table_full, s.stats.decode_errors
        )?;
        if k.ringbuf_drops > 0 {
            writeln!(
                o,
                "WARNING: {} events were dropped (ring buffer full): findings may be incomplete",
                k.ringbuf_drops
            )?;
        }
        self.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.err.flush()
    }
}
