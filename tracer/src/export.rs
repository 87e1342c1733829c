//! `tracer export`: a recording in formats other tools read.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::{self, BufWriter, Read, Write},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use tracer_common::tcp;

use crate::{
    cli::{ExportArgs, ExportFormat},
    clock::WallClock,
    correlate::{Comm, Endpoints},
    decode::Event,
    input::Input,
    replay::{self, Replay},
    sink::{LeakOut, NullSink},
};

pub fn export(args: &ExportArgs) -> Result<()> {
    let replay = Replay::open(&args.files)?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(BufWriter::new(
            File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(BufWriter::new(io::stdout())),
    };
    let result = match args.format {
        ExportFormat::Jsonl => jsonl(replay, &mut out),
        ExportFormat::ChromeTrace => chrome_trace(replay, &mut out),
        ExportFormat::Folded => folded(replay).and_then(|lines| {
            for l in lines {
                writeln!(out, "{l}")?;
            }
            Ok(())
        }),
        ExportFormat::Flamegraph => {
            let lines = folded(replay)?;
            if lines.is_empty() {
                bail!("no leaked socket in the recording: no stacks to draw");
            }
            let mut opts = inferno::flamegraph::Options::default();
            opts.title = "Stacks that opened leaked sockets".into();
            opts.count_name = "sockets".into();
            inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut out)
                .map_err(|e| anyhow::anyhow!("drawing the flame graph: {e}"))
        }
    };
    match result.and_then(|()| out.flush().map_err(Into::into)) {
        Err(e) if replay::is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

/// Every input, one JSON object per line, each with a "type".
pub(crate) fn jsonl<R: Read>(replay: Replay<R>, out: &mut dyn Write) -> Result<()> {
    let wall = WallClock::from_offset(replay.header.boot_to_wall_offset_ns);
    writeln!(out, "{}", json!({"type": "header", "header": replay.header}))?;
    let mut inputs = replay.inputs(true);
    while let Some(input) = inputs.next()? {
        let v = match &input {
            Input::Kernel(ev) => kernel_json(ev, wall),
            Input::Process(p) => json!({"type": "process", "process": p}),
            Input::Stack(s) => json!({"type": "stack", "stack": s}),
            Input::Snapshot(s) => json!({"type": "snapshot", "snapshot": s}),
            Input::Evidence(e) => json!({"type": "evidence", "evidence": e}),
            Input::Tick(ns) => json!({"type": "tick", "ktime_ns": ns}),
            Input::Stats(s) => json!({"type": "stats", "stats": s}),
            Input::ProcessExit(e) => json!({"type": "process_exit", "process_exit": e}),
            Input::End(e) => json!({"type": "end", "end": e}),
            Input::Forget(f) => json!({"type": "forget", "forget": f}),
        };
        serde_json::to_writer(&mut *out, &v)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

fn kernel_json(ev: &Event, wall: WallClock) -> Value {
    let h = ev.header();
    let mut v = json!({
        "type": "event",
        "ktime_ns": h.ktime_ns,
        "time": wall.format(h.ktime_ns),
        "cookie": h.cookie,
        "task_pid": h.tgid,
        "task_tid": h.tid,
        "task_comm": Comm(h.comm).as_str(),
        "cpu": h.cpu,
        "ustack": h.ustack,
        "kstack": h.kstack,
    });
    let m = v.as_object_mut().expect("object");
    match ev {
        Event::State(s) => {
            let ep = Endpoints::from_event(s);
            m.insert("kind".into(), json!("state"));
            m.insert("old_state".into(), json!(tcp::name(s.oldstate)));
            m.insert("new_state".into(), json!(tcp::name(s.newstate)));
            m.insert("local".into(), json!(ep.local.to_string()));
            m.insert("remote".into(), json!(ep.remote.to_string()));
            m.insert("rx_queue".into(), json!(s.rx_queue));
        }
        Event::Accept(f) | Event::Close(f) => {
            let kind = if matches!(ev, Event::Accept(_)) {
                "accept"
            } else {
                "close"
            };
            m.insert("kind".into(), json!(kind));
            m.insert("fd".into(), json!(f.fd));
        }
    }
    v
}

/// One socket's life, for the timeline.
struct Life {
    owner: Option<u32>,
    endpoints: Option<Endpoints>,
    start_ns: u64,
    /// (time, state) at each change.
    states: Vec<(u64, u8)>,
}

/// Chrome trace event format: per socket one span (`cat` "socket") on its
/// owner's track, and inside it one span per TCP state (`cat` "state"),
/// coloured by state. Opens in Perfetto's UI and chrome://tracing.
pub(crate) fn chrome_trace<R: Read>(replay: Replay<R>, out: &mut dyn Write) -> Result<()> {
    let mut lives: BTreeMap<u64, Life> = BTreeMap::new();
    let mut names: HashMap<u32, String> = HashMap::new();
    let mut end_ns = 0u64;
    let mut inputs = replay.inputs(true);
    while let Some(input) = inputs.next()? {
        match &input {
            Input::Snapshot(s) => {
                end_ns = end_ns.max(s.ns);
                for sock in &s.sockets {
                    let life = lives.entry(sock.cookie).or_insert_with(|| Life {
                        owner: None,
                        endpoints: None,
                        start_ns: s.ns,
                        states: Vec::new(),
                    });
                    life.endpoints = Some(sock.endpoints);
                    life.owner = life.owner.or(sock.holder.map(|h| h.0));
                    life.states.push((s.ns, sock.state));
                    if let Some((pid, comm, _)) = sock.holder {
                        names.entry(pid).or_insert_with(|| comm.as_str().into_owned());
                    }
                }
            }
            Input::Process(p) => {
                names.insert(p.pid, p.info.comm.clone());
            }
            Input::Kernel(ev) => {
                let h = ev.header();
                end_ns = end_ns.max(h.ktime_ns);
                if h.cookie == 0 {
                    continue;
                }
                let life = lives.entry(h.cookie).or_insert_with(|| Life {
                    owner: None,
                    endpoints: None,
                    start_ns: h.ktime_ns,
                    states: Vec::new(),
                });
                // The snapshot comes first in a recording, but events older
                // than it can follow (they were still in the ring buffer).
                life.start_ns = life.start_ns.min(h.ktime_ns);
                match ev {
                    Event::State(s) => {
                        let ep = Endpoints::from_event(s);
                        if ep.local.port() != 0 || life.endpoints.is_none() {
                            life.endpoints = Some(ep);
                        }
                        if s.oldstate == tcp::CLOSE && s.newstate == tcp::SYN_SENT {
                            life.owner = Some(h.tgid);
                        }
                        life.states.push((h.ktime_ns, s.newstate));
                    }
                    Event::Accept(_) => life.owner = Some(h.tgid),
                    Event::Close(_) => {
                        life.owner.get_or_insert(h.tgid);
                    }
                }
            }
            Input::Tick(ns) => end_ns = end_ns.max(*ns),
            _ => {}
        }
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    let mut events = Vec::new();
    let mut pids_seen = std::collections::BTreeSet::new();
    for life in lives.values_mut() {
        life.states.sort_by_key(|&(t, _)| t);
    }
    for (cookie, life) in &lives {
        let pid = life.owner.unwrap_or(0);
        pids_seen.insert(pid);
        let last_ns = life.states.last().map(|&(t, _)| t).unwrap_or(life.start_ns);
        let closed = life.states.last().is_some_and(|&(_, s)| s == tcp::CLOSE);
        let stop = if closed { last_ns } else { end_ns.max(last_ns) };
        let final_state = life.states.last().map(|&(_, s)| tcp::name(s)).unwrap_or("UNKNOWN");
        let name = match life.endpoints {
            Some(e) => format!("{} -> {}", e.local, e.remote),
            None => format!("socket {cookie}"),
        };
        events.push(json!({
            "name": name, "cat": "socket", "ph": "X", "pid": pid, "tid": cookie,
            "ts": us(life.start_ns), "dur": us(stop.saturating_sub(life.start_ns)),
            "cname": if final_state == "CLOSE_WAIT" { "terrible" } else { "generic_work" },
            "args": { "cookie": cookie, "final_state": final_state },
        }));
        for (i, &(t, state)) in life.states.iter().enumerate() {
            if state == tcp::CLOSE {
                continue;
            }
            let next = life.states.get(i + 1).map(|&(t, _)| t).unwrap_or(stop);
            events.push(json!({
                "name": tcp::name(state), "cat": "state", "ph": "X", "pid": pid, "tid": cookie,
                "ts": us(t), "dur": us(next.saturating_sub(t)), "cname": colour(state),
            }));
        }
    }
    for pid in pids_seen {
        let name = if pid == 0 {
            "owner unknown".to_string()
        } else {
            format!("{} ({pid})", names.get(&pid).map(String::as_str).unwrap_or("?"))
        };
        events.push(json!({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}));
    }
    serde_json::to_writer(&mut *out, &json!({ "traceEvents": events, "displayTimeUnit": "ms" }))?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Reserved colour names of the trace viewer.
fn colour(state: u8) -> &'static str {
    match state {
        tcp::ESTABLISHED => "good",
        tcp::CLOSE_WAIT => "terrible",
        tcp::SYN_SENT | tcp::SYN_RECV | tcp::NEW_SYN_RECV => "yellow",
        tcp::LISTEN => "olive",
        _ => "grey",
    }
}

/// Folded stacks of the sockets still leaked at the end of the recording:
/// `comm;outermost;...;innermost count`, user frames only.
pub(crate) fn folded<R: Read>(replay: Replay<R>) -> Result<Vec<String>> {
    let leak_after_ns = replay::leak_after_ns(&replay.header);
    let summary = replay::analyse(replay, None, leak_after_ns, false, true, &mut NullSink)?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for l in &summary.leaks {
        *counts.entry(folded_stack(l)).or_default() += 1;
    }
    Ok(counts.into_iter().map(|(k, n)| format!("{k} {n}")).collect())
}

/// A leak's opening stack as a folded line's frames, outermost first,
/// after the process name.
fn folded_stack(l: &LeakOut) -> String {
    let mut parts = vec![if l.comm.is_empty() {
        "unknown".to_string()
    } else {
        l.comm.clone()
    }];
    let user: Vec<_> = l.open_stack.iter().filter(|f| !f.kernel).collect();
    if user.is_empty() {
        parts.push(format!(
            "[no stack: {}]",
            l.open_stack_error.as_deref().unwrap_or("unknown")
        ));
    }
    for f in user.iter().rev() {
        parts.push(match (&f.symbol, &f.module, &f.offset) {
            // Java frames with their line: one method connects from
            // several places.
            (Some(s), _, _) if f.is_java() => match f.line {
                Some(line) => format!("{s}:{line}"),
                None => s.clone(),
            },
            (Some(s), _, _) => s.clone(),
            (None, Some(m), Some(o)) => format!("{m}+{o}"),
            _ => f.ip.clone(),
        });
    }
    let parts: Vec<String> = parts.iter().map(|p| folded_frame(p)).collect();
    parts.join(";")
}

/// A frame (or the process name, which any process can set to anything)
/// as the folded format allows it: ';' separates frames, a space comes
/// before the count and a newline ends the line, so none of them, nor any
/// other whitespace or control character, may appear inside a frame.
fn folded_frame(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            ';' => ':',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::synth::{self, SEC};

    #[test]
    fn folded_frames_have_no_separator_space_or_newline() {
        assert_eq!(folded_frame("a;b c\nd\r\te\u{1}f"), "a:b_c_d__e_f");
        assert_eq!(folded_frame("ns::f(int, char*)"), "ns::f(int,_char*)");
        assert_eq!(folded_frame("Main.run(Main.java):12"), "Main.run(Main.java):12");
    }

    /// A process may name itself anything (prctl PR_SET_NAME), and symbols
    /// hold spaces: every line must still be `frame;frame;... count`.
    #[test]
    fn folded_lines_stay_parseable_whatever_the_names() {
        let comm = "a;b c\nd";
        let mut inputs = vec![synth::process(7, comm)];
        let mut opened = synth::connect_then_fin(SEC, 2 * SEC, 7, 1);
        for input in &mut opened {
            if let Input::Kernel(ev) = input {
                ev.header_mut().comm = crate::correlate::Comm::from_str(comm).0;
                ev.header_mut().ustack = 0;
            }
        }
        inputs.push(Input::Stack(
            serde_json::from_value(json!({
                "key": {"pid": 7, "id": 0},
                "frames": {"Ok": [
                    {"ip": "0x1", "symbol": "connect", "module": null, "offset": null, "file": null, "line": null, "kernel": false},
                    {"ip": "0x2", "symbol": "ns::open(int, char*)", "module": null, "offset": null, "file": null, "line": null, "kernel": false},
                    {"ip": "0x3", "symbol": "x;y\nz", "module": null, "offset": null, "file": null, "line": null, "kernel": false},
                ]},
            }))
            .unwrap(),
        ));
        inputs.extend(opened);
        inputs.extend(synth::connect_then_fin(SEC, 2 * SEC, 8, 2));
        inputs.extend([Input::Tick(4 * SEC), synth::end(4 * SEC)]);
        let file = synth::write(&synth::header(1000), &inputs, 4);
        let lines = folded(synth::replay(&[&file]).unwrap()).unwrap();
        assert_eq!(
            lines,
            vec![
                "a:b_c_d;x:y_z;ns::open(int,_char*);connect 1".to_string(),
                "client;[no_stack:_not_captured_for_this_event] 1".to_string(),
            ]
        );
        for l in &lines {
            let (stack, count) = l.rsplit_once(' ').unwrap();
            assert!(
                !stack.contains(char::is_whitespace) && count.parse::<u64>().is_ok(),
                "{l:?}"
            );
        }
    }
}
