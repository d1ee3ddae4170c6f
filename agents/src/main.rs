//! `policy-agent <kind>`: runs one agent kind in its queue group.
#![forbid(unsafe_code)]

use agents::kinds::{acl::Acl, lb::Lb};
use agents::runtime;
use anyhow::Context;
use bus::Action;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "policy-agent",
    version,
    about = "Runs a policy-bus agent of one kind"
)]
struct Cli {
    #[command(flatten)]
    common: daemon::Common,
    #[command(subcommand)]
    kind: KindCmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Default {
    Allow,
    Deny,
}

#[derive(Subcommand)]
enum KindCmd {
    /// Access control: allow or deny by service, peer and direction.
    Acl {
        /// What happens when no rule matches.
        #[arg(long, value_enum, default_value = "deny")]
        default: Default,
    },
    /// Load balancer: picks the target peer among the candidates.
    Lb,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    daemon::init_logging(cli.common.log_json, "info");
    let shutdown = daemon::shutdown_signal();
    match cli.kind {
        KindCmd::Acl { default } => {
            let default = match default {
                Default::Allow => Action::Allow,
                Default::Deny => Action::Deny,
            };
            runtime::run(Acl { default }, &cli.common, shutdown).await
        }
        KindCmd::Lb => runtime::run(Lb, &cli.common, shutdown).await,
    }
    .context("policy-agent failed")
}
