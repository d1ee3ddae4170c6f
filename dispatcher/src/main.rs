//! `policy-dispatcher`: runs the agent chains. Start several to share load.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "policy-dispatcher",
    version,
    about = "Runs policy-bus agent chains and answers with decisions"
)]
struct Cli {
    #[command(flatten)]
    common: daemon::Common,
    /// Events this instance handles at once; past it, new events wait in NATS.
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("policy-dispatcher: {}", daemon::one_line(e.chain()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    daemon::init_logging(cli.common.log_json, "info");
    let options = dispatcher::Options {
        max_in_flight: cli.max_in_flight,
    };
    dispatcher::run(&cli.common, options, daemon::shutdown_signal())
        .await
        .context("policy-dispatcher failed")
}
