//! The JSON output contract (`tracer live --json`, `tracer report --json`),
//! checked without root or a kernel.
//!
//! The real [`Engine`] is fed hand-built [`Input`]s that reach every line
//! type and every optional field both set and unset, and writes through
//! the real [`JsonSink`]. Then:
//! - the output must equal the golden files in `testdata/`, so any change
//!   to the output is a visible diff in review (`UPDATE_GOLDEN=1`
//!   rewrites them);
//! - `docs/json.md` must document exactly the fields that output has,
//!   with their JSON types and whether they can be null or absent, so the
//!   documentation and the code cannot drift apart in either direction.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde_json::{Map, Value};
use tracer_common::{tcp, EventKind, FdEvent, Header, StateEvent, NO_STACK, STACKS_SAMPLED_OUT};

use super::{JsonSink, RecordingInfo, Sink, Start};
use crate::{
    clock::WallClock,
    correlate::{Comm, Correlator, Endpoints, SnapshotSocket},
    decode::Event,
    engine::Engine,
    evidence::{Evidence, HolderOut},
    input::{EndInput, EvidenceInput, ExitInput, Input, ProcessInput, SnapshotInput, StackInput, StackKey, StatsInput},
    kernel::{hooks::HOOKS, HookStatus, KernelStats},
    procs::ProcInfo,
    stacks::{Frame, FrameKind},
};

const MS: u64 = 1_000_000;
/// Kernel (CLOCK_MONOTONIC) time of the first input: any fixed value.
const T0: u64 = 3_600_000 * MS;
/// Wall-clock time at `T0`, 2026-12-03T12:00:00Z: a fixed offset, as a
/// recording stores it, makes every "time" field the same from run to run.
const WALL_AT_T0_NS: i64 = 1_796_299_200 * 1_000_000_000;
const LEAK_AFTER_MS: u64 = 1000;

fn wall() -> WallClock {
    WallClock::from_offset(WALL_AT_T0_NS - T0 as i64)
}

#[derive(Clone, Copy)]
struct Task {
    pid: u32,
    tid: u32,
    comm: &'static str,
}

const fn task(pid: u32, tid: u32, comm: &'static str) -> Task {
    Task { pid, tid, comm }
}

const LEAKY: Task = task(100, 100, "leaky");
/// A forked child of LEAKY: closes its copy of the fd, which does not close
/// the socket (LEAKY and LEAKY_SIBLING still hold it).
const LEAKY_CHILD: Task = task(101, 101, "leaky");
const LEAKY_SIBLING: Task = task(102, 102, "leaky");
const SERVER: Task = task(200, 203, "server");
const JAVA: Task = task(300, 312, "java");
/// Held a CLOSE_WAIT socket before tracing started.
const DAEMON: Task = task(400, 400, "old-daemon");
/// Whatever ran when a packet arrived: never taken as a socket's owner.
const SOFTIRQ: Task = task(0, 0, "swapper/1");

struct Conn {
    cookie: u64,
    local: &'static str,
    remote: &'static str,
}

/// Client sockets of LEAKY: same stack, same server, so one group of two.
const A: Conn = Conn {
    cookie: 4101,
    local: "127.0.0.1:42698",
    remote: "127.0.0.1:18181",
};
const A2: Conn = Conn {
    cookie: 4102,
    local: "127.0.0.1:42700",
    remote: "127.0.0.1:18181",
};
/// The JVM's client socket (tests/java/MetaClient.java's leak).
const B: Conn = Conn {
    cookie: 4103,
    local: "[::ffff:127.0.0.1]:56270",
    remote: "[::ffff:127.0.0.1]:37703",
};
/// Accepted by SERVER; closed late.
const C: Conn = Conn {
    cookie: 4104,
    local: "10.0.0.5:8080",
    remote: "10.0.0.8:40112",
};
/// In CLOSE_WAIT before tracing started (found by the snapshot).
const D: Conn = Conn {
    cookie: 4105,
    local: "10.0.0.5:5432",
    remote: "10.0.0.9:51234",
};
/// No process-context event ever named its owner.
const E: Conn = Conn {
    cookie: 4106,
    local: "[2001:db8::1]:443",
    remote: "[2001:db8::2]:50000",
};

