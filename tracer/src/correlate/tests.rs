//! Correlation on synthetic event sequences: no kernel involved.

use tracer_common::{tcp, EventKind, FdEvent, Header, StateEvent, COMM_LEN, NO_STACK};

use super::*;
use crate::decode::Event;

const MS: u64 = 1_000_000;
const LEAK_AFTER: u64 = 1000 * MS;

const CLIENT: u32 = 100;
const SERVER: u32 = 200;

fn comm(s: &str) -> [u8; COMM_LEN] {
    Comm::from_str(s).0
}

fn hdr(kind: EventKind, t_ms: u64, tgid: u32, cookie: u64, skaddr: u64) -> Header {
    let name = if tgid == CLIENT { "client" } else { "server" };
    Header {
        kind: kind as u32,
        cpu: 0,
        ktime_ns: t_ms * MS,
        tgid,
        tid: tgid,
        comm: comm(name),
        cookie,
        skaddr,
        ustack: tgid as i32,
        kstack: NO_STACK,
    }
}

fn state(t_ms: u64, ctx_tgid: u32, cookie: u64, skaddr: u64, old: u8, new: u8) -> Event {
    Event::State(StateEvent {
        header: hdr(EventKind::State, t_ms, ctx_tgid, cookie, skaddr),
        saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        daddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sport: 40000 + cookie as u16,
        dport: 8080,
        family: 2,
        oldstate: old,
        newstate: new,
        // 26 unread bytes + the FIN, as the kernel counts it.
        rx_queue: 27,
        _pad: 0,
    })
}

fn fd_event(kind: EventKind, t_ms: u64, tgid: u32, cookie: u64, skaddr: u64, fd: i32) -> Event {
    let e = FdEvent {
        header: hdr(kind, t_ms, tgid, cookie, skaddr),
        fd,
        _pad: 0,
    };
    if kind == EventKind::Accept {
        Event::Accept(e)
    } else {
        Event::Close(e)
    }
}

/// A client connection whose FIN arrives at `fin_ms`. On loopback the FIN
/// is processed in the *server's* context: the correlator must not care.
fn connect_then_fin(c: &mut Correlator, cookie: u64, fin_ms: u64, out: &mut Vec<Verdict>) {
    c.on_event(
        &state(0, CLIENT, cookie, 0xa000 + cookie, tcp::CLOSE, tcp::SYN_SENT),
        out,
    );
    c.on_event(
        &state(1, CLIENT, cookie, 0xa000 + cookie, tcp::SYN_SENT, tcp::ESTABLISHED),
        out,
    );
    c.on_event(
        &state(
            fin_ms,
            SERVER,
            cookie,
            0xa000 + cookie,
            tcp::ESTABLISHED,
            tcp::CLOSE_WAIT,
        ),
        out,
    );
}

fn leaks(out: &[Verdict]) -> Vec<&LeakReport> {
    out.iter()
        .filter_map(|v| match v {
            Verdict::Leak(l) => Some(l),
            _ => None,
        })
        .collect()
}

#[test]
fn unclosed_close_wait_becomes_a_leak_only_after_the_threshold() {
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    connect_then_fin(&mut c, 1, 10, &mut out);
    c.sweep(10 * MS + LEAK_AFTER - 1, &mut out);
    assert!(out.is_empty(), "reported too early: {out:?}");
    c.sweep(10 * MS + LEAK_AFTER, &mut out);
    let l = leaks(&out);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].cookie, 1);
    assert_eq!(l[0].close_wait_ns, LEAK_AFTER);
    assert!(!l[0].since.estimated);
    // Reported once, not on every sweep.
    c.sweep(10 * MS + 5 * LEAK_AFTER, &mut out);
    assert_eq!(leaks(&out).len(), 1);
    assert_eq!(c.current_leaks(20 * LEAK_AFTER).len(), 1);
}

#[test]
fn owner_is_the_connecting_process_not_the_context_of_the_fin() {
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    connect_then_fin(&mut c, 1, 10, &mut out);
    c.sweep(u64::MAX / 2, &mut out);
    let owner = leaks(&out)[0].owner.expect("owner known");
    assert_eq!(owner.pid, CLIENT);
    assert_eq!(owner.comm.as_str(), "client");
    assert_eq!(owner.source, OwnerSource::Connect);
}

