//! Every flag, its help and its parsing, in one place.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tracer",
    version,
    about = "Find TCP sockets leaked in CLOSE_WAIT: the peer closed, the owning process never did.",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace live: report leaks as they happen, and a summary at exit.
    Live(LiveArgs),
    /// Record to a file for later analysis (on this or another machine).
    Record(RecordArgs),
    /// Run on every host: serve Prometheus metrics (`/metrics`), health
    /// (`/healthz`) and the current leaks (`/leaks`) over HTTP, and log each
    /// new leak and late close as a JSON line, until SIGTERM or SIGINT.
    Daemon(DaemonArgs),
    /// Analyse recordings: the same findings `live` would have printed.
    Report(ReportArgs),
    /// Convert a recording: jsonl, chrome-trace, folded or flamegraph.
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub struct LiveArgs {
    #[command(flatten)]
    pub trace: TraceArgs,

    /// JSON Lines on stdout, one object per line, each with a "type".
    #[arg(long)]
    pub json: bool,

    /// Also print every TCP state change, accept and close (costly on a
    /// busy host: printing is dearer than tracing). An output option, so
    /// not `record`'s (which prints no findings; `report --events` prints
    /// the recorded events).
    #[arg(long)]
    pub events: bool,
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    #[command(flatten)]
    pub trace: TraceArgs,

    /// The recording to write (created with mode 0600: it holds command
    /// lines and addresses).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: std::path::PathBuf,

    /// Stop recording, with a message, when the file reaches this size
    /// (e.g. 100M, 2G); with --rotate, go on in the next file instead.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,

    /// Rotate as tcpdump's -C/-W: when a file reaches --max-size, the
    /// recording goes on in the next one, and only the last N files are
    /// kept. The files are FILE.000000, FILE.000001, ... (each one a
    /// recording that `report` reads alone; `tracer report FILE.*` reads
    /// them in order).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub rotate: Option<u32>,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub trace: TraceArgs,

    /// Address and port to serve HTTP on, for example 0.0.0.0:9469 (every
    /// interface) or 127.0.0.1:9469.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: std::net::SocketAddr,

    /// Most label sets per leak metric; the label sets with the fewest
    /// leaks beyond it are folded into one series with comm="(other)",
    /// and counted in tracer_leak_series_folded.
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_series: u32,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Recordings, in order (e.g. consecutive recordings of one host).
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<std::path::PathBuf>,

    /// Only this process's sockets.
    #[arg(long, value_name = "PID", value_parser = parse_pid)]
    pub pid: Option<u32>,

    /// Leak threshold (default: the one the recording was made with).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub leak_after: Option<Duration>,

    /// JSON Lines on stdout, the same shapes as `live --json`.
    #[arg(long)]
    pub json: bool,

    /// Also print every recorded event.
    #[arg(long)]
    pub events: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ExportFormat {
    /// Every record as one JSON object per line (for jq, DuckDB).
    Jsonl,
    /// Socket lifetimes as spans per process (Perfetto, chrome://tracing).
    ChromeTrace,
    /// Leak stacks in the folded format flame-graph tools read.
    Folded,
    /// An SVG flame graph of the stacks that leaked.
    Flamegraph,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<std::path::PathBuf>,

    #[arg(long, value_enum)]
    pub format: ExportFormat,

    /// Write here instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: Option<std::path::PathBuf>,
}

/// What `live` and `record` share: what to trace, and for how long.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Only this process's sockets (all its threads), including sockets it
    /// opened before the tracer started. Ends when the process exits.
    #[arg(long, value_name = "PID", value_parser = parse_pid)]
    pub pid: Option<u32>,

    /// A socket still in CLOSE_WAIT this long after the FIN arrived, and not
    /// closed by its owner, is reported as leaked.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub leak_after: Duration,

    /// Stop after this long and print the summary (default: until Ctrl-C,
    /// SIGTERM, or the --pid process exits).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Also capture kernel stacks where sockets are opened and closed. Off
    /// by default: each costs a kernel unwind (~5 µs), and they are nearly
    /// always the same syscall path.
    #[arg(long, conflicts_with = "no_stacks")]
    pub kernel_stacks: bool,

    /// Capture no stacks at all (a user stack where a socket is opened costs
    /// ~3 µs; see --stack-rate). Leaks are still found, with all their
    /// other evidence.
    #[arg(long)]
    pub no_stacks: bool,

    /// Open stacks (connect, accept) per process and CPU per second, in
    /// bursts of as many. A stack costs ~3 µs; a process opening sockets
    /// faster gets stacks for a sample of its opens, and the rest are
    /// counted (stacks_sampled_out) and their leaks say so. 0: a stack for
    /// every open, whatever it costs.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub stack_rate: u32,

    /// How often to print a status line.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub status_interval: Duration,

    /// Ring buffer size in bytes (power of two, multiple of the page size).
    /// Default: 8 MiB where every event is sent (`--events`, `record`),
    /// 4 MiB where sockets are followed in the kernel (little is sent; the
    /// buffer's pages are all resident in the agent, mapped twice).
    #[arg(long, value_name = "BYTES", value_parser = parse_ring_bytes, hide = true)]
    pub ring_bytes: Option<u32>,

    /// Entries in the kernel's `--pid` watch list (sockets of the watched
    /// process). When full, more are counted (watch_full), not watched.
    #[arg(long, value_name = "N", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..), hide = true)]
    pub watch_entries: u32,

    /// Entries in the kernel's list of reported leaks (whose close gets a
    /// stack). When full, more are counted (reported_full).
    #[arg(long, value_name = "N", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..), hide = true)]
    pub reported_entries: u32,

    /// Entries in the kernel's map of followed sockets in CLOSE_WAIT
    /// (default `live`). When full, their records go through the ring
    /// buffer instead (close_wait_spilled).
    #[arg(long, value_name = "N", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..), hide = true)]
    pub close_wait_entries: u32,

    /// Send every event to userspace, as `--events` and `record` do, instead
    /// of following sockets in the kernel; nothing more is printed (for
    /// tests and measurements of that path).
    #[arg(long, hide = true)]
    pub every_event: bool,

    /// Slots in the kernel's table of followed sockets' openers (default
    /// `live`; rounded up to a power of two), and at most 16384 entries
    /// in its overflow map. When both are full, more are counted
    /// (owners_full): their leaks come without owner.
    #[arg(long, value_name = "N", default_value_t = 1 << 17, value_parser = clap::value_parser!(u32).range(1..), hide = true)]
    pub socket_entries: u32,

    /// Most sockets the agent tracks at once; beyond, new ones are counted
    /// as untracked.
    #[arg(long, value_name = "N", default_value_t = 1 << 20, hide = true)]
    pub max_sockets: usize,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|_| "expected a duration such as 5s, 500ms or 2m".to_string())?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match t[i..].to_ascii_lowercase().as_str() {
                "b" => 1,
                "k" | "kb" | "kib" => 1 << 10,
                "m" | "mb" | "mib" => 1 << 20,
                "g" | "gb" | "gib" => 1 << 30,
                _ => return Err("expected a size such as 4096, 512K, 100M or 2G".into()),
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| "expected a size such as 4096, 512K, 100M or 2G".to_string())?;
    let bytes = n.checked_mul(mult).ok_or("size too large")?;
    if bytes < 64 << 10 {
        return Err("must be at least 64K".into());
    }
    Ok(bytes)
}