/// Stack ids as the agent numbers them (per process for user stacks,
/// `pid` 0 for kernel stacks).
const LEAKY_OPEN: i32 = 1;
const LEAKY_CHILD_CLOSE: i32 = 2;
const JAVA_OPEN: i32 = 3;
const SERVER_CLOSE: i32 = 4;
const KERNEL_CONNECT: i32 = 7;

fn header(kind: EventKind, t_ms: u64, t: Task, cookie: u64, ustack: i32, kstack: i32) -> Header {
    Header {
        kind: kind as u32,
        cpu: 1,
        ktime_ns: T0 + t_ms * MS,
        tgid: t.pid,
        tid: t.tid,
        comm: Comm::from_str(t.comm).0,
        cookie,
        skaddr: 0xffff_8881_0000_0000 + cookie * 0x1000,
        ustack,
        kstack,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a valid socket address")
}

/// A state change; `stacks` (user, kernel) only for connect's transition.
fn state(t_ms: u64, t: Task, c: &Conn, old: u8, new: u8, rx_queue: u32, stacks: (i32, i32)) -> Input {
    let (local, remote) = (addr(c.local), addr(c.remote));
    let raw = |a: IpAddr| match a {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            b
        }
        IpAddr::V6(v6) => v6.octets(),
    };
    let ev = StateEvent {
        header: header(EventKind::State, t_ms, t, c.cookie, stacks.0, stacks.1),
        saddr: raw(local.ip()),
        daddr: raw(remote.ip()),
        sport: local.port(),
        dport: remote.port(),
        family: if local.is_ipv6() {
            tracer_common::event::AF_INET6
        } else {
            tracer_common::event::AF_INET
        },
        oldstate: old,
        newstate: new,
        rx_queue,
        _pad: 0,
    };
    // The test's own addresses must survive the wire encoding, or the
    // golden output would show something else than the script says.
    assert_eq!(Endpoints::from_event(&ev), Endpoints { local, remote }, "{}", c.local);
    Input::Kernel(Event::State(ev))
}

fn fd_event(kind: EventKind, t_ms: u64, t: Task, c: &Conn, fd: i32, ustack: i32) -> Input {
    let ev = FdEvent {
        header: header(kind, t_ms, t, c.cookie, ustack, NO_STACK),
        fd,
        _pad: 0,
    };
    Input::Kernel(match kind {
        EventKind::Accept => Event::Accept(ev),
        _ => Event::Close(ev),
    })
}

fn process(t: Task, cmdline: &str) -> Input {
    Input::Process(ProcessInput {
        pid: t.pid,
        info: ProcInfo {
            comm: t.comm.into(),
            cmdline: cmdline.into(),
        },
    })
}

fn stack(pid: u32, id: i32, frames: Result<Vec<Frame>, &str>, truncated: Option<&str>) -> Input {
    Input::Stack(StackInput {
        key: StackKey { pid, id },
        frames: frames.map_err(str::to_string),
        truncated: truncated.map(str::to_string),
    })
}

fn frame(ip: u64, kind: FrameKind, symbol: &str, module: Option<&str>, file: Option<&str>, line: Option<u32>) -> Frame {
    Frame {
        ip: format!("{ip:#x}"),
        symbol: Some(symbol.into()),
        module: module.map(str::to_string),
        offset: None,
        file: file.map(str::to_string),
        line,
        kernel: kind == FrameKind::Kernel,
        kind,
        reason: None,
    }
}

/// Named by neither blazesym nor the JVM: module and file offset only.
fn unnamed(ip: u64, module: &str, offset: u64, reason: &str) -> Frame {
    Frame {
        module: Some(module.into()),
        offset: Some(format!("{offset:#x}")),
        ..Frame::raw(ip, FrameKind::Native, reason.into())
    }
}

fn holder(t: Task, fd: i32) -> HolderOut {
    HolderOut {
        pid: t.pid,
        comm: t.comm.into(),
        fd,
    }
}

fn evidence(c: &Conn, unread: u32, holders: Vec<HolderOut>) -> (u64, Evidence) {
    (
        c.cookie,
        Evidence {
            unread_now: Some(unread),
            holders,
            found: true,
        },
    )
}

