//! `tracer`: finds TCP sockets leaked in CLOSE_WAIT, and who leaks them.

mod cli;
mod clock;
mod correlate;
mod daemon;
mod decode;
mod engine;
mod evidence;
mod export;
mod findings;
mod input;
mod jvm;
mod kernel;
mod live;
mod privileges;
mod procs;
mod record;
mod replay;
mod sink;
mod snapshot;
mod stacks;

use std::process::ExitCode;

use clap::{error::ErrorKind, Parser as _};

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(2);
        }
        Err(e) => {
            // One line that says what is wrong; --help has the rest.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("error: invalid arguments");
            eprintln!("{first} (see `tracer --help`)");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();

    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            cli::Command::Live(a) => {
                live::run(
                    a.trace,
                    live::Output::Live {
                        json: a.json,
                        events: a.events,
                    },
                )
                .await
            }
            cli::Command::Record(a) => {
                if a.rotate.is_some() && a.max_size.is_none() {
                    anyhow::bail!(
                        "--rotate needs --max-size: the size at which the recording goes on in the next file"
                    );
                }
                live::run(
                    a.trace,
                    live::Output::Record {
                        path: a.output,
                        max_size: a.max_size,
                        rotate: a.rotate,
                    },
                )
                .await
            }
            cli::Command::Daemon(a) => daemon::run(a).await,
            cli::Command::Report(a) => replay::report(&a),
            cli::Command::Export(a) => export::export(&a),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain joined, without a backtrace.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
