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
}

#[derive(Debug, Args)]
pub struct LiveArgs {
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

    /// JSON Lines on stdout, one object per line, each with a "type".
    #[arg(long)]
    pub json: bool,

    /// Also print every TCP state change, accept and close (costly on a
    /// busy host: printing is dearer than tracing).
    #[arg(long)]
    pub events: bool,

    /// How often to print a status line.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub status_interval: Duration,

    /// Ring buffer size in bytes (power of two, multiple of the page size).
    #[arg(long, value_name = "BYTES", default_value_t = 8 << 20, value_parser = parse_ring_bytes, hide = true)]
    pub ring_bytes: u32,

    /// Entries in the kernel's stack map. When full, new stacks are lost
    /// and counted (stack_errors).
    #[arg(long, value_name = "N", default_value_t = 16384, hide = true)]
    pub stack_entries: u32,

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
}
