//! The command line of `server`, `client` and `run`: [`Opts`], checked
//! against what each role accepts.

use std::time::Duration;

use crate::sys::MAX_ADDRS;
use crate::{Error, Result};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
    Run,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Churn,
    ChurnLeak,
    ManySockets,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Churn => "churn",
            Mode::ChurnLeak => "churn-leak",
            Mode::ManySockets => "many-sockets",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Opts {
    pub mode: Mode,
    pub port: u16,
    pub addrs: usize,
    pub threads: usize,
    pub server_threads: usize,
    pub duration: Option<Duration>,
    pub leak_percent: f64,
    pub leak_max: usize,
    pub open: usize,
    /// Churn connections per second in all; 0: unpaced.
    pub rate: f64,
    pub sync: bool,
}

impl Opts {
    pub fn parse(args: &[String], role: Role) -> Result<Opts> {
        let mut o = Opts {
            mode: Mode::Churn,
            port: 0,
            addrs: 64,
            threads: 2,
            server_threads: 2,
            duration: None,
            leak_percent: 1.0,
            leak_max: 10_000,
            open: 0,
            rate: 0.0,
            sync: false,
        };
        let mut open_given = false;
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let allowed = match flag.as_str() {
                "--threads" | "--addrs" | "--duration" => true,
                "--port" => role != Role::Run,
                "--open" => role != Role::Server,
                "--mode" | "--leak-percent" | "--leak-max" | "--rate" => role != Role::Server,
                "--sync" => role == Role::Client,
                "--server-threads" => role == Role::Run,
                _ => false,
            };
            if !allowed {
                return Err(Error::Usage(format!("unknown option {flag}")));
            }
            if flag == "--sync" {
                o.sync = true;
                continue;
            }
            let value = it.next().ok_or_else(|| Error::Usage(format!("{flag} needs a value")))?;
            let bad = || Error::Usage(format!("bad value for {flag}: {value}"));
            match flag.as_str() {
                "--threads" => o.threads = value.parse().map_err(|_| bad())?,
                "--server-threads" => o.server_threads = value.parse().map_err(|_| bad())?,
                "--addrs" => o.addrs = value.parse().map_err(|_| bad())?,
                "--port" => o.port = value.parse().map_err(|_| bad())?,
                "--leak-max" => o.leak_max = value.parse().map_err(|_| bad())?,
                "--open" => {
                    o.open = value.parse().map_err(|_| bad())?;
                    open_given = true;
                }
                "--duration" => {
                    let secs: f64 = value.parse().map_err(|_| bad())?;
                    if !(secs.is_finite() && secs > 0.0) {
                        return Err(bad());
                    }
                    o.duration = Some(Duration::from_secs_f64(secs));
                }
                "--rate" => {
                    o.rate = value.parse().map_err(|_| bad())?;
                    if !(o.rate.is_finite() && o.rate >= 0.0) {
                        return Err(bad());
                    }
                }
                "--leak-percent" => {
                    o.leak_percent = value.parse().map_err(|_| bad())?;
                    if !(0.0..=100.0).contains(&o.leak_percent) {
                        return Err(bad());
                    }
                }
                "--mode" => {
                    o.mode = match value.as_str() {
                        "churn" => Mode::Churn,
                        "churn-leak" => Mode::ChurnLeak,
                        "many-sockets" => Mode::ManySockets,
                        _ => return Err(bad()),
                    }
                }
                _ => unreachable!("checked above"),
            }
        }
        if o.mode == Mode::ManySockets && !open_given {
            o.open = 100_000;
        }
        if o.threads == 0 || o.server_threads == 0 {
            return Err(Error::Usage("--threads must be at least 1".into()));
        }
        if o.addrs == 0 || o.addrs > MAX_ADDRS {
            return Err(Error::Usage(format!("--addrs must be between 1 and {MAX_ADDRS}")));
        }
        if role != Role::Server {
            if o.duration.is_none() {
                o.duration = Some(Duration::from_secs(5));
            }
            if role == Role::Client && o.port == 0 {
                return Err(Error::Usage(
                    "client needs --port (the server's READY line names it)".into(),
                ));
            }
        }
        Ok(o)
    }

    pub fn duration(&self) -> Duration {
        self.duration.unwrap_or(Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str, role: Role) -> Result<Opts> {
        let args: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
        Opts::parse(&args, role)
    }

    #[test]
    fn rate_is_a_client_option() {
        let o = parse("--port 1 --rate 2000", Role::Client).expect("valid");
        assert_eq!(o.rate, 2000.0);
        assert_eq!(parse("--port 1", Role::Client).expect("valid").rate, 0.0);
        assert!(parse("--rate 5", Role::Run).is_ok());
        assert!(matches!(parse("--rate 5", Role::Server), Err(Error::Usage(_))));
        assert!(matches!(
            parse("--port 1 --rate -1", Role::Client),
            Err(Error::Usage(_))
        ));
        assert!(matches!(parse("--port 1 --rate x", Role::Client), Err(Error::Usage(_))));
    }

    #[test]
    fn many_sockets_defaults_to_100k_idle() {
        let o = parse("--port 1 --mode many-sockets", Role::Client).expect("valid");
        assert_eq!((o.mode, o.open), (Mode::ManySockets, 100_000));
        let o = parse("--port 1 --mode many-sockets --open 5", Role::Client).expect("valid");
        assert_eq!(o.open, 5);
    }
}