fn tick(t_ms: u64) -> Input {
    Input::Tick(T0 + t_ms * MS)
}

/// What a session does, in order.
enum Step {
    Feed(Input),
    /// `tracer live` prints a status line now and then.
    Status,
}

fn leaky_open_stack() -> Input {
    stack(
        LEAKY.pid,
        LEAKY_OPEN,
        Ok(vec![
            frame(
                0x7f3a_1c2f_1a2b,
                FrameKind::Native,
                "__libc_connect",
                Some("/usr/lib/x86_64-linux-gnu/libc.so.6"),
                Some("./socket/../sysdeps/unix/sysv/linux/connect.c"),
                Some(26),
            ),
            unnamed(
                0x7f3a_1c4d_4e5f,
                "/opt/vendor/libhttp.so",
                0x4e5f,
                "symbolization source has no or no relevant symbols",
            ),
            frame(
                0x5581_0000_11c9,
                FrameKind::Native,
                "open_connection",
                Some("/tmp/leaky"),
                Some("/tmp/leaky.c"),
                Some(11),
            ),
            frame(
                0x5581_0000_1200,
                FrameKind::Native,
                "main",
                Some("/tmp/leaky"),
                Some("/tmp/leaky.c"),
                Some(14),
            ),
        ]),
        None,
    )
}

/// A JVM's stack with every kind of Java frame, cut short because the
/// JVM runs compiled code without frame pointers.
fn java_open_stack() -> Input {
    let java = |ip, kind, symbol, file, line| frame(ip, kind, symbol, None, Some(file), line);
    stack(
        JAVA.pid,
        JAVA_OPEN,
        Ok(vec![
            frame(
                0x7f11_2233_1a2b,
                FrameKind::Native,
                "__libc_connect",
                Some("/usr/lib/x86_64-linux-gnu/libc.so.6"),
                Some("./socket/../sysdeps/unix/sysv/linux/connect.c"),
                Some(26),
            ),
            frame(
                0x7f11_4455_0f00,
                FrameKind::Native,
                "Java_sun_nio_ch_Net_connect0",
                Some("/usr/lib/jvm/java-17-openjdk-amd64/lib/libnio.so"),
                None,
                None,
            ),
            // A native method's wrapper: the JVM knows the method, not a line.
            java(
                0x7f10_e000_1000,
                FrameKind::Compiled,
                "sun.nio.ch.Net.connect0(boolean, java.io.FileDescriptor, java.net.InetAddress, int)",
                "Net.java",
                None,
            ),
            java(
                0x7f10_d800_2000,
                FrameKind::Interpreted,
                "sun.nio.ch.Net.connect(java.net.ProtocolFamily, java.io.FileDescriptor, java.net.InetAddress, int)",
                "Net.java",
                Some(579),
            ),
            java(
                0x7f10_e000_3000,
                FrameKind::Inlined,
                "java.net.HttpURLConnection.getResponseCode()",
                "HttpURLConnection.java",
                Some(529),
            ),
            java(
                0x7f10_e000_3000,
                FrameKind::Compiled,
                "MetaClient.fetchMetadata(java.lang.String)",
                "MetaClient.java",
                Some(56),
            ),
        ]),
        Some(
            "compiled Java code without frame pointers: the callers of MetaClient.fetchMetadata(java.lang.String) \
             cannot be found (run the JVM with -XX:+PreserveFramePointer)",
        ),
    )
}

fn java_connect() -> Vec<Input> {
    vec![
        process(JAVA, "java -cp tests/java MetaClient http://127.0.0.1:37703/"),
        java_open_stack(),
        state(30, JAVA, &B, tcp::CLOSE, tcp::SYN_SENT, 0, (JAVA_OPEN, NO_STACK)),
        state(
            31,
            SOFTIRQ,
            &B,
            tcp::SYN_SENT,
            tcp::ESTABLISHED,
            0,
            (NO_STACK, NO_STACK),
        ),
    ]
}

fn java_fin() -> Input {
    // 26 unread bytes, plus one for the FIN.
    state(
        102,
        SOFTIRQ,
        &B,
        tcp::ESTABLISHED,
        tcp::CLOSE_WAIT,
        27,
        (NO_STACK, NO_STACK),
    )
}