#[test]
fn accepted_socket_belongs_to_the_acceptor() {
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    // The passive socket is born in softirq (here: the client's context).
    c.on_event(&state(0, CLIENT, 7, 0xb7, tcp::CLOSE, tcp::SYN_RECV), &mut out);
    c.on_event(&state(1, CLIENT, 7, 0xb7, tcp::SYN_RECV, tcp::ESTABLISHED), &mut out);
    c.on_event(&fd_event(EventKind::Accept, 2, SERVER, 7, 0xb7, 9), &mut out);
    c.on_event(&state(3, CLIENT, 7, 0xb7, tcp::ESTABLISHED, tcp::CLOSE_WAIT), &mut out);
    c.sweep(3 * MS + LEAK_AFTER, &mut out);
    let l = leaks(&out);
    assert_eq!(
        l[0].owner.map(|o| (o.pid, o.source)),
        Some((SERVER, OwnerSource::Accept))
    );
    assert_eq!(l[0].fd, Some(9));
}

#[test]
fn closing_in_time_is_not_a_leak() {
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    connect_then_fin(&mut c, 1, 10, &mut out);
    c.on_event(&fd_event(EventKind::Close, 20, CLIENT, 1, 0xa001, 5), &mut out);
    c.on_event(&state(20, CLIENT, 1, 0xa001, tcp::CLOSE_WAIT, tcp::LAST_ACK), &mut out);
    c.on_event(&state(21, CLIENT, 1, 0xa001, tcp::LAST_ACK, tcp::CLOSE), &mut out);
    c.sweep(10 * LEAK_AFTER, &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert!(c.socket(1).is_none(), "destroyed socket must be forgotten");
}

#[test]
fn late_close_after_report() {
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    connect_then_fin(&mut c, 1, 10, &mut out);
    c.sweep(10 * MS + LEAK_AFTER, &mut out);
    let closed_at = 10 * MS + 3 * LEAK_AFTER;
    c.on_event(
        &state(closed_at / MS, CLIENT, 1, 0xa001, tcp::CLOSE_WAIT, tcp::LAST_ACK),
        &mut out,
    );
    match out.last() {
        Some(Verdict::LateClose {
            leak,
            closed_after_ns,
            aborted,
        }) => {
            assert_eq!(leak.cookie, 1);
            assert_eq!(*closed_after_ns, 2 * LEAK_AFTER);
            assert!(!aborted);
        }
        other => panic!("expected late close, got {other:?}"),
    }
    assert!(c.current_leaks(closed_at).is_empty());
}

#[test]
fn leaving_past_the_threshold_before_any_sweep_is_a_leak_then_a_late_close() {
    // No sweep between the FIN and the close (the live clock waits while
    // evidence is gathered): it was a leak all the same.
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    connect_then_fin(&mut c, 1, 10, &mut out);
    let closed_at = 10 * MS + 3 * LEAK_AFTER;
    c.on_event(
        &state(closed_at / MS, CLIENT, 1, 0xa001, tcp::CLOSE_WAIT, tcp::LAST_ACK),
        &mut out,
    );
    let l = leaks(&out);
    assert_eq!(l.len(), 1, "{out:?}");
    assert_eq!(l[0].close_wait_ns, LEAK_AFTER, "reported as of when it became due");
    match out.last() {
        Some(Verdict::LateClose { closed_after_ns, .. }) => assert_eq!(*closed_after_ns, 2 * LEAK_AFTER),
        other => panic!("expected late close, got {other:?}"),
    }
    assert_eq!((c.stats().leaks_reported, c.stats().late_closes), (1, 1));
    // Exactly at the threshold counts; just before it does not.
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    connect_then_fin(&mut c, 2, 10, &mut out);
    let just_before = 10 * MS + LEAK_AFTER - MS;
    c.on_event(
        &state(just_before / MS, CLIENT, 2, 0xa002, tcp::CLOSE_WAIT, tcp::LAST_ACK),
        &mut out,
    );
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn reset_in_close_wait_ends_the_leak_as_aborted() {
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    connect_then_fin(&mut c, 1, 10, &mut out);
    c.sweep(10 * MS + LEAK_AFTER, &mut out);
    c.on_event(&state(5000, SERVER, 1, 0xa001, tcp::CLOSE_WAIT, tcp::CLOSE), &mut out);
    assert!(matches!(out.last(), Some(Verdict::LateClose { aborted: true, .. })));
    assert_eq!(c.stats().resets, 1);
    assert!(c.socket(1).is_none());
}

#[test]
fn reset_before_threshold_is_no_leak() {
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    connect_then_fin(&mut c, 1, 10, &mut out);
    c.on_event(&state(20, SERVER, 1, 0xa001, tcp::CLOSE_WAIT, tcp::CLOSE), &mut out);
    c.sweep(10 * LEAK_AFTER, &mut out);
    assert!(out.is_empty());
}

#[test]
fn kernel_address_reuse_does_not_merge_sockets() {
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    // Socket 1 lives and dies at address 0xa001...
    c.on_event(&state(0, CLIENT, 1, 0xa001, tcp::CLOSE, tcp::SYN_SENT), &mut out);
    c.on_event(&state(1, CLIENT, 1, 0xa001, tcp::SYN_SENT, tcp::ESTABLISHED), &mut out);
    c.on_event(&state(2, CLIENT, 1, 0xa001, tcp::ESTABLISHED, tcp::FIN_WAIT1), &mut out);
    c.on_event(&state(3, CLIENT, 1, 0xa001, tcp::FIN_WAIT1, tcp::CLOSE), &mut out);
    // ...and a server-side socket with a new cookie reuses that address.
    c.on_event(&state(4, CLIENT, 2, 0xa001, tcp::CLOSE, tcp::SYN_RECV), &mut out);
    c.on_event(&state(5, CLIENT, 2, 0xa001, tcp::SYN_RECV, tcp::ESTABLISHED), &mut out);
    // The accept hook had no cookie: it must resolve to socket 2 by address.
    c.on_event(&fd_event(EventKind::Accept, 6, SERVER, 0, 0xa001, 4), &mut out);
    c.on_event(
        &state(7, CLIENT, 2, 0xa001, tcp::ESTABLISHED, tcp::CLOSE_WAIT),
        &mut out,
    );
    c.sweep(7 * MS + LEAK_AFTER, &mut out);
    let l = leaks(&out);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].cookie, 2);
    assert_eq!(l[0].owner.map(|o| o.pid), Some(SERVER), "not the dead socket's client");
}

