//! A real Prometheus server (Debian's `prometheus` package, installed by
//! `cargo xtask setup`) scraping a target every second, and queries
//! through its HTTP API.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::child::Child;
use crate::http::{free_port, http_get};

/// A running `prometheus` with its own config and storage, removed on drop.
pub struct Prometheus {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

/// The `prometheus` binary, or why there is none: under `CI` its absence
/// fails the test (setup installs it), locally the caller skips.
pub fn prometheus_bin() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file());
    if found.is_none() {
        let msg = "prometheus is not installed (`cargo xtask setup` installs Debian's `prometheus` package)";
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            panic!("{msg}, and CI is set: refusing to skip");
        }
        eprintln!("skipping: {msg}");
    }
    found
}

impl Prometheus {
    /// Starts Prometheus scraping `127.0.0.1:target_port` every second and
    /// waits until it is ready.
    pub fn start(bin: &std::path::Path, target_port: u16) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("tracer-test-prometheus-{}-{target_port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("prometheus temp dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: tracer\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .expect("prometheus config");
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(&dir);
        let child = Child::spawn("prometheus", cmd);
        let mut p = Prometheus { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !http_get(port, "/-/ready", "*/*").is_ok_and(|r| r.status == 200) {
            assert!(
                Instant::now() < deadline && p.child.is_running(),
                "prometheus did not become ready\n{}",
                p.child.describe()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// The scrape target's health as Prometheus sees it ("up", "down",
    /// "unknown") and its last error.
    pub fn target_health(&self) -> (String, String) {
        let v = self.api("/api/v1/targets").unwrap_or(Value::Null);
        let t = &v["data"]["activeTargets"][0];
        (
            t["health"].as_str().unwrap_or("none").to_string(),
            t["lastError"].as_str().unwrap_or("").to_string(),
        )
    }

    /// An instant query: each series' labels and value.
    pub fn query(&self, promql: &str) -> Result<Vec<(Value, f64)>, String> {
        let v = self.api(&format!("/api/v1/query?query={}", url_encode(promql)))?;
        if v["status"] != "success" {
            return Err(format!("query {promql:?}: {v}"));
        }
        Ok(v["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .map(|s| {
                        let value = s["value"][1].as_str().and_then(|x| x.parse().ok()).unwrap_or(f64::NAN);
                        (s["metric"].clone(), value)
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    fn api(&self, path: &str) -> Result<Value, String> {
        let r = http_get(self.port, path, "application/json")?;
        serde_json::from_str(&r.body).map_err(|e| format!("{path}: {e}: {}", r.body))
    }

    /// Prometheus's output so far, for assertion messages.
    pub fn describe(&mut self) -> String {
        self.child.describe()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.child.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query-string value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
