//! The engine: its caches over a long run (names and stacks that no tracked
//! socket refers to are forgotten in rounds, never what a leak still
//! needs), and which cookie a leak shows.

use tracer_common::{tcp, EventKind, Header, StateEvent, NO_STACK};

use super::*;
use crate::{
    correlate::Comm,
    input::{EvidenceInput, ProcessInput},
    sink::NullSink,
    stacks::Frame,
};

const MS: u64 = 1_000_000;
const LEAK_AFTER: u64 = 1000 * MS;

fn state(t_ms: u64, pid: u32, cookie: u64, old: u8, new: u8) -> Input {
    Input::Kernel(Event::State(StateEvent {
        header: Header {
            kind: EventKind::State as u32,
            cpu: 0,
            ktime_ns: t_ms * MS,
            tgid: pid,
            tid: pid,
            comm: Comm::from_str("client").0,
            cookie,
            skaddr: 0xa000 + cookie,
            // Stack id = pid: one stack per process.
            ustack: pid as i32,
            kstack: NO_STACK,
        },
        saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        daddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sport: 40000,
        dport: 8080,
        family: 2,
        oldstate: old,
        newstate: new,
        rx_queue: 1,
        _pad: 0,
    }))
}

/// Process `pid`'s name and stack, then its connection (cookie = pid).
fn connection(pid: u32, t_ms: u64) -> Vec<Input> {
    let cookie = u64::from(pid);
    vec![
        Input::Process(ProcessInput {
            pid,
            info: ProcInfo {
                comm: "client".into(),
                cmdline: format!("client --id {pid}"),
                ..ProcInfo::default()
            },
        }),
        Input::Stack(StackInput {
            key: StackKey { pid, id: pid as i32 },
            frames: Ok(vec![Frame::raw(
                0x1000 + u64::from(pid),
                Default::default(),
                "test".into(),
            )]),
            truncated: None,
        }),
        state(t_ms, pid, cookie, tcp::CLOSE, tcp::SYN_SENT),
        state(t_ms, pid, cookie, tcp::SYN_SENT, tcp::ESTABLISHED),
        state(t_ms + 1, pid, cookie, tcp::ESTABLISHED, tcp::CLOSE_WAIT),
    ]
}

fn closed(pid: u32, t_ms: u64) -> Vec<Input> {
    let cookie = u64::from(pid);
    vec![
        state(t_ms, pid, cookie, tcp::CLOSE_WAIT, tcp::LAST_ACK),
        state(t_ms, pid, cookie, tcp::LAST_ACK, tcp::CLOSE),
    ]
}

/// A host-wide engine with room for every socket.
fn engine() -> Engine {
    Engine::new(
        Correlator::new(LEAK_AFTER, None, 1 << 20),
        WallClock::from_offset(0),
        false,
    )
}

#[test]
fn forgets_only_what_no_socket_refers_to() {
    let mut e = engine();
    let sink = &mut NullSink;
    let n = (CACHE_CAP + 100) as u32;
    // Every process's socket closes at once, except the first ten, which
    // stay in CLOSE_WAIT: leaks.
    for pid in 1..=n {
        for i in connection(pid, 10) {
            e.feed(&i, sink).unwrap();
        }
        if pid > 10 {
            for i in closed(pid, 20) {
                e.feed(&i, sink).unwrap();
            }
        }
    }
    e.feed(&Input::Tick(30 * MS), sink).unwrap();
    assert_eq!(e.cached(), (n as usize, n as usize));
    let f = e.unreferenced(30 * MS).expect("over the limit: a round of forgetting");
    assert_eq!(f.pids.len(), n as usize - 10);
    assert_eq!(f.stacks.len(), n as usize - 10);
    assert!(f.pids.iter().all(|&p| p > 10), "a leaking process's name is kept");
    assert!(f.stacks.iter().all(|k| k.pid > 10), "a leaking socket's stack is kept");
    e.feed(&Input::Forget(f), sink).unwrap();
    assert_eq!(e.cached(), (10, 10));
    // Not again until the caches have grown back to the limit.
    assert!(e.unreferenced(31 * MS).is_none());

    // The leaks, reported later, still have their names and stacks.
    e.feed(&Input::Tick(30 * MS + LEAK_AFTER), sink).unwrap();
    let leaks = e.corr.current_leaks(30 * MS + LEAK_AFTER);
    assert_eq!(leaks.len(), 10);
    for l in &leaks {
        let out = e.leak_out(l);
        assert_eq!(out.cmdline, format!("client --id {}", l.cookie), "{out:?}");
        assert!(out.open_stack_error.is_none(), "{out:?}");
        assert_eq!(out.open_stack.len(), 1, "{out:?}");
    }
}

/// On kernels before 5.12 a socket may be known by its address: its leak
/// shows the cookie its evidence (sock_diag) names, and without evidence
/// the id it is known by.
#[test]
fn a_leak_known_by_its_address_shows_the_cookie_its_evidence_names() {
    let mut e = engine();
    let sink = &mut NullSink;
    let address_id = 0xffff_8881_0000_1000;
    assert!(tracer_common::is_address_id(address_id));
    for (id, t) in [(address_id, 10), (address_id + 0x1000, 10)] {
        for i in [
            state(t, 7, id, tcp::CLOSE, tcp::SYN_SENT),
            state(t, 7, id, tcp::SYN_SENT, tcp::ESTABLISHED),
            state(t + 1, 7, id, tcp::ESTABLISHED, tcp::CLOSE_WAIT),
        ] {
            e.feed(&i, sink).unwrap();
        }
    }
    let evidence = Evidence {
        unread_now: Some(0),
        holders: Vec::new(),
        found: true,
        netns: None,
        cookie: Some(4242),
    };
    e.feed(
        &Input::Evidence(EvidenceInput {
            ns: 20 * MS,
            items: vec![(address_id, evidence)],
        }),
        sink,
    )
    .unwrap();
    let now = 20 * MS + LEAK_AFTER;
    e.feed(&Input::Tick(now), sink).unwrap();
    let mut shown: Vec<u64> = e.corr.current_leaks(now).iter().map(|l| e.leak_out(l).cookie).collect();
    shown.sort_unstable();
    assert_eq!(shown, [4242, address_id + 0x1000]);
}