#[test]
fn preexisting_close_wait_is_estimated_and_sharpened_by_older_events() {
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    let ep = Endpoints {
        local: "127.0.0.1:4000".parse().unwrap(),
        remote: "127.0.0.1:80".parse().unwrap(),
    };
    let now = 100_000 * MS;
    c.on_snapshot(
        &SnapshotSocket {
            cookie: 9,
            state: tcp::CLOSE_WAIT,
            endpoints: ep,
            holder: Some((CLIENT, Comm::from_str("client"), 6)),
            last_ack_age_ns: Some(30_000 * MS),
        },
        now,
    );
    c.sweep(now, &mut out);
    let l = leaks(&out);
    assert_eq!(l.len(), 1);
    assert!(l[0].since.estimated);
    assert_eq!(l[0].close_wait_ns, 30_000 * MS);
    assert_eq!(
        l[0].owner.map(|o| (o.pid, o.source)),
        Some((CLIENT, OwnerSource::Snapshot))
    );
    assert_eq!(l[0].fd, Some(6));
    // A transition older than the snapshot must not roll its state back.
    c.on_event(
        &state(99_000, SERVER, 9, 0xc9, tcp::ESTABLISHED, tcp::CLOSE_WAIT),
        &mut out,
    );
    let s = c.socket(9).unwrap();
    assert_eq!(s.state, tcp::CLOSE_WAIT);
    assert_eq!(
        s.close_wait,
        Some(Since {
            ns: 99_000 * MS,
            estimated: false
        })
    );
}

#[test]
fn pid_filter_keeps_only_that_owner() {
    let mut c = Correlator::new(LEAK_AFTER, Some(CLIENT), 1000);
    let mut out = vec![];
    connect_then_fin(&mut c, 1, 10, &mut out);
    c.on_event(&state(0, SERVER, 2, 0xb2, tcp::CLOSE, tcp::SYN_SENT), &mut out);
    c.on_event(&state(10, CLIENT, 2, 0xb2, tcp::ESTABLISHED, tcp::CLOSE_WAIT), &mut out);
    c.sweep(10 * LEAK_AFTER, &mut out);
    let l = leaks(&out);
    assert_eq!(l.iter().map(|l| l.cookie).collect::<Vec<_>>(), vec![1]);
}

