//! Running `tracer live --json` ([`run_tracer`], [`Tracer`]) and parsing
//! what it printed ([`TracerOutput`], [`Leak`]).

use std::fmt::Write as _;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use serde_json::Value;

use crate::addr::normalize_addr;
use crate::child::Child;
use crate::fixture::{start_client, wait_client_done, SockLine};
use crate::paths::tracer_bin;

/// A running `tracer live --json ...`.
pub struct Tracer {
    child: Child,
}

/// Spawns `tracer live --json ARGS...` with stdout and stderr piped.
pub fn run_tracer(args: &[&str]) -> Tracer {
    let mut cmd = Command::new(tracer_bin());
    cmd.arg("live").arg("--json").args(args);
    Tracer {
        child: Child::spawn(&format!("tracer live --json {}", args.join(" ")), cmd),
    }
}

/// Spawns `tracer daemon ARGS...` (its stdout is JSON lines too: start,
/// each leak and late close, losses, the summary at SIGTERM; read them
/// with [`crate::reduced::finish`]).
pub fn run_daemon(args: &[&str]) -> Child {
    let mut cmd = Command::new(tracer_bin());
    cmd.arg("daemon").args(args);
    Child::spawn(&format!("tracer daemon {}", args.join(" ")), cmd)
}

/// A fixture client started with `--wait-stdin-line` (its `CLIENT_ARGS`
/// and `--count count`), traced by `tracer live --json --pid <it>
/// TRACER_ARGS...`, and let go once the tracer has started. With `--pid`
/// only the client's own events count, so once it is done the tracer's
/// counters are final. Returns when the client has made its connections.
pub fn trace_held_client(client_args: &[&str], count: usize, tracer_args: &[&str]) -> (Child, Vec<SockLine>, Tracer) {
    let count_arg = count.to_string();
    let mut args = client_args.to_vec();
    args.extend(["--count", &count_arg, "--wait-stdin-line"]);
    let mut client = start_client(&args);
    let pid = client.pid().to_string();
    let mut targs = vec!["--pid", pid.as_str()];
    targs.extend_from_slice(tracer_args);
    let mut tracer = run_tracer(&targs);
    tracer.wait_started(Duration::from_secs(20));
    client.send_line("go");
    let socks = wait_client_done(&mut client, count);
    (client, socks, tracer)
}

fn parse_json_line(line: &str) -> Option<Value> {
    serde_json::from_str::<Value>(line).ok().filter(Value::is_object)
}

fn is_type(v: &Value, ty: &str) -> bool {
    v.get("type").and_then(Value::as_str) == Some(ty)
}

impl Tracer {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits for the `{"type":"start",...}` line and returns it.
    pub fn wait_started(&mut self, timeout: Duration) -> Value {
        self.wait_json("start", timeout)
    }

    /// Waits for the next JSON line of type `ty` and returns it.
    pub fn wait_json(&mut self, ty: &str, timeout: Duration) -> Value {
        let line = self
            .child
            .wait_line(|l| parse_json_line(l).is_some_and(|v| is_type(&v, ty)), timeout);
        parse_json_line(&line).expect("matched above")
    }

    /// Is the tracer still running?
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Waits for the tracer to exit on its own (it must have been given
    /// `--duration` or `--pid`), then parses every stdout line as JSON.
    /// Panics (with stdout and stderr) on timeout or on a non-JSON line.
    pub fn finish(mut self, timeout: Duration) -> TracerOutput {
        let Some(status) = self.child.wait_finished(timeout) else {
            let desc = self.child.describe();
            self.child.kill();
            panic!("tracer did not exit within {timeout:?}\n{desc}");
        };
        let stderr = self.child.stderr_text();
        let lines = self.child.lines_seen().to_vec();
        let mut objects = Vec::with_capacity(lines.len());
        for line in lines {
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if v.is_object() && v.get("type").is_some_and(Value::is_string) => objects.push(v),
                _ => panic!(
                    "tracer printed a stdout line that is not a JSON object with a \"type\": \
                     {line:?}\n{}",
                    self.child.describe()
                ),
            }
        }
        TracerOutput {
            objects,
            status,
            stderr,
        }
    }
}

/// Everything a finished tracer printed.
#[derive(Debug)]
pub struct TracerOutput {
    pub objects: Vec<Value>,
    pub status: ExitStatus,
    pub stderr: String,
}

