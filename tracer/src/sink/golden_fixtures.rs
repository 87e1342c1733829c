//! The building blocks of the golden sessions (`golden_tests.rs`): tasks,
//! connections, events, stacks and evidence, at fixed times.

use std::net::{IpAddr, SocketAddr};

use tracer_common::{tcp, EventKind, FdEvent, Header, StateEvent, NO_STACK};

use crate::{
    clock::WallClock,
    correlate::{Comm, Endpoints},
    decode::Event,
    evidence::{Evidence, HolderOut},
    input::{Input, ProcessInput, StackInput, StackKey},
    procs::{container, ProcInfo},
    stacks::{Frame, FrameKind},
};

pub(super) const MS: u64 = 1_000_000;
/// Kernel (CLOCK_MONOTONIC) time of the first input: any fixed value.
pub(super) const T0: u64 = 3_600_000 * MS;
/// Wall-clock time at `T0`, 2026-12-03T12:00:00Z: a fixed offset, as a
/// recording stores it, makes every "time" field the same from run to run.
pub(super) const WALL_AT_T0_NS: i64 = 1_796_299_200 * 1_000_000_000;
pub(super) const LEAK_AFTER_MS: u64 = 1000;

pub(super) fn wall() -> WallClock {
    WallClock::from_offset(WALL_AT_T0_NS - T0 as i64)
}

#[derive(Clone, Copy)]
pub(super) struct Task {
    pub(super) pid: u32,
    pub(super) tid: u32,
    pub(super) comm: &'static str,
}

pub(super) const fn task(pid: u32, tid: u32, comm: &'static str) -> Task {
    Task { pid, tid, comm }
}

pub(super) const LEAKY: Task = task(100, 100, "leaky");
/// A forked child of LEAKY: closes its copy of the fd, which does not close
/// the socket (LEAKY and LEAKY_SIBLING still hold it).
pub(super) const LEAKY_CHILD: Task = task(101, 101, "leaky");
pub(super) const LEAKY_SIBLING: Task = task(102, 102, "leaky");
pub(super) const SERVER: Task = task(200, 203, "server");
pub(super) const JAVA: Task = task(300, 312, "java");
/// Held a CLOSE_WAIT socket before tracing started.
pub(super) const DAEMON: Task = task(400, 400, "old-daemon");
/// Whatever ran when a packet arrived: never taken as a socket's owner.
pub(super) const SOFTIRQ: Task = task(0, 0, "swapper/1");

pub(super) struct Conn {
    pub(super) cookie: u64,
    pub(super) local: &'static str,
    pub(super) remote: &'static str,
}

/// Client sockets of LEAKY: same stack, same server, so one group of two.
pub(super) const A: Conn = Conn {
    cookie: 4101,
    local: "127.0.0.1:42698",
    remote: "127.0.0.1:18181",
};
pub(super) const A2: Conn = Conn {
    cookie: 4102,
    local: "127.0.0.1:42700",
    remote: "127.0.0.1:18181",
};
/// The JVM's client socket (tests/java/MetaClient.java's leak).
pub(super) const B: Conn = Conn {
    cookie: 4103,
    local: "[::ffff:127.0.0.1]:56270",
    remote: "[::ffff:127.0.0.1]:37703",
};
/// Accepted by SERVER; closed late.
pub(super) const C: Conn = Conn {
    cookie: 4104,
    local: "10.0.0.5:8080",
    remote: "10.0.0.8:40112",
};
/// In CLOSE_WAIT before tracing started (found by the snapshot).
pub(super) const D: Conn = Conn {
    cookie: 4105,
    local: "10.0.0.5:5432",
    remote: "10.0.0.9:51234",
};
/// No process-context event ever named its owner.
pub(super) const E: Conn = Conn {
    cookie: 4106,
    local: "[2001:db8::1]:443",
    remote: "[2001:db8::2]:50000",
};