/// `tracer live --json --events --kernel-stacks`, host-wide, one optional
/// hook missing: every line type but a recording's.
fn live_steps() -> Vec<Step> {
    let mut v = vec![
        process(DAEMON, "/usr/sbin/old-daemon --foreground"),
        Input::Snapshot(SnapshotInput {
            ns: T0,
            sockets: vec![SnapshotSocket {
                cookie: D.cookie,
                state: tcp::CLOSE_WAIT,
                endpoints: Endpoints {
                    local: addr(D.local),
                    remote: addr(D.remote),
                },
                holder: Some((DAEMON.pid, Comm::from_str(DAEMON.comm), 5)),
                last_ack_age_ns: Some(30_000 * MS),
            }],
        }),
        process(LEAKY, "./leaky http://127.0.0.1:18181/"),
        leaky_open_stack(),
        stack(
            0,
            KERNEL_CONNECT,
            Ok(vec![
                frame(
                    0xffff_ffff_8a21_3c40,
                    FrameKind::Kernel,
                    "tcp_connect",
                    None,
                    None,
                    None,
                ),
                frame(
                    0xffff_ffff_8a1b_2d10,
                    FrameKind::Kernel,
                    "__sys_connect",
                    None,
                    None,
                    None,
                ),
            ]),
            None,
        ),
    ];
    let connect_stacks = (LEAKY_OPEN, KERNEL_CONNECT);
    v.extend([
        state(10, LEAKY, &A, tcp::CLOSE, tcp::SYN_SENT, 0, connect_stacks),
        state(
            11,
            SOFTIRQ,
            &A,
            tcp::SYN_SENT,
            tcp::ESTABLISHED,
            0,
            (NO_STACK, NO_STACK),
        ),
        state(20, LEAKY, &A2, tcp::CLOSE, tcp::SYN_SENT, 0, connect_stacks),
        state(
            21,
            SOFTIRQ,
            &A2,
            tcp::SYN_SENT,
            tcp::ESTABLISHED,
            0,
            (NO_STACK, NO_STACK),
        ),
    ]);
    v.extend(java_connect());
    v.extend([
        process(SERVER, "/usr/bin/server --port 8080"),
        state(
            40,
            SOFTIRQ,
            &C,
            tcp::SYN_RECV,
            tcp::ESTABLISHED,
            0,
            (NO_STACK, NO_STACK),
        ),
        // Over its --stack-rate budget: no stack.
        fd_event(EventKind::Accept, 41, SERVER, &C, 9, STACKS_SAMPLED_OUT),
        state(
            50,
            SOFTIRQ,
            &E,
            tcp::ESTABLISHED,
            tcp::CLOSE_WAIT,
            1,
            (NO_STACK, NO_STACK),
        ),
        state(
            100,
            SOFTIRQ,
            &A,
            tcp::ESTABLISHED,
            tcp::CLOSE_WAIT,
            27,
            (NO_STACK, NO_STACK),
        ),
        state(
            101,
            SOFTIRQ,
            &A2,
            tcp::ESTABLISHED,
            tcp::CLOSE_WAIT,
            27,
            (NO_STACK, NO_STACK),
        ),
        java_fin(),
        state(
            103,
            SOFTIRQ,
            &C,
            tcp::ESTABLISHED,
            tcp::CLOSE_WAIT,
            1,
            (NO_STACK, NO_STACK),
        ),
        process(LEAKY_CHILD, "./leaky http://127.0.0.1:18181/"),
        stack(
            LEAKY_CHILD.pid,
            LEAKY_CHILD_CLOSE,
            Ok(vec![
                frame(
                    0x7f3a_1c2f_0b00,
                    FrameKind::Native,
                    "__close",
                    Some("/usr/lib/x86_64-linux-gnu/libc.so.6"),
                    Some("./io/../sysdeps/unix/sysv/linux/close.c"),
                    Some(27),
                ),
                frame(
                    0x5581_0000_1300,
                    FrameKind::Native,
                    "child_main",
                    Some("/tmp/leaky"),
                    Some("/tmp/leaky.c"),
                    Some(30),
                ),
            ]),
            Some("deeper than 127 frames: the outermost frames are cut (counted in stack_walk_truncated)"),
        ),
        fd_event(EventKind::Close, 200, LEAKY_CHILD, &A, 3, LEAKY_CHILD_CLOSE),
        // Gathered for the leaks due at the next tick; none for B (its
        // process is gone) nor E (sock_diag did not list it).
        Input::Evidence(EvidenceInput {
            ns: T0 + 1200 * MS,
            items: vec![
                evidence(&A, 26, vec![holder(LEAKY, 3), holder(LEAKY_SIBLING, 3)]),
                evidence(&A2, 26, vec![holder(LEAKY, 4)]),
                evidence(&C, 0, vec![holder(SERVER, 9)]),
                evidence(&D, 0, vec![holder(DAEMON, 5)]),
            ],
        }),
        // Every CLOSE_WAIT socket is due by now.
        tick(1200),
        Input::Stats(StatsInput {
            ns: T0 + 1200 * MS,
            kernel: KernelStats {
                generated: 17,
                ringbuf_drops: 3,
                fd_unresolved: 1,
                stack_errors: 1,
                stacks_sampled_out: 1,
                stack_walk_truncated: 1,
                ..KernelStats::default()
            },
        }),
    ]);
    let mut steps: Vec<Step> = v.into_iter().map(Step::Feed).collect();
    steps.push(Step::Status);
    steps.extend(
        [
            stack(
                SERVER.pid,
                SERVER_CLOSE,
                Err("the task's user registers could not be read"),
                None,
            ),
            fd_event(EventKind::Close, 1500, SERVER, &C, 9, SERVER_CLOSE),
            state(
                1500,
                SERVER,
                &C,
                tcp::CLOSE_WAIT,
                tcp::LAST_ACK,
                0,
                (NO_STACK, NO_STACK),
            ),
            tick(2000),
            Input::End(EndInput {
                ns: T0 + 2000 * MS,
                reason: "duration".into(),
            }),
        ]
        .into_iter()
        .map(Step::Feed),
    );
    steps
}

