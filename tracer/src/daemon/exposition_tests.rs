use std::time::{Duration, Instant};

use super::*;
use crate::findings::LeakOut;

fn leak(cookie: u64, comm: &str, source: Option<OwnerSource>, local: &str, remote: &str, unread: u32) -> OpenLeak {
    OpenLeak {
        leak: LeakOut {
            pid: Some(10),
            comm: comm.into(),
            local: local.into(),
            remote: remote.into(),
            cookie,
            close_wait_ms: 5000,
            owner_source: source,
            unread_bytes: Some(unread),
            ..LeakOut::default()
        },
        reported_at: Instant::now(),
    }
}

fn board(leaks: Vec<OpenLeak>) -> Board {
    let mut b = Board::default();
    for l in leaks {
        b.leaks.insert(l.leak.cookie, l);
    }
    b
}

const EPHEMERAL: RangeInclusive<u16> = 32768..=60999;

#[test]
fn roles_and_ports() {
    let client = leak(
        1,
        "java",
        Some(OwnerSource::Connect),
        "10.0.0.1:40000",
        "10.0.0.2:8080",
        0,
    );
    let l = labels_of(&client, &EPHEMERAL);
    assert_eq!((l.role.as_str(), l.port.as_str()), ("client", "8080"));
    let server = leak(
        2,
        "nginx",
        Some(OwnerSource::Accept),
        "10.0.0.1:443",
        "10.0.0.2:50000",
        0,
    );
    let l = labels_of(&server, &EPHEMERAL);
    assert_eq!((l.role.as_str(), l.port.as_str()), ("server", "443"));
    // Seen only in the start-up snapshot: told apart by the ephemeral range.
    let old = leak(3, "java", Some(OwnerSource::Snapshot), "[::1]:45000", "[::1]:9000", 0);
    let l = labels_of(&old, &EPHEMERAL);
    assert_eq!((l.role.as_str(), l.port.as_str()), ("client", "9000"));
    let mut contained = leak(
        5,
        "nginx",
        Some(OwnerSource::Accept),
        "10.0.0.1:80",
        "10.0.0.2:50000",
        0,
    );
    contained.leak.container_id = Some("ab".repeat(32));
    assert_eq!(labels_of(&contained, &EPHEMERAL).container, "ab".repeat(32));
    let both = leak(4, "x", None, "127.0.0.1:45000", "127.0.0.1:46000", 0);
    let l = labels_of(&both, &EPHEMERAL);
    assert_eq!((l.role.as_str(), l.port.as_str()), ("unknown", ""));
}

#[test]
fn series_sum_per_label_set_and_fold_beyond_the_bound() {
    let mut leaks = Vec::new();
    // Three leaks to port 8080, two to 8081, one each to 9000..9003.
    for (i, port) in [8080, 8080, 8080, 8081, 8081, 9000, 9001, 9002, 9003]
        .iter()
        .enumerate()
    {
        leaks.push(leak(
            i as u64,
            "java",
            Some(OwnerSource::Connect),
            "10.0.0.1:40000",
            &format!("10.0.0.2:{port}"),
            7,
        ));
    }
    let b = board(leaks);
    let now = Instant::now() + Duration::from_secs(2);
    let (series, folded) = leak_series(&b, now, 100, &EPHEMERAL);
    assert_eq!((series.len(), folded), (6, 0));
    let (series, folded) = leak_series(&b, now, 3, &EPHEMERAL);
    assert_eq!(folded, 4, "four label sets beyond the two kept");
    assert_eq!(series.len(), 3);
    assert_eq!(series[0].0.port, "8080");
    assert_eq!(series[0].1.sockets, 3);
    assert_eq!(series[0].1.unread_bytes, 21);
    assert_eq!(series[1].0.port, "8081");
    let other = &series[2];
    assert_eq!(other.0.comm, OVERFLOW_COMM);
    assert_eq!(other.1.sockets, 4, "no leak is lost by folding");
    assert!(
        other.1.oldest_ms >= 7000,
        "age grows after the report: {}",
        other.1.oldest_ms
    );
}

#[test]
fn exposition_in_both_formats() {
    let b = board(vec![leak(
        1,
        "java",
        Some(OwnerSource::Connect),
        "10.0.0.1:40000",
        "10.0.0.2:8080",
        3,
    )]);
    let r = registry(&b, Instant::now(), 10, &EPHEMERAL);
    let om = encode(&r, Format::OpenMetrics);
    assert!(
        om.contains(r#"tracer_leaked_sockets{comm="java",container="",role="client",port="8080"} 1"#),
        "{om}"
    );
    assert!(om.contains("tracer_leaked_unread_bytes{"), "{om}");
    assert!(om.contains("tracer_leaked_oldest_seconds{"), "{om}");
    assert!(om.contains("tracer_leaks_total 0"), "{om}");
    assert!(om.contains(r#"tracer_lost_total{counter="hook_misses"} 0"#), "{om}");
    assert!(om.contains("tracer_build_info{version="), "{om}");
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
    let text = encode(&r, Format::Text);
    assert!(text.contains("# TYPE tracer_leaked_sockets gauge"), "{text}");
    assert!(!text.contains("# EOF"), "{text}");
    assert_eq!(
        Format::from_accept(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")),
        Format::OpenMetrics
    );
    assert_eq!(Format::from_accept(Some("*/*")), Format::Text);
}