/// Stack ids as the agent numbers them (per process for user stacks,
/// `pid` 0 for kernel stacks).
pub(super) const LEAKY_OPEN: i32 = 1;
pub(super) const LEAKY_CHILD_CLOSE: i32 = 2;
pub(super) const JAVA_OPEN: i32 = 3;
pub(super) const SERVER_CLOSE: i32 = 4;
pub(super) const KERNEL_CONNECT: i32 = 7;

pub(super) fn header(kind: EventKind, t_ms: u64, t: Task, cookie: u64, ustack: i32, kstack: i32) -> Header {
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

pub(super) fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a valid socket address")
}

/// A state change; `stacks` (user, kernel) only for connect's transition.
pub(super) fn state(t_ms: u64, t: Task, c: &Conn, old: u8, new: u8, rx_queue: u32, stacks: (i32, i32)) -> Input {
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

pub(super) fn fd_event(kind: EventKind, t_ms: u64, t: Task, c: &Conn, fd: i32, ustack: i32) -> Input {
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

/// A process whose cgroup is unknown (as an older recording has it).
pub(super) fn process(t: Task, cmdline: &str) -> Input {
    process_in(t, cmdline, "", None)
}

/// A process in `cgroup`: a container's when the cgroup is a runtime's,
/// where it is `container_pid`.
pub(super) fn process_in(t: Task, cmdline: &str, cgroup: &str, container_pid: Option<u32>) -> Input {
    Input::Process(ProcessInput {
        pid: t.pid,
        info: ProcInfo {
            comm: t.comm.into(),
            cmdline: cmdline.into(),
            cgroup: cgroup.into(),
            container_id: container::id_from_cgroup(cgroup),
            container_pid,
        },
    })
}

/// The network namespace the agent runs in (the host's).
pub(super) const HOST_NETNS: u64 = 4_026_531_833;
/// SERVER's container's.
pub(super) const CONTAINER_NETNS: u64 = 4_026_532_301;
/// SERVER's container (containerd under Kubernetes), where it is pid 7.
pub(super) const SERVER_CGROUP: &str = "/kubepods.slice/kubepods-burstable.slice/\
    kubepods-burstable-pod7c1e7e2a_54d2_4b9e_9f0e_0d6b7c2a9e11.slice/\
    cri-containerd-3f2a1b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7a8.scope";

pub(super) fn stack(pid: u32, id: i32, frames: Result<Vec<Frame>, &str>, truncated: Option<&str>) -> Input {
    Input::Stack(StackInput {
        key: StackKey { pid, id },
        frames: frames.map_err(str::to_string),
        truncated: truncated.map(str::to_string),
    })
}

pub(super) fn frame(
    ip: u64,
    kind: FrameKind,
    symbol: &str,
    module: Option<&str>,
    file: Option<&str>,
    line: Option<u32>,
) -> Frame {
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
pub(super) fn unnamed(ip: u64, module: &str, offset: u64, reason: &str) -> Frame {
    Frame {
        module: Some(module.into()),
        offset: Some(format!("{offset:#x}")),
        ..Frame::raw(ip, FrameKind::Native, reason.into())
    }
}

pub(super) fn holder(t: Task, fd: i32) -> HolderOut {
    HolderOut {
        pid: t.pid,
        comm: t.comm.into(),
        fd,
    }
}

pub(super) fn evidence(c: &Conn, unread: u32, holders: Vec<HolderOut>, netns: u64) -> (u64, Evidence) {
    (
        c.cookie,
        Evidence {
            unread_now: Some(unread),
            holders,
            found: true,
            netns: Some(netns),
            cookie: None,
        },
    )
}

pub(super) fn tick(t_ms: u64) -> Input {
    Input::Tick(T0 + t_ms * MS)
}

/// What a session does, in order.
pub(super) enum Step {
    Feed(Input),
    /// `tracer live` prints a status line now and then.
    Status,
}

pub(super) fn leaky_open_stack() -> Input {
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
pub(super) fn java_open_stack() -> Input {
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

pub(super) fn java_connect() -> Vec<Input> {
    vec![
        process_in(
            JAVA,
            "java -cp tests/java MetaClient http://127.0.0.1:37703/",
            "/system.slice/metaclient.service",
            None,
        ),
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

pub(super) fn java_fin() -> Input {
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