/// Runs one session the way `live` and `report` do: start, inputs through
/// the engine, the summary (`recording` set as `report` sets it).
fn run(
    start: &Start,
    events: bool,
    steps: Vec<Step>,
    reason: &'static str,
    recording: Option<RecordingInfo>,
) -> String {
    let mut sink = JsonSink::new(Vec::new());
    let corr = Correlator::new(LEAK_AFTER_MS * MS, start.filter_pid, 1000);
    let mut engine = Engine::new(corr, wall(), events);
    sink.start(start).unwrap();
    for step in steps {
        match step {
            Step::Feed(input) => engine.feed(&input, &mut sink).unwrap(),
            Step::Status => {
                // As `live` fills in what only its stack symbolizer knows.
                let mut st = engine.status(0);
                st.stacks_held = Some(3);
                st.stacks_cap = Some(65536);
                sink.status(&st).unwrap();
            }
        }
    }
    let mut summary = engine.summary(reason, 0, &mut sink).unwrap();
    summary.recording = recording;
    sink.summary(&summary).unwrap();
    String::from_utf8(sink.into_inner()).expect("JSON is UTF-8")
}

fn live_session() -> String {
    let hooks = HOOKS
        .iter()
        .map(|h| {
            let missing = h.program == "sys_enter_close_range";
            HookStatus {
                hook: h.program,
                attached: !missing,
                error: missing.then(|| "tracepoint syscalls/sys_enter_close_range not found".into()),
                lost: missing.then_some(h.purpose),
            }
        })
        .collect();
    let start = Start {
        hooks,
        filter_pid: None,
        leak_after_ms: LEAK_AFTER_MS,
        preexisting_sockets: 1,
    };
    run(&start, true, live_steps(), "duration", None)
}

