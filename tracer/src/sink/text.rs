//! Human output: leaks as they are found, a status line now and then (on
//! stderr, so stdout stays clean when piped), and a grouped summary.

use std::io::{self, Write};

use super::{EventOut, LeakOut, Loss, Sink, Start, Status, Summary};
use crate::procs::container::short_id;
use crate::snapshot::netns;
use crate::stacks::{Frame, FrameKind};

pub struct TextSink<W: Write, E: Write> {
    out: W,
    err: E,
    /// The last LEAK line's owner and opening stack: a leak opened from
    /// the same place says so instead of printing the stack again (a
    /// JVM's stacks run to 30 frames, and a leaking call site leaks often).
    last_stack: Option<(Option<u32>, Vec<Frame>)>,
    /// This process's network namespace: a leak's is shown only when it
    /// is another (a container's). A `report` compares with its own, the
    /// host's when it runs on the host the recording was made on.
    own_netns: Option<u64>,
}

impl<W: Write, E: Write> TextSink<W, E> {
    pub fn new(out: W, err: E) -> Self {
        TextSink {
            out,
            err,
            last_stack: None,
            own_netns: netns::own(),
        }
    }

    /// As if running in network namespace `inode`.
    #[cfg(test)]
    pub fn in_netns(mut self, inode: u64) -> Self {
        self.own_netns = Some(inode);
        self
    }
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// The owner, its container (short id, as `docker ps` shows it) and its
/// pid there.
fn who(l: &LeakOut) -> String {
    let Some(pid) = l.pid else {
        return "owner unknown".into();
    };
    let mut s = format!("pid {pid} ({})", l.comm);
    match (&l.container_id, l.container_pid) {
        (Some(id), Some(inner)) => s.push_str(&format!(" in container {} as pid {inner}", short_id(id))),
        (Some(id), None) => s.push_str(&format!(" in container {}", short_id(id))),
        (None, Some(inner)) => s.push_str(&format!(" (pid {inner} in its pid namespace)")),
        (None, None) => {}
    }
    s
}

/// `LOCAL -> REMOTE`, and the network namespace they are addresses in when
/// it is not this process's.
fn endpoints(l: &LeakOut, own_netns: Option<u64>) -> String {
    match l.netns.filter(|&n| Some(n) != own_netns) {
        Some(n) => format!("{} -> {} (netns {n})", l.local, l.remote),
        None => format!("{} -> {}", l.local, l.remote),
    }
}

fn describe(l: &LeakOut, own_netns: Option<u64>) -> String {
    let fd = l.fd.map(|fd| format!(" fd {fd}")).unwrap_or_default();
    let unread = match l.unread_bytes {
        Some(0) => "  all data read".to_string(),
        Some(n) => format!("  {n} bytes unread"),
        None => String::new(),
    };
    let est = if l.close_wait_estimated {
        " (estimated: already in CLOSE_WAIT at start)"
    } else {
        ""
    };
    let mut s = format!(
        "{}{fd}  {}  in CLOSE_WAIT {}{est}{unread}  cookie {}",
        who(l),
        endpoints(l, own_netns),
        secs(l.close_wait_ms),
        l.cookie
    );
    if let Some(c) = l.fd_closed_by {
        let by: Vec<String> = l
            .holders
            .iter()
            .map(|h| format!("pid {} ({}) fd {}", h.pid, h.comm, h.fd))
            .collect();
        let by = if by.is_empty() {
            "another process".to_string()
        } else {
            by.join(", ")
        };
        s.push_str(&format!(
            "  [pid {} (tid {}) closed its fd {}, but the socket is still held by {by}]",
            c.pid, c.tid, c.fd
        ));
    } else if l.holders.len() > 1 {
        let by: Vec<String> = l.holders.iter().map(|h| format!("{} fd {}", h.pid, h.fd)).collect();
        s.push_str(&format!("  [held by {} processes: {}]", l.holders.len(), by.join(", ")));
    }
    s
}

/// Why data left unread matters, in one line.
fn hint(unread: u64, count: usize) -> Option<String> {
    (unread > 0).then(|| {
        format!(
            "{unread} bytes unread in {count} socket(s): the response body was never consumed, and the socket never closed"
        )
    })
}

/// A stack as indented lines, innermost first; Java frames the way a Java
/// stack trace prints them. `error`: why there is no stack; `truncated`:
/// why it stops early.
fn write_stack(
    o: &mut impl Write,
    frames: &[Frame],
    error: Option<&str>,
    truncated: Option<&str>,
    indent: &str,
) -> io::Result<()> {
    for f in frames {
        if f.is_java() {
            writeln!(o, "{indent}{}", java_line(f))?;
            continue;
        }
        let what = match (&f.symbol, &f.module, &f.offset) {
            (Some(sym), _, _) => sym.clone(),
            (None, Some(m), Some(off)) => format!("{m}+{off}"),
            (None, Some(m), None) => format!("{m} {}", f.ip),
            (None, None, _) => f.ip.clone(),
        };
        let loc = match (&f.file, f.line) {
            (Some(file), Some(line)) => format!(" at {file}:{line}"),
            _ => String::new(),
        };
        let why = match (&f.symbol, &f.reason) {
            (None, Some(r)) => format!(" ({r})"),
            _ => String::new(),
        };
        let k = if f.kernel { "[k] " } else { "" };
        writeln!(o, "{indent}{k}{what}{loc}{why}")?;
    }
    if let Some(e) = error {
        writeln!(o, "{indent}(no stack: {e})")?;
    }
    if let Some(t) = truncated {
        writeln!(o, "{indent}(stack cut here: {t})")?;
    }
    Ok(())
}

/// `at pkg.Class.method(File.java:13)`, plus the frame's kind when the JIT
/// compiled or inlined it. Parameter types are left out, as Java does.
fn java_line(f: &Frame) -> String {
    let symbol = f.symbol.as_deref().unwrap_or("?");
    let name = symbol.split_once('(').map_or(symbol, |(n, _)| n);
    let loc = match (&f.file, f.line) {
        (Some(file), Some(line)) => format!("{file}:{line}"),
        (Some(file), None) => file.clone(),
        (None, _) => "Unknown Source".into(),
    };
    let kind = match f.kind {
        FrameKind::Compiled => " [compiled]",
        FrameKind::Inlined => " [inlined]",
        _ => "",
    };
    format!("at {name}({loc}){kind}")
}

impl<W: Write, E: Write> Sink for TextSink<W, E> {
    fn start(&mut self, s: &Start) -> io::Result<()> {
        let scope = match s.filter_pid {
            Some(pid) => format!("pid {pid}"),
            None => "every process".into(),
        };
        let on = s
            .kernel
            .as_deref()
            .map(|k| format!(" on Linux {k}"))
            .unwrap_or_default();
        writeln!(
            self.err,
            "tracer: watching TCP sockets of {scope}{on}; a socket in CLOSE_WAIT for {} is a leak; {} sockets already open",
            secs(s.leak_after_ms),
            s.preexisting_sockets
        )?;
        if let Some(e) = &s.snapshot_error {
            writeln!(
                self.err,
                "tracer: warning: existing sockets unread ({e}); lost: leaks older than tracer, and leak evidence"
            )?;
        }
        for f in &s.fallbacks {
            writeln!(
                self.err,
                "tracer: note: this kernel lacks {}; instead {}",
                f.lacks, f.instead
            )?;
        }
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

    fn loss(&mut self, l: &Loss) -> io::Result<()> {
        let k = &l.kernel;
        writeln!(
            self.err,
            "tracer: WARNING [{}]: {} events lost to a full ring buffer ({} in all); stacks lost {}, watch-list full {}, reported-list full {}, fds unresolved {}, close_range calls cut {}, owners not kept {}, socket ids not fixed {}, hook runs skipped by the kernel {}: findings may be incomplete",
            l.time,
            l.new_ringbuf_drops,
            k.ringbuf_drops,
            k.stack_errors,
            k.watch_full,
            k.reported_full,
            k.fd_unresolved,
            k.close_range_truncated,
            k.owners_full,
            k.ids_full,
            k.hook_misses
        )
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
        writeln!(self.out, "LEAK  {}", describe(l, self.own_netns))?;
        let user: Vec<Frame> = l.open_stack.iter().filter(|f| !f.kernel).cloned().collect();
        let here = (l.pid, l.open_stack.clone());
        if !user.is_empty() && self.last_stack.as_ref() == Some(&here) {
            return writeln!(self.out, "      opened at: the same stack as the leak above");
        }
        self.last_stack = (!user.is_empty()).then_some(here);
        if !user.is_empty() || l.open_stack_error.is_some() {
            writeln!(self.out, "      opened at:")?;
            write_stack(
                &mut self.out,
                &user,
                l.open_stack_error.as_deref(),
                l.open_stack_truncated.as_deref(),
                "        ",
            )?;
        }
        Ok(())
    }

    fn late_close(&mut self, l: &LeakOut, closed_after_ms: u64, aborted: bool) -> io::Result<()> {
        let how = if aborted { "aborted (RST)" } else { "closed" };
        writeln!(
            self.out,
            "LATE  {}  {} {how} {} after it was reported  cookie {}",
            who(l),
            endpoints(l, self.own_netns),
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
                let who = match (g.pid, &g.container_id) {
                    (Some(pid), Some(id)) => format!("pid {pid} ({}) in container {}", g.comm, short_id(id)),
                    (Some(pid), None) => format!("pid {pid} ({})", g.comm),
                    (None, _) => "owner unknown".into(),
                };
                let user: Vec<Frame> = g.open_stack.iter().filter(|f| !f.kernel).cloned().collect();
                // A group of leaks without a stack (sampled out, stacks off,
                // older than the tracer) must not read as "this stack".
                let place = if user.is_empty() {
                    "whose opening stack was not captured (each LEAK line says why)"
                } else {
                    "opened from this stack"
                };
                writeln!(
                    o,
                    "  {who}: {} socket(s) to {} {place}, none closed; oldest in CLOSE_WAIT {}",
                    g.count,
                    g.remote,
                    secs(g.oldest_close_wait_ms)
                )?;
                write_stack(o, &user, None, g.open_stack_truncated.as_deref(), "      ")?;
                if let Some(h) = hint(g.unread_bytes, g.count) {
                    writeln!(o, "    -> {h}")?;
                }
            }
            writeln!(o, "details:")?;
            for l in &s.leaks {
                writeln!(o, "  {}", describe(l, self.own_netns))?;
                if !l.cmdline.is_empty() {
                    writeln!(o, "      cmdline: {}", l.cmdline)?;
                }
                if let Some(cs) = &l.close_stack {
                    writeln!(o, "      last close() of an fd to it:")?;
                    write_stack(
                        o,
                        &cs.iter().filter(|f| !f.kernel).cloned().collect::<Vec<_>>(),
                        l.close_stack_error.as_deref(),
                        l.close_stack_truncated.as_deref(),
                        "        ",
                    )?;
                }
            }
        }
        if let Some(r) = &s.recording {
            writeln!(o, "recording: {} ({} records)", r.files.join(", "), r.records)?;
            for d in &r.damage {
                writeln!(o, "WARNING: {d}")?;
            }
        }
        let k = &s.stats.kernel;
        writeln!(
            o,
            "events: kernel generated {}, ring-buffer drops {}, agent processed {}, sockets seen {}, untracked (table full) {}, decode errors {}, stacks lost {}, open stacks sampled out {}, stacks cut at the depth bound {}, watch-list full {}, reported-list full {}, fds unresolved {}, close_range calls cut {}, owners not kept (socket map full) {}, CLOSE_WAIT records spilled to the ring buffer {}, socket ids not fixed (id map full) {}, hook runs skipped by the kernel (program already running on that CPU) {}",
            k.generated, k.ringbuf_drops, s.stats.agent.events, s.stats.agent.sockets_seen, s.stats.agent.untracked_table_full, s.stats.decode_errors, k.stack_errors, k.stacks_sampled_out, k.stack_walk_truncated, k.watch_full, k.reported_full, k.fd_unresolved, k.close_range_truncated, k.owners_full, k.close_wait_spilled, k.ids_full, k.hook_misses
        )?;
        if k.ringbuf_drops > 0 {
            writeln!(
                o,
                "WARNING: {} events were dropped (ring buffer full): findings may be incomplete",
                k.ringbuf_drops
            )?;
        }
        if k.hook_misses > 0 {
            writeln!(
                o,
                "WARNING: the kernel skipped {} hook runs (the program was already running on that CPU): findings may be incomplete",
                k.hook_misses
            )?;
        }
        self.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.err.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::super::golden_fixtures::{CONTAINER_NETNS, HOST_NETNS};
    use super::super::golden_tests::{live_start, live_steps, run_with};
    use super::*;

    /// The golden `live` session as text, by a tracer in `own_netns`.
    fn live_text(own_netns: u64) -> String {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut sink = TextSink::new(&mut out, &mut err).in_netns(own_netns);
        run_with(&mut sink, &live_start(), false, live_steps(), "duration", None);
        drop(sink);
        String::from_utf8(out).expect("UTF-8")
    }

    fn line<'a>(text: &'a str, start: &str, cookie: u64) -> &'a str {
        let end = format!("cookie {cookie}");
        text.lines()
            .find(|l| l.starts_with(start) && (l.ends_with(&end) || l.contains(&format!("{end}  "))))
            .unwrap_or_else(|| panic!("no {start:?} line for {end}:\n{text}"))
    }

