//! A Prometheus-like scraper for the daemon configuration: `GET /metrics`
//! every 100 ms on its own thread while the load runs, counting answers
//! and failures (a scrape must never fail, nor cost the tracer events).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the daemon is scraped: ten times Prometheus' usual fastest.
pub const EVERY: Duration = Duration::from_millis(100);

pub struct Scraper {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Tally>,
}

#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
}

impl Scraper {
    pub fn start(port: u16) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut t = Tally::default();
            while !flag.load(Ordering::Relaxed) {
                match scrape(port) {
                    Ok(()) => t.ok += 1,
                    Err(e) => {
                        t.failed += 1;
                        t.first_error.get_or_insert(e);
                    }
                }
                std::thread::sleep(EVERY);
            }
            t
        });
        Scraper { stop, thread }
    }

    pub fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|_| Tally {
            failed: 1,
            first_error: Some("the scraper thread panicked".into()),
            ..Tally::default()
        })
    }
}

/// One `GET /metrics`: a 200 whose body has the leak gauge's family.
fn scrape(port: u16) -> Result<(), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/openmetrics-text\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&body);
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("answer: {}", text.lines().next().unwrap_or("")));
    }
    if !text.contains("tracer_sockets_tracked") {
        return Err("no tracer_sockets_tracked in the answer".into());
    }
    Ok(())
}

/// A port nobody listens on now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
