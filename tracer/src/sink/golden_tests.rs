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
//!   documentation and the code cannot drift apart in either direction
//!   (`json_docs_tests.rs`).

use std::path::PathBuf;

use tracer_common::{tcp, EventKind, NO_STACK, STACKS_SAMPLED_OUT};

use super::{JsonSink, RecordingInfo, Sink, Start};
use crate::{
    correlate::{Comm, Correlator, Endpoints, SnapshotSocket},
    engine::Engine,
    input::{EndInput, EvidenceInput, ExitInput, Input, SnapshotInput, StatsInput},
    kernel::{hooks::HOOKS, HookStatus, KernelStats},
    stacks::FrameKind,
};

use super::golden_fixtures::*;

/// `tracer live --json --events --kernel-stacks`, host-wide, one optional
/// hook missing: every line type but a recording's.
pub(super) fn live_steps() -> Vec<Step> {
    let mut v = vec![
        // An old daemon in a docker container, pid 1 there.
        process_in(
            DAEMON,
            "/usr/sbin/old-daemon --foreground",
            "/system.slice/docker-9c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d.scope",
            Some(1),
        ),
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
        process_in(
            LEAKY,
            "./leaky http://127.0.0.1:18181/",
            "/user.slice/user-1000.slice/session-3.scope",
            None,
        ),
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
        process_in(SERVER, "/usr/bin/server --port 8080", SERVER_CGROUP, Some(7)),
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
                evidence(&A, 26, vec![holder(LEAKY, 3), holder(LEAKY_SIBLING, 3)], HOST_NETNS),
                evidence(&A2, 26, vec![holder(LEAKY, 4)], HOST_NETNS),
                evidence(&C, 0, vec![holder(SERVER, 9)], CONTAINER_NETNS),
                evidence(&D, 0, vec![holder(DAEMON, 5)], HOST_NETNS),
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
    run_with(&mut sink, start, events, steps, reason, recording);
    String::from_utf8(sink.into_inner()).expect("JSON is UTF-8")
}

/// [`run`] into any sink.
pub(super) fn run_with(
    sink: &mut dyn Sink,
    start: &Start,
    events: bool,
    steps: Vec<Step>,
    reason: &'static str,
    recording: Option<RecordingInfo>,
) {
    let corr = Correlator::new(LEAK_AFTER_MS * MS, start.filter_pid, 1000);
    let mut engine = Engine::new(corr, wall(), events);
    sink.start(start).unwrap();
    for step in steps {
        match step {
            Step::Feed(input) => engine.feed(&input, sink).unwrap(),
            Step::Status => {
                // As `live` fills in what only its stack symbolizer knows.
                let mut st = engine.status(0);
                st.stacks_held = Some(3);
                st.stacks_cap = Some(65536);
                sink.status(&st).unwrap();
            }
        }
    }
    let mut summary = engine.summary(reason, 0, sink).unwrap();
    // As the live agent sets it (a report has none).
    if recording.is_none() {
        summary.stats.delivered = Some(summary.stats.agent.events);
    }
    summary.recording = recording;
    sink.summary(&summary).unwrap();
}

fn live_session() -> String {
    run(&live_start(), true, live_steps(), "duration", None)
}

/// `live`'s start on Debian 11's kernel: host-wide, every fallback taken,
/// close_range not attached for want of bpf_loop, no sock_diag.
pub(super) fn live_start() -> Start {
    let hooks = HOOKS
        .iter()
        .map(|h| {
            let missing = h.name == "sys_enter_close_range";
            HookStatus {
                hook: h.name,
                attached: !missing,
                error: missing.then(|| "this kernel lacks bpf_loop (Linux 5.17+)".into()),
                lost: missing.then_some(h.purpose),
            }
        })
        .collect();
    Start {
        hooks,
        filter_pid: None,
        leak_after_ms: LEAK_AFTER_MS,
        preexisting_sockets: 1,
        kernel: Some("5.10.0-46-amd64".into()),
        snapshot_error: Some(
            "sock_diag error: No such file or directory (os error 2); are the inet_diag and tcp_diag modules loadable?"
                .into(),
        ),
        fallbacks: crate::kernel::compat::statuses(u32::MAX),
    }
}

/// `tracer report --json --pid 300` of a recording with a damaged record:
/// no hooks, the filter, a process exit, and the recording block.
fn report_session() -> String {
    let start = Start {
        hooks: Vec::new(),
        filter_pid: Some(JAVA.pid),
        leak_after_ms: LEAK_AFTER_MS,
        preexisting_sockets: 0,
        kernel: None,
        snapshot_error: None,
        fallbacks: Vec::new(),
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

pub(super) fn sessions() -> [(&'static str, String); 2] {
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