/// `tracer report --json --pid 300` of a recording with a damaged record:
/// no hooks, the filter, a process exit, and the recording block.
fn report_session() -> String {
    let start = Start {
        hooks: Vec::new(),
        filter_pid: Some(JAVA.pid),
        leak_after_ms: LEAK_AFTER_MS,
        preexisting_sockets: 0,
    };
    let mut inputs = java_connect();
    inputs.extend([
        java_fin(),
        tick(1102),
        Input::ProcessExit(ExitInput {
            ns: T0 + 1200 * MS,
            pid: JAVA.pid,
        }),
        Input::End(EndInput {
            ns: T0 + 1200 * MS,
            reason: "process_exit".into(),
        }),
    ]);
    let recording = RecordingInfo {
        files: vec!["java.trace".into()],
        records: 9,
        damage: vec!["java.trace: corrupt data at byte 4096; skipped 512 bytes to the next valid record".into()],
        ended_early: false,
    };
    run(
        &start,
        false,
        inputs.into_iter().map(Step::Feed).collect(),
        "process_exit",
        Some(recording),
    )
}

fn sessions() -> [(&'static str, String); 2] {
    [("live.jsonl", live_session()), ("report.jsonl", report_session())]
}

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/sink/testdata")
}

const UPDATE_HINT: &str =
    "if the change is intended, run `UPDATE_GOLDEN=1 cargo test -p tracer golden` and review the diff of tracer/src/sink/testdata/";

#[test]
fn golden_output() {
    let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    for (name, actual) in sessions() {
        let path = testdata().join(name);
        if update {
            std::fs::write(&path, &actual).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            continue;
        }
        let expected =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}; {UPDATE_HINT}", path.display()));
        if expected == actual {
            continue;
        }
        let (exp, act): (Vec<_>, Vec<_>) = (expected.lines().collect(), actual.lines().collect());
        let n = exp.iter().zip(&act).take_while(|(e, a)| e == a).count();
        panic!(
            "the JSON output differs from {} at line {}:\nexpected: {}\nactual:   {}\n{UPDATE_HINT}",
            path.display(),
            n + 1,
            exp.get(n).unwrap_or(&"<end of file>"),
            act.get(n).unwrap_or(&"<end of output>"),
        );
    }
}

// ---- docs/json.md: its format, as the contract test reads it ----
//
// A section is a heading whose text starts with a code span: the name of
// a line type (`leak`) or of a nested object (`frame`). Each field table
// in it has the columns `field`, `type` and `null / absent` (others are
// for readers). In a row:
// - `field`: a code span with the field's name; a dotted path for a field
//   of a nested object that has no section of its own (`stats.kernel`), with
//   `[]` for the elements of an array (`list[].name`); or `...name`: every
//   field of section `name` belongs here too;
// - `type`: starts with the JSON type (string, integer, boolean, object,
//   array); a code span in it names the section that describes the object,
//   or each element of the array (array of [`frame`](#frame));
// - `null / absent`: "never", or says when the field is null and/or when it
//   is absent, with those words.
// Cells never contain `|`.

#[derive(Debug)]
struct FieldDoc {
    ty: String,
    object: Option<String>,
    null: bool,
    absent: bool,
}

#[derive(Debug, Default)]
struct Section {
    fields: BTreeMap<String, FieldDoc>,
    includes: Vec<String>,
}

type Doc = BTreeMap<String, Section>;

fn code_spans(s: &str) -> impl Iterator<Item = &str> {
    s.split('`').skip(1).step_by(2)
}