    #[test]
    fn a_container_s_leak_names_it_and_its_namespace() {
        let text = live_text(HOST_NETNS);
        // SERVER runs in a container, pid 7 there, in its own namespace.
        assert_eq!(
            line(&text, "LEAK ", 4104),
            "LEAK  pid 200 (server) in container 3f2a1b4c5d6e as pid 7 fd 9  10.0.0.5:8080 -> 10.0.0.8:40112 \
             (netns 4026532301)  in CLOSE_WAIT 1.1s  all data read  cookie 4104"
        );
        assert!(
            line(&text, "LATE ", 4104).starts_with(
                "LATE  pid 200 (server) in container 3f2a1b4c5d6e as pid 7  10.0.0.5:8080 -> 10.0.0.8:40112 \
                 (netns 4026532301) closed"
            ),
            "{text}"
        );
        // LEAKY is the host's, in the tracer's namespace: neither is shown.
        assert!(
            line(&text, "LEAK ", 4101)
                .starts_with("LEAK  pid 100 (leaky) fd 3  127.0.0.1:42698 -> 127.0.0.1:18181  in"),
            "{text}"
        );
        assert!(!text.contains(&format!("netns {HOST_NETNS}")), "{text}");
    }

    #[test]
    fn another_namespace_is_shown_from_the_tracer_s_own() {
        // A tracer inside the container's namespace: the host's is the other.
        let text = live_text(CONTAINER_NETNS);
        assert!(
            line(&text, "LEAK ", 4101).contains("127.0.0.1:18181 (netns 4026531833)  in CLOSE_WAIT"),
            "{text}"
        );
        assert!(!text.contains(&format!("netns {CONTAINER_NETNS}")), "{text}");
    }