#[test]
fn close_by_owner_that_leaves_close_wait_is_kept_as_evidence() {
    // close() released this fd but another holder keeps the socket open.
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    connect_then_fin(&mut c, 1, 10, &mut out);
    c.on_event(&fd_event(EventKind::Close, 20, CLIENT, 1, 0xa001, 5), &mut out);
    c.sweep(10 * MS + LEAK_AFTER, &mut out);
    let l = leaks(&out);
    assert_eq!(l[0].last_close.map(|cc| (cc.pid, cc.fd)), Some((CLIENT, 5)));
}

#[test]
fn full_table_is_counted_not_silent() {
    let mut c = Correlator::new(LEAK_AFTER, None, 2);
    let mut out = vec![];
    for cookie in 1..=3 {
        c.on_event(&state(0, CLIENT, cookie, cookie, tcp::CLOSE, tcp::SYN_SENT), &mut out);
    }
    assert_eq!(c.stats().sockets_tracked, 2);
    assert_eq!(c.stats().untracked_table_full, 1);
}

#[test]
fn leak_carries_open_stack_and_unread_bytes_at_fin() {
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    connect_then_fin(&mut c, 1, 10, &mut out);
    c.sweep(10 * MS + LEAK_AFTER, &mut out);
    let l = leaks(&out);
    // The stack of the connect (client context), not of the FIN (server).
    assert_eq!(
        l[0].open_stack,
        Some(StackRef {
            pid: CLIENT,
            ustack: CLIENT as i32,
            kstack: NO_STACK
        })
    );
    assert_eq!(l[0].unread_at_fin, Some(26));
}

#[test]
fn close_after_the_snapshot_stamp_ends_a_snapshot_leak() {
    // The snapshot saw CLOSE_WAIT; the close happened after its stamp.
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    let ep = Endpoints {
        local: "127.0.0.1:4000".parse().unwrap(),
        remote: "127.0.0.1:80".parse().unwrap(),
    };
    let snap_ns = 50_000 * MS;
    c.on_snapshot(
        &SnapshotSocket {
            cookie: 9,
            state: tcp::CLOSE_WAIT,
            endpoints: ep,
            holder: None,
            last_ack_age_ns: Some(10_000 * MS),
        },
        snap_ns,
    );
    // The FIN event itself (dump raced with it) and then the close.
    c.on_event(
        &state(50_001, SERVER, 9, 0xc9, tcp::ESTABLISHED, tcp::CLOSE_WAIT),
        &mut out,
    );
    c.on_event(&state(50_002, CLIENT, 9, 0xc9, tcp::CLOSE_WAIT, tcp::CLOSE), &mut out);
    c.sweep(100_000 * MS, &mut out);
    assert!(out.is_empty(), "closed socket reported: {out:?}");
    assert!(c.current_leaks(100_000 * MS).is_empty());
}

#[test]
fn re_entering_close_wait_keeps_one_pending_entry() {
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    let ep = Endpoints {
        local: "127.0.0.1:4000".parse().unwrap(),
        remote: "127.0.0.1:80".parse().unwrap(),
    };
    c.on_snapshot(
        &SnapshotSocket {
            cookie: 9,
            state: tcp::CLOSE_WAIT,
            endpoints: ep,
            holder: None,
            last_ack_age_ns: Some(0),
        },
        50_000 * MS,
    );
    c.on_event(
        &state(50_500, SERVER, 9, 0xc9, tcp::ESTABLISHED, tcp::CLOSE_WAIT),
        &mut out,
    );
    // Due by the snapshot's estimate, but not by the exact event time.
    c.sweep(50_000 * MS + LEAK_AFTER, &mut out);
    assert!(out.is_empty(), "reported by a stale pending entry: {out:?}");
    c.sweep(50_500 * MS + LEAK_AFTER, &mut out);
    assert_eq!(leaks(&out).len(), 1);
}

fn established_snapshot(cookie: u64, holder: u32, fd: i32) -> SnapshotSocket {
    SnapshotSocket {
        cookie,
        state: tcp::ESTABLISHED,
        endpoints: Endpoints {
            local: "127.0.0.1:4000".parse().unwrap(),
            remote: "127.0.0.1:80".parse().unwrap(),
        },
        holder: Some((holder, Comm::from_str("client"), fd)),
        last_ack_age_ns: None,
    }
}