fn parse_doc(text: &str) -> Result<Doc, String> {
    let mut doc = Doc::new();
    let mut section: Option<String> = None;
    // Column indices of the table being read: (field, type, null / absent).
    let mut table: Option<Option<(usize, usize, usize)>> = None;
    for (n, line) in text.lines().enumerate() {
        let at = |msg: &str| format!("docs/json.md line {}: {msg}", n + 1);
        let line = line.trim();
        if line.starts_with('#') {
            let heading = line.trim_start_matches('#').trim_start();
            section = heading
                .starts_with('`')
                .then(|| code_spans(heading).next().map(str::to_string))
                .flatten();
            if let Some(s) = &section {
                if doc.insert(s.clone(), Section::default()).is_some() {
                    return Err(at(&format!("section `{s}` appears twice")));
                }
            }
            continue;
        }
        if !line.starts_with('|') {
            table = None;
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let Some(cols) = table else {
            let col = |name: &str| cells.iter().position(|c| c.eq_ignore_ascii_case(name));
            table = Some(match (col("field"), col("type"), col("null / absent")) {
                (Some(f), Some(t), Some(n)) => Some((f, t, n)),
                (Some(_), ..) => return Err(at("a field table needs the columns `type` and `null / absent`")),
                _ => None,
            });
            continue;
        };
        let Some((fc, tc, nc)) = cols else { continue };
        if cells.iter().all(|c| c.chars().all(|ch| matches!(ch, '-' | ':' | ' '))) {
            continue;
        }
        let Some(name) = &section else {
            return Err(at("a field table outside a section named by a code span"));
        };
        let cell = |i: usize| cells.get(i).copied().unwrap_or("");
        let field = code_spans(cell(fc))
            .next()
            .ok_or_else(|| at("the field cell has no code span"))?;
        let sec = doc.get_mut(name).expect("inserted at its heading");
        if let Some(other) = field.strip_prefix("...") {
            sec.includes.push(other.to_string());
            continue;
        }
        let ty: String = cell(tc)
            .chars()
            .take_while(char::is_ascii_alphabetic)
            .collect::<String>()
            .to_lowercase();
        if !["string", "integer", "boolean", "object", "array"].contains(&ty.as_str()) {
            return Err(at(&format!("`{field}`: the type cell must start with a JSON type")));
        }
        let when = cell(nc).to_lowercase();
        let fd = FieldDoc {
            ty,
            object: code_spans(cell(tc)).next().map(str::to_string),
            null: when.contains("null"),
            absent: when.contains("absent"),
        };
        if when.starts_with("never") == (fd.null || fd.absent) {
            return Err(at(&format!(
                "`{field}`: `null / absent` is either \"never\" or says when it is null or absent"
            )));
        }
        if sec.fields.insert(field.to_string(), fd).is_some() {
            return Err(at(&format!("`{field}` is documented twice in `{name}`")));
        }
    }
    for (name, sec) in &doc {
        for target in sec
            .includes
            .iter()
            .chain(sec.fields.values().filter_map(|f| f.object.as_ref()))
        {
            if !doc.contains_key(target) {
                return Err(format!(
                    "docs/json.md: `{name}` refers to section `{target}`, which does not exist"
                ));
            }
        }
    }
    Ok(doc)
}

/// How a documented field was seen in the output.
#[derive(Debug, Default)]
struct Seen {
    value: bool,
    null: bool,
    absent: bool,
}

struct Checker<'a> {
    doc: &'a Doc,
    /// (section that documents it, field path) -> how it was seen.
    seen: BTreeMap<(String, String), Seen>,
    /// Each disagreement once, with where it was first seen.
    errors: BTreeMap<String, String>,
}