    #[test]
    fn a_pid_namespace_without_a_container_is_said_too() {
        let l = LeakOut {
            container_pid: Some(1),
            ..leak()
        };
        assert_eq!(who(&l), "pid 4242 (tcp-fixture) (pid 1 in its pid namespace)");
        let l = LeakOut {
            container_id: Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into()),
            ..leak()
        };
        assert_eq!(who(&l), "pid 4242 (tcp-fixture) in container 0123456789ab");
        assert_eq!(who(&LeakOut { pid: None, ..l }), "owner unknown");
    }

    fn leak() -> LeakOut {
        LeakOut {
            pid: Some(4242),
            comm: "tcp-fixture".into(),
            cmdline: String::new(),
            container_id: None,
            container_pid: None,
            cgroup: None,
            local: "127.0.0.1:1".into(),
            remote: "127.0.0.1:2".into(),
            netns: None,
            cookie: 1,
            close_wait_ms: 0,
            close_wait_estimated: false,
            fd: None,
            owner_source: None,
            unread_bytes: None,
            unread_bytes_at_fin: None,
            holders: Vec::new(),
            open_stack: Vec::new(),
            open_stack_error: None,
            open_stack_truncated: None,
            close_stack: None,
            close_stack_error: None,
            close_stack_truncated: None,
            fd_closed_by: None,
        }
    }
}
