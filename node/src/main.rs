//! cairn-node: the per-node data-plane daemon. See `cairn-node --help` and docs/node.md.
//!
//! Parses flags, loads the config, sets up logging and hands over to
//! [`cairn_node::daemon::run`]. Any start-up failure (a taken port, a locked pool, a bad
//! `--volume`) exits 1 with a message naming the thing.

use cairn_node::config::{Cli, LogFormat, NodeConfig};
use clap::Parser as _;
use std::io::IsTerminal;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print and exit 0; a bad flag or spec exits 1 like any other
        // refusal to start.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            drop(e.print());
            return ExitCode::from(1);
        }
    };
    let config = match NodeConfig::load(&cli) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    init_logging(config.log_format);
    match cairn_node::daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cairn-node stopped");
            fail(&e)
        }
    }
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("cairn-node: error: {e}");
    ExitCode::from(1)
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