#[test]
fn established_at_start_then_leaked_keeps_its_snapshot_holder() {
    // Kept compactly until its first event, then promoted: the FIN arrives
    // in the server's context, but the owner stays the snapshot's holder.
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    let now = 50_000 * MS;
    c.reserve_snapshot(1);
    c.on_snapshot(&established_snapshot(9, CLIENT, 7), now);
    assert_eq!(c.stats().sockets_tracked, 1);
    assert!(c.socket(9).is_none(), "no full record before its first event");
    c.on_event(
        &state(60_000, SERVER, 9, 0xc9, tcp::ESTABLISHED, tcp::CLOSE_WAIT),
        &mut out,
    );
    c.sweep(60_000 * MS + LEAK_AFTER, &mut out);
    let l = leaks(&out);
    assert_eq!(l.len(), 1);
    assert_eq!(
        l[0].owner.map(|o| (o.pid, o.source)),
        Some((CLIENT, OwnerSource::Snapshot))
    );
    assert_eq!(l[0].fd, Some(7));
    assert!(!l[0].since.estimated);
    assert_eq!(
        l[0].endpoints.map(|e| e.local.port()),
        Some(40009),
        "endpoints come from the event"
    );
    assert_eq!(c.stats().sockets_tracked, 1);
}

#[test]
fn event_older_than_the_snapshot_does_not_roll_a_quiet_socket_back() {
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = vec![];
    c.on_snapshot(&established_snapshot(9, CLIENT, 7), 50_000 * MS);
    // Drained after the snapshot, but it happened before it.
    c.on_event(
        &state(49_000, SERVER, 9, 0xc9, tcp::SYN_RECV, tcp::ESTABLISHED),
        &mut out,
    );
    let s = c.socket(9).expect("promoted by its event");
    assert_eq!(s.state, tcp::ESTABLISHED);
    assert_eq!(s.state_ns, 50_000 * MS);
    c.on_event(
        &state(51_000, CLIENT, 9, 0xc9, tcp::ESTABLISHED, tcp::FIN_WAIT1),
        &mut out,
    );
    c.on_event(&state(51_001, CLIENT, 9, 0xc9, tcp::FIN_WAIT1, tcp::CLOSE), &mut out);
    assert!(c.socket(9).is_none());
    assert_eq!(c.stats().sockets_tracked, 0);
}

#[test]
fn quiet_sockets_count_against_the_bound() {
    let mut c = Correlator::new(LEAK_AFTER, None, 2);
    let mut out = vec![];
    for cookie in 1..=3 {
        c.on_snapshot(&established_snapshot(cookie, CLIENT, cookie as i32), 0);
    }
    assert_eq!(c.stats().sockets_tracked, 2);
    assert_eq!(c.stats().untracked_table_full, 1);
    // Promoting a quiet socket takes no new room; a new socket finds none.
    c.on_event(&state(1, SERVER, 1, 0xa1, tcp::ESTABLISHED, tcp::CLOSE_WAIT), &mut out);
    c.on_event(&state(1, CLIENT, 4, 0xa4, tcp::CLOSE, tcp::SYN_SENT), &mut out);
    assert!(c.socket(1).is_some());
    assert!(c.socket(4).is_none());
    assert_eq!(c.stats().untracked_table_full, 2);
}

/// A socket the kernel side could not read at FIN: the byte count is
/// unknown, not zero.
#[test]
fn unreadable_rx_queue_is_unknown_not_zero() {
    let mut c = Correlator::new(LEAK_AFTER, None, 1000);
    let mut out = Vec::new();
    c.on_event(&state(0, CLIENT, 1, 0xa001, tcp::CLOSE, tcp::SYN_SENT), &mut out);
    c.on_event(&state(1, CLIENT, 1, 0xa001, tcp::SYN_SENT, tcp::ESTABLISHED), &mut out);
    let Event::State(mut fin) = state(5, SERVER, 1, 0xa001, tcp::ESTABLISHED, tcp::CLOSE_WAIT) else {
        unreachable!()
    };
    fin.rx_queue = RX_QUEUE_UNKNOWN;
    c.on_event(&Event::State(fin), &mut out);
    assert_eq!(c.socket(1).and_then(|s| s.unread_at_fin), None);
    assert!(
        c.socket(1).is_some_and(|s| s.close_wait.is_some()),
        "the state change itself counts"
    );
}