impl Checker<'_> {
    fn error(&mut self, msg: String, at: &str) {
        self.errors.entry(msg).or_insert_with(|| at.to_string());
    }

    /// The field and the section that documents it: `section` itself or
    /// one it includes.
    fn lookup(&self, section: &str, path: &str) -> Option<(String, &FieldDoc)> {
        let sec = self.doc.get(section)?;
        if let Some(f) = sec.fields.get(path) {
            return Some((section.to_string(), f));
        }
        sec.includes.iter().find_map(|s| self.lookup(s, path))
    }

    /// Every field of `section`, its includes' too: (documenting section, path).
    fn all_fields(&self, section: &str) -> Vec<(String, String)> {
        let Some(sec) = self.doc.get(section) else {
            return Vec::new();
        };
        let mut v: Vec<_> = sec.fields.keys().map(|p| (section.to_string(), p.clone())).collect();
        for s in &sec.includes {
            v.extend(self.all_fields(s));
        }
        v
    }

    /// Checks one JSON object described by `section`, its fields' paths
    /// starting with `prefix` (for dotted paths into nested objects).
    fn object(&mut self, section: &str, prefix: &str, obj: &Map<String, Value>, line: &str) {
        for (key, value) in obj {
            let path = format!("{prefix}{key}");
            let documented = self
                .lookup(section, &path)
                .map(|(s, f)| (s, f.ty.clone(), f.object.clone()));
            let Some((owner, ty, object)) = documented else {
                self.error(
                    format!("`{section}` field `{path}` is in the output but not in docs/json.md"),
                    line,
                );
                self.descend(section, &path, None, value, line);
                continue;
            };
            let seen = self.seen.entry((owner.clone(), path.clone())).or_default();
            if value.is_null() {
                seen.null = true;
            } else {
                seen.value = true;
                if json_type(value) != ty {
                    let msg = format!(
                        "`{owner}` field `{path}` is documented as {ty} but is {}",
                        json_type(value)
                    );
                    self.error(msg, line);
                }
            }
            self.descend(section, &path, object.as_deref(), value, line);
        }
        for (owner, path) in self.all_fields(section) {
            let direct = path.strip_prefix(prefix).is_some_and(|rest| !rest.contains(['.', '[']));
            if direct && !obj.contains_key(&path[prefix.len()..]) {
                self.seen.entry((owner, path)).or_default().absent = true;
            }
        }
    }

    fn descend(&mut self, section: &str, path: &str, object: Option<&str>, value: &Value, line: &str) {
        let (target, prefix) = match object {
            Some(s) => (s.to_string(), String::new()),
            None => (
                section.to_string(),
                format!("{path}{}", if value.is_array() { "[]." } else { "." }),
            ),
        };
        let items: Vec<&Value> = match value {
            Value::Array(a) => a.iter().collect(),
            v => vec![v],
        };
        for item in items {
            if let Some(o) = item.as_object() {
                self.object(&target, &prefix, o, line);
            }
        }
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[test]
fn json_docs_match_the_output() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/json.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let doc = parse_doc(&text).unwrap_or_else(|e| panic!("{e}"));
    let mut checker = Checker {
        doc: &doc,
        seen: BTreeMap::new(),
        errors: BTreeMap::new(),
    };
    let mut sections_used = BTreeSet::new();
    for (file, output) in sessions() {
        for (n, line) in output.lines().enumerate() {
            let at = format!("{file} line {}", n + 1);
            let mut obj = match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(o)) => o,
                other => panic!("{at}: not a JSON object: {other:?}"),
            };
            // The sink's promise: "type" first, so a reader can dispatch
            // before parsing the rest of the line.
            assert_eq!(obj.keys().next().map(String::as_str), Some("type"), "{at}");
            let Some(Value::String(kind)) = obj.shift_remove("type") else {
                panic!("{at}: \"type\" is not a string");
            };
            if !doc.contains_key(&kind) {
                checker.error(format!("line type `{kind}` has no section in docs/json.md"), &at);
                continue;
            }
            sections_used.insert(kind.clone());
            checker.object(&kind, "", &obj, &at);
        }
    }
    let mut problems: Vec<String> = checker
        .errors
        .iter()
        .map(|(msg, at)| format!("{msg} (e.g. {at})"))
        .collect();
    for (name, sec) in &doc {
        for (field, f) in &sec.fields {
            let say = |what: &str| format!("`{name}` field `{field}` {what}");
            let seen = checker.seen.get(&(name.clone(), field.clone()));
            let Some(seen) = seen.filter(|s| s.value) else {
                problems.push(say(
                    "is documented but never has a value in the output: removed or renamed, or a case the scenario in golden_tests.rs does not reach",
                ));
                continue;
            };
            for (documented, happened, word) in [(f.null, seen.null, "null"), (f.absent, seen.absent, "absent")] {
                if documented && !happened {
                    problems.push(say(&format!(
                        "is documented as sometimes {word}, but never is in the output: make the scenario in golden_tests.rs reach that case, or fix the doc"
                    )));
                }
                if happened && !documented {
                    problems.push(say(&format!(
                        "is sometimes {word} in the output, but its `null / absent` cell does not say when"
                    )));
                }
            }
        }
        let referenced = doc
            .values()
            .any(|s| s.includes.contains(name) || s.fields.values().any(|f| f.object.as_ref() == Some(name)));
        if !sections_used.contains(name) && !referenced {
            problems.push(format!(
                "section `{name}` is neither a line type in the output nor an object another section refers to"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/json.md and the JSON output (tracer/src/sink/golden_tests.rs) disagree:\n- {}",
        problems.join("\n- ")
    );
}
