//! `policy-dispatcher`: runs the agent chains. Start several to share load.
#![forbid(unsafe_code)]

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
    daemon::exit("policy-dispatcher", run(Cli::parse()).await)
}

async fn run(cli: Cli) -> Result<(), dispatcher::DispatcherError> {
    daemon::init_logging(cli.common.log_json, "info");
    let options = dispatcher::Options {
        max_in_flight: cli.max_in_flight,
    };
    dispatcher::run(&cli.common, options, daemon::shutdown_signal()).await
}