impl TracerOutput {
    /// All objects of the given `type`, in output order.
    pub fn of_type(&self, ty: &str) -> Vec<&Value> {
        self.objects.iter().filter(|v| is_type(v, ty)).collect()
    }

    /// Compact dump of the whole output, for assertion messages.
    pub fn dump(&self) -> String {
        let mut out = format!("tracer exit status: {}\n--- stdout:\n", self.status);
        for o in &self.objects {
            let _ = writeln!(out, "  {o}");
        }
        let _ = write!(out, "--- stderr:\n{}", self.stderr);
        out
    }

    /// Asserts that the tracer exited with status 0.
    pub fn assert_success(&self) {
        assert!(self.status.success(), "tracer failed\n{}", self.dump());
    }

    /// The one `start` object.
    pub fn start(&self) -> &Value {
        let starts = self.of_type("start");
        assert_eq!(starts.len(), 1, "expected exactly one start object\n{}", self.dump());
        starts[0]
    }

    /// The one `summary` object.
    pub fn summary(&self) -> &Value {
        let sums = self.of_type("summary");
        assert_eq!(sums.len(), 1, "expected exactly one summary object\n{}", self.dump());
        sums[0]
    }

    /// `summary["leaks"]`.
    pub fn leaks(&self) -> &[Value] {
        self.summary()
            .get("leaks")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("summary has no \"leaks\" array\n{}", self.dump()))
    }

    /// `summary["leaks"]`, each checked against the contract and parsed.
    pub fn summary_leaks(&self) -> Vec<Leak> {
        self.leaks().iter().map(Leak::from_json).collect()
    }

    /// All `leak` (or other leak-shaped, e.g. `late_close`) events.
    pub fn leak_events(&self, ty: &str) -> Vec<Leak> {
        self.of_type(ty).into_iter().map(Leak::from_json).collect()
    }
}

/// A leak object (summary entry, `leak` or `late_close` event), with every
/// field of the contract checked for presence and type.
#[derive(Clone, Debug)]
pub struct Leak {
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    /// Normalised with [`normalize_addr`] (the raw value is in `json`).
    pub local: String,
    pub remote: String,
    pub cookie: u64,
    pub close_wait_ms: u64,
    pub close_wait_estimated: bool,
    pub fd: Option<i32>,
    /// Only on `late_close` events.
    pub closed_after_ms: Option<u64>,
    pub json: Value,
}

impl Leak {
    pub fn from_json(v: &Value) -> Leak {
        let field = |name: &str| {
            v.get(name)
                .unwrap_or_else(|| panic!("leak object has no {name:?}: {v}"))
        };
        let uint = |name: &str| {
            field(name)
                .as_u64()
                .unwrap_or_else(|| panic!("leak {name:?} is not an unsigned integer: {v}"))
        };
        let string = |name: &str| {
            field(name)
                .as_str()
                .unwrap_or_else(|| panic!("leak {name:?} is not a string: {v}"))
                .to_string()
        };
        let fd = match field("fd") {
            Value::Null => None,
            f => Some(
                f.as_u64()
                    .and_then(|n| i32::try_from(n).ok())
                    .unwrap_or_else(|| panic!("leak \"fd\" is neither null nor an fd: {v}")),
            ),
        };
        Leak {
            pid: u32::try_from(uint("pid")).unwrap_or_else(|_| panic!("leak pid too big: {v}")),
            comm: string("comm"),
            cmdline: string("cmdline"),
            local: normalize_addr(&string("local")),
            remote: normalize_addr(&string("remote")),
            cookie: uint("cookie"),
            close_wait_ms: uint("close_wait_ms"),
            close_wait_estimated: field("close_wait_estimated")
                .as_bool()
                .unwrap_or_else(|| panic!("leak \"close_wait_estimated\" is not a bool: {v}")),
            fd,
            closed_after_ms: v.get("closed_after_ms").and_then(Value::as_u64),
            json: v.clone(),
        }
    }

    /// The raw (un-normalised) `local` / `remote` strings.
    pub fn raw_local(&self) -> &str {
        self.json["local"].as_str().unwrap_or_default()
    }

    pub fn raw_remote(&self) -> &str {
        self.json["remote"].as_str().unwrap_or_default()
    }
}