fn parse_pid(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) | Err(_) => Err("expected a process id (a positive integer)".into()),
        Ok(p) => Ok(p),
    }
}

fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| "expected a number of bytes".to_string())?;
    if !n.is_power_of_two() || n < 4096 {
        return Err("must be a power of two of at least 4096".into());
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("banana").is_err());
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert!(parse_size("10").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn pids() {
        assert_eq!(parse_pid("42"), Ok(42));
        assert!(parse_pid("0").is_err());
        assert!(parse_pid("-1").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tracer").chain(args.iter().copied()))
    }

    #[test]
    fn rotate_takes_a_positive_number_of_files() {
        let Command::Record(a) = parse(&["record", "-o", "f", "--max-size", "1M", "--rotate", "4"])
            .unwrap()
            .command
        else {
            panic!("record")
        };
        assert_eq!((a.max_size, a.rotate), (Some(1 << 20), Some(4)));
        let Command::Record(a) = parse(&["record", "-o", "f"]).unwrap().command else {
            panic!("record")
        };
        assert_eq!((a.max_size, a.rotate), (None, None));
        for bad in ["0", "-1", "many", "4294967296"] {
            assert!(
                parse(&["record", "-o", "f", "--max-size", "1M", "--rotate", bad]).is_err(),
                "{bad}"
            );
        }
        // Without --max-size it parses, and `main` refuses it in one line.
        assert!(parse(&["record", "-o", "f", "--rotate", "2"]).is_ok());
    }

    #[test]
    fn events_is_an_output_option_of_live_and_report_only() {
        let Command::Live(a) = parse(&["live", "--events", "--json"]).unwrap().command else {
            panic!("live")
        };
        assert!(a.events && a.json);
        let Command::Live(a) = parse(&["live", "--pid", "7"]).unwrap().command else {
            panic!("live")
        };
        assert!(!a.events && a.trace.pid == Some(7));
        let Command::Report(a) = parse(&["report", "--events", "f"]).unwrap().command else {
            panic!("report")
        };
        assert!(a.events);
        let e = parse(&["record", "-o", "f", "--events"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument);
        assert!(e.to_string().contains("--events"), "{e}");
    }
}
