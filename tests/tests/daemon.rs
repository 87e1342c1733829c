//! `tracer daemon` (issue 11): its HTTP endpoints and log lines against the
//! kernel's own view (`ss`), a real Prometheus server scraping it, and
//! scraping under load.
//!
//! The daemon traces the whole host: each test has its own server on a
//! random port and only looks at leaks to that port.

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracer_tests::prometheus::{prometheus_bin, Prometheus};
use tracer_tests::reduced::{assert_runs_with, finish, require_setpriv, run_reduced_cmd, wait_started};
use tracer_tests::{
    format_ss, free_port, http_get, require_privileges, run_daemon, spawn_client, spawn_client_via, spawn_server,
    spawn_server_via, ss_sockets, Child, NetNs, SsSocket, Value,
};

/// Loading and attaching the eBPF programs on a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Leaks are due this long after the FIN.
const LEAK_AFTER: &str = "1s";
/// The server's reply, which a leaking client never reads.
const REPLY: u64 = 26;

/// A daemon on a free port, up (`/healthz` answers 200).
struct Daemon {
    child: Child,
    port: u16,
}

fn start_daemon(extra: &[&str]) -> Daemon {
    start_daemon_with(extra, run_daemon)
}

/// `spawn` starts `tracer daemon ARGS...`.
fn start_daemon_with(extra: &[&str], spawn: impl FnOnce(&[&str]) -> Child) -> Daemon {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--listen", listen.as_str(), "--leak-after", LEAK_AFTER];
    args.extend_from_slice(extra);
    let mut child = spawn(&args);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if http_get(port, "/healthz", "*/*").is_ok_and(|r| r.status == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline && child.is_running(),
            "the daemon did not become healthy\n{}",
            child.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_started(&mut child, START_TIMEOUT);
    Daemon { child, port }
}

impl Daemon {
    fn get(&self, path: &str) -> String {
        let r = http_get(self.port, path, "*/*").unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(r.status, 200, "GET {path}: {r:?}");
        r.body
    }

    /// `/leaks`, the leaks to `port`.
    fn leaks_to(&self, port: u16) -> Vec<Value> {
        let all: Vec<Value> = serde_json::from_str(&self.get("/leaks")).expect("/leaks is a JSON array");
        all.into_iter()
            .filter(|l| l["remote"].as_str().is_some_and(|r| r.ends_with(&format!(":{port}"))))
            .collect()
    }

    /// The value of the one sample of `/metrics` whose line starts with
    /// `series` (name and labels), if any.
    fn sample(&self, series: &str) -> Option<f64> {
        let text = self.get("/metrics");
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

/// Polls `f` every 200 ms until it returns Some, or panics with `what`.
fn wait_for<T>(timeout: Duration, what: &dyn Fn() -> String, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?}: {}", what());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `count` client sockets to a server on a random port, left in CLOSE_WAIT
/// unread: the client and server children, the port, and ss's view of
/// those sockets once all are in CLOSE_WAIT.
fn leaky_clients(count: usize) -> (Child, Child, u16, Vec<SsSocket>) {
    let reply = REPLY.to_string();
    let (server, port) = spawn_server("127.0.0.1:0", &["--reply", &reply]);
    let addr = format!("127.0.0.1:{port}");
    let n = count.to_string();
    let (client, _) = spawn_client(&["--connect", &addr, "--count", &n, "--mode", "leak"]);
    let pid = client.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    let truth = loop {
        let s: Vec<SsSocket> = ss_sockets("close-wait")
            .into_iter()
            .filter(|s| s.has_pid(pid))
            .collect();
        if s.len() == count || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        truth.len(),
        count,
        "ss shows the client's leaks:\n{}",
        format_ss(&truth)
    );
    (server, client, port, truth)
}

fn cookies(v: &[Value]) -> BTreeSet<u64> {
    v.iter().filter_map(|l| l["cookie"].as_u64()).collect()
}

/// Waits until `/leaks` lists exactly `truth`'s sockets to `port`, and
/// pairs each leak with its socket as ss shows it.
fn leaks_matching<'a>(d: &Daemon, port: u16, truth: &'a [SsSocket], where_: &str) -> Vec<(Value, &'a SsSocket)> {
    let want: BTreeSet<u64> = truth.iter().map(|s| s.cookie).collect();
    let leaks = wait_for(
        Duration::from_secs(15),
        &|| format!("/leaks to port {port} never matched ss{where_}:\n{}", format_ss(truth)),
        || {
            let l = d.leaks_to(port);
            (cookies(&l) == want).then_some(l)
        },
    );
    leaks
        .into_iter()
        .map(|l| {
            let s = truth
                .iter()
                .find(|s| Some(s.cookie) == l["cookie"].as_u64())
                .expect("matched");
            (l, s)
        })
        .collect()
}

#[test]
fn endpoints_and_log_lines_match_ss() {
    if !require_privileges() {
        return;
    }
    let d = start_daemon(&[]);
    let (_server, mut client, port, truth) = leaky_clients(3);
    let want: BTreeSet<u64> = truth.iter().map(|s| s.cookie).collect();

    // /leaks: exactly ss's sockets, each with ss's unread bytes and fd.
    for (l, s) in leaks_matching(&d, port, &truth, "") {
        assert_eq!(l["unread_bytes"].as_u64(), Some(s.recv_q - 1), "{l}\n{}", s.line);
        assert_eq!(l["pid"].as_u64(), Some(u64::from(client.pid())), "{l}");
        assert_eq!(
            l["fd"].as_i64(),
            s.fd_of(client.pid()).map(i64::from),
            "{l}\n{}",
            s.line
        );
        assert!(l["close_wait_ms"].as_u64() >= Some(1000), "{l}");
    }

    // /metrics: the three leaks under one label set, their unread bytes summed.
    let series = format!(r#"{{comm="tcp-fixture",container="",role="client",port="{port}"}}"#);
    assert_eq!(d.sample(&format!("tracer_leaked_sockets{series}")), Some(3.0));
    assert_eq!(
        d.sample(&format!("tracer_leaked_unread_bytes{series}")),
        Some((3 * REPLY) as f64)
    );
    assert!(d.sample(&format!("tracer_leaked_oldest_seconds{series}")) >= Some(1.0));
    assert!(d.sample("tracer_leaks_total") >= Some(3.0));
    let om = http_get(d.port, "/metrics", "application/openmetrics-text;version=1.0.0").expect("GET /metrics");
    assert!(om.content_type.starts_with("application/openmetrics-text"), "{om:?}");
    assert!(om.body.trim_end().ends_with("# EOF"), "{}", om.body);
    assert_eq!(http_get(d.port, "/nope", "*/*").map(|r| r.status), Ok(404));

    // The owner exits: its leaks close late and leave /leaks and /metrics.
    client.kill();
    wait_for(
        Duration::from_secs(10),
        &|| format!("leaks to port {port} still listed after the client exited"),
        || d.leaks_to(port).is_empty().then_some(()),
    );
    assert_eq!(d.sample(&format!("tracer_leaked_sockets{series}")), None);
    assert!(d.sample("tracer_late_closes_total") >= Some(3.0));

    // SIGTERM: a clean exit, and each leak and late close was one log line.
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(d.child.pid() as i32, libc::SIGTERM) };
    let out = finish(d.child, Duration::from_secs(15));
    out.assert_success();
    let of_port = |ty: &str| -> BTreeSet<u64> {
        out.of_type(ty)
            .into_iter()
            .filter(|l| l["remote"].as_str().is_some_and(|r| r.ends_with(&format!(":{port}"))))
            .filter_map(|l| l["cookie"].as_u64())
            .collect()
    };
    assert_eq!(of_port("leak"), want, "{}", out.dump());
    assert_eq!(of_port("late_close"), want, "{}", out.dump());
    assert_eq!(out.of_type("summary").len(), 1, "{}", out.dump());
}

#[test]
fn prometheus_shows_the_leak_counts() {
    if !require_privileges() {
        return;
    }
    let Some(bin) = prometheus_bin() else { return };
    let d = start_daemon(&[]);
    let mut prom = Prometheus::start(&bin, d.port);
    wait_for(
        Duration::from_secs(30),
        &|| format!("Prometheus never scraped the daemon: {:?}", prom.target_health()),
        || (prom.target_health().0 == "up").then_some(()),
    );

    let (_server, mut client, port, truth) = leaky_clients(4);
    let query = format!(r#"sum(tracer_leaked_sockets{{comm="tcp-fixture",role="client",port="{port}"}})"#);
    let seen = wait_for(
        Duration::from_secs(30),
        &|| format!("Prometheus never showed {} leaks for {query}", truth.len()),
        || {
            let r = prom.query(&query).ok()?;
            (r.len() == 1 && r[0].1 == truth.len() as f64).then(|| r[0].1)
        },
    );
    assert_eq!(seen, truth.len() as f64);
    // Its count and ss's agree now, both ways: nothing more, nothing less.
    let now: usize = ss_sockets("close-wait")
        .iter()
        .filter(|s| s.has_pid(client.pid()))
        .count();
    assert_eq!(now, truth.len());

    // The leaking process exits: the count falls to nothing.
    client.kill();
    wait_for(
        Duration::from_secs(30),
        &|| format!("Prometheus still shows leaks for {query}: {:?}", prom.query(&query)),
        || {
            prom.query(&query)
                .ok()
                .filter(|r| r.iter().all(|(_, v)| *v == 0.0))
                .map(|_| ())
        },
    );
    let closes = prom.query("tracer_late_closes_total").expect("query");
    assert!(
        closes.first().is_some_and(|(_, v)| *v >= truth.len() as f64),
        "{closes:?}\n{}",
        prom.describe()
    );
}

/// A connection churn on loopback (connect, write 8 bytes, close, on two
/// threads) for `secs`, and on until `enough` says so, given the
/// connections made so far (at most a minute: on a busy CI machine the
/// acceptor starves, the listen queue overflows, and connects stall a
/// second each); returns how many connections were made.
fn churn(secs: u64, enough: impl Fn(u64) -> bool + Send + Sync + 'static) -> u64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = Arc::new(AtomicBool::new(false));
    let accept_stop = stop.clone();
    // The server closes only after the client has (EOF): the client's
    // side keeps the TIME_WAIT, under its ephemeral port. A server that
    // closed first kept it under the listening port instead, and a later
    // connect from a reused port then hit it (a 1 s SYN stall): churns of
    // a previous test or run cut this one to a few hundred connections.
    let acceptor = std::thread::spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking");
        let mut open: Vec<TcpStream> = Vec::new();
        let mut buf = [0u8; 64];
        while !accept_stop.load(Ordering::Relaxed) {
            let mut idle = true;
            while let Ok((s, _)) = listener.accept() {
                s.set_nonblocking(true).expect("nonblocking");
                open.push(s);
                idle = false;
            }
            open.retain_mut(|s| match std::io::Read::read(s, &mut buf) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            });
            if idle {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    });
    let started = Instant::now();
    let made = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let enough = Arc::new(enough);
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (made, enough) = (made.clone(), enough.clone());
            std::thread::spawn(move || {
                let more = || {
                    let t = started.elapsed();
                    t < Duration::from_secs(60)
                        && (t < Duration::from_secs(secs) || !enough(made.load(Ordering::Relaxed)))
                };
                while more() {
                    if let Ok(mut s) = TcpStream::connect(addr) {
                        let _ = std::io::Write::write_all(&mut s, b"8 bytes!");
                        made.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    let n = made.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    acceptor.join().expect("acceptor thread");
    n
}

#[test]
fn scraping_every_100ms_under_churn_drops_nothing() {
    if !require_privileges() {
        return;
    }
    let d = start_daemon(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let scraped = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let scraper = {
        let (stop, scraped) = (stop.clone(), scraped.clone());
        let port = d.port;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = http_get(port, "/metrics", "application/openmetrics-text").expect("scrape");
                assert_eq!(r.status, 200);
                scraped.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let during = scraped.clone();
    let conns = churn(4, move |made| made >= 2000 && during.load(Ordering::Relaxed) >= 20);
    let scrapes = scraped.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    scraper.join().expect("scraper");
    assert!(scrapes >= 20, "only {scrapes} scrapes during a minute of churn");
    assert!(conns >= 2000, "only {conns} connections in a minute");
    // Let the last status reach the board.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.sample("tracer_ringbuf_drops_total"), Some(0.0));
    assert_eq!(d.sample(r#"tracer_lost_total{counter="ringbuf_drops"}"#), Some(0.0));
    assert!(d.sample("tracer_sockets_tracked").is_some());
    eprintln!(
        "{conns} connections, {scrapes} scrapes; hook runs the kernel skipped: {:?}",
        d.sample(r#"tracer_lost_total{counter="hook_misses"}"#)
    );
}

/// The capabilities deploy/tracer.service grants (its
/// `AmbientCapabilities=`), as setpriv names them.
fn unit_capabilities() -> Vec<String> {
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tracer.service");
    let text = std::fs::read_to_string(&unit).unwrap_or_else(|e| panic!("{}: {e}", unit.display()));
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .unwrap_or_else(|| panic!("no AmbientCapabilities= in {}", unit.display()));
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

/// The daemon as the systemd unit runs it (not root, exactly the unit's
/// capabilities; systemd itself does not run on these machines): a leak in
/// another network namespace comes with its full evidence, as `ss` inside
/// that namespace shows it.
#[test]
fn the_units_capabilities_give_full_evidence() {
    if !require_privileges() {
        return;
    }
    let Some(setpriv) = require_setpriv() else { return };
    let caps = unit_capabilities();
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    let d = start_daemon_with(&[], |args| run_reduced_cmd(&setpriv, &caps, &["daemon"], args));
    assert_runs_with(d.child.pid(), &caps);

    let ns = NetNs::create();
    let w = ns.wrapper();
    let reply = REPLY.to_string();
    let (_server, port) = spawn_server_via(&w, "127.0.0.1:0", &["--reply", &reply]);
    let addr = format!("127.0.0.1:{port}");
    let (client, _) = spawn_client_via(&w, &["--connect", &addr, "--count", "2", "--mode", "leak"]);
    let truth = wait_for(
        Duration::from_secs(10),
        &|| {
            format!(
                "ss in the namespace never showed the 2 leaks:\n{}",
                format_ss(&ns.ss("close-wait"))
            )
        },
        || {
            let s: Vec<SsSocket> = ns
                .ss("close-wait")
                .into_iter()
                .filter(|s| s.has_pid(client.pid()))
                .collect();
            (s.len() == 2 && s.iter().all(|s| s.recv_q == REPLY + 1)).then_some(s)
        },
    );
    for (l, s) in leaks_matching(&d, port, &truth, " in the namespace") {
        assert_eq!(l["netns"].as_u64(), Some(ns.inode()), "{l}");
        assert_eq!(l["unread_bytes"].as_u64(), Some(REPLY), "{l}\n{}", s.line);
        assert_eq!(
            l["fd"].as_i64(),
            s.fd_of(client.pid()).map(i64::from),
            "{l}\n{}",
            s.line
        );
        let holders: Vec<u64> = l["holders"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["pid"].as_u64())
            .collect();
        assert_eq!(holders, vec![u64::from(client.pid())], "{l}\n{}", s.line);
    }
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(d.child.pid() as i32, libc::SIGTERM) };
    let out = finish(d.child, Duration::from_secs(15));
    out.assert_success();
    assert!(
        !out.stderr.contains("cannot enter") && !out.stderr.contains("cannot read"),
        "the unit's capabilities fall short:\n{}",
        out.stderr
    );
}
