//! `policyctl`: the operator's CLI for policy-bus.
#![forbid(unsafe_code)]

mod apply_parts;
mod auth;
mod bench;
mod commands;
mod declarative;
mod demo;
mod deploy;
mod explain;
mod files;
mod fleet_up;
mod jwt;
mod log;
mod output;
mod print;
mod servers;
mod tap;
mod top;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bus::admin::FailureMode;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "policyctl",
    version,
    about = "Operate a policy-bus engine over NATS"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: daemon::Common,
    /// Act on the fleet's configuration: the hub's engine, whose prefix is `<prefix>.fleet`
    /// (point `--nats-url` at the hub). Every site decides on it beside its own
    /// (docs/fleet.md).
    #[arg(long, env = "POLICY_FLEET", global = true)]
    pub fleet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// How `tap` prints decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TapOutput {
    /// One line a decision, as `policyctl up` shows them.
    Human,
    /// One JSON object a line.
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Failure {
    Closed,
    Open,
}

impl From<Failure> for FailureMode {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Closed => FailureMode::Closed,
            Failure::Open => FailureMode::Open,
        }
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Subscribe an agent kind to an event at a priority (lower runs first).
    Subscribe {
        /// The event (`new-connection`, `expose-service`, ...).
        event: String,
        /// The agent kind to run for it.
        agent: String,
        /// Its place in the chain: lower runs first, equal priorities run together.
        #[arg(long, allow_negative_numbers = true)]
        priority: i32,
        /// How long the dispatcher waits for this agent.
        #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// What a timeout or a dead agent does: `closed` denies, `open` skips (degraded).
        #[arg(long, value_enum, default_value = "closed")]
        failure: Failure,
        /// Send the event to the agent without waiting; it never changes the decision.
        #[arg(long)]
        observe: bool,
        /// Store it even if no instance of the agent kind is live, or the event is new.
        #[arg(long)]
        force: bool,
    },
    /// Remove an agent kind from an event's chain.
    Unsubscribe {
        /// The event, as subscribed (`new-connection`, ...).
        event: String,
        /// The agent kind to take out of its chain.
        agent: String,
    },
    /// List subscriptions, in chain order.
    Subscriptions {
        /// Only this event's chain.
        event: Option<String>,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Add, remove and list policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Agent kinds loaded at run time: WebAssembly modules that every `policy-agent wasm`
    /// serves.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Make the stored configuration equal files and folders (subscriptions.* files hold
    /// subscriptions, every other *.yaml, *.yml or *.json policies): all validated first, then
    /// stored in one step or not at all. Prints each change as `diff` marks it.
    Apply {
        /// Files and folders (a folder's configuration files are read, sorted by name); `-`
        /// reads policy documents from standard input. ClusterLink's AccessPolicy,
        /// PrivilegedAccessPolicy and their lists are read as written (docs/clusterlink.md).
        #[arg(required_unless_present = "filename")]
        paths: Vec<PathBuf>,
        /// A file, folder or `-`, as kubectl's `-f` (repeatable).
        #[arg(short = 'f', long)]
        filename: Vec<PathBuf>,
        /// Validate and print what would change; store nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also remove what is stored but not given (only in the sections given: without a
        /// subscriptions file, no subscription is removed).
        #[arg(long)]
        prune: bool,
        /// Store subscriptions of kinds with no live instance or of new events.
        #[arg(long)]
        force: bool,
        /// Skip each document that is refused (reported, exit 1) and store the rest at once,
        /// as ClusterLink's controllers take objects one by one. A skipped document's stored
        /// version, if any, stays as it is; `--prune` does not remove it.
        #[arg(long)]
        keep_going: bool,
        /// With --prune, remove only stored policies from this source (`clusterlink` for the
        /// documents made from ClusterLink's objects), even when no document of it is given:
        /// a sync of a cluster whose last object was deleted.
        #[arg(long, requires = "prune")]
        prune_source: Option<String>,
    },
    /// Add or update a folder of configuration, as `apply` without `--prune`: everything is
    /// validated before anything is stored, and nothing is removed.
    Load {
        /// The folder: subscriptions.yaml and policy files.
        dir: PathBuf,
    },
    /// Show how files and folders (as `apply` reads them) differ from the stored
    /// configuration: `+` added, `~` changed, `-` stored but not given. Exits 0 when equal, 1
    /// when they differ, 2 on an error.
    Diff {
        /// Files and folders; `-` reads standard input.
        #[arg(required_unless_present = "filename")]
        paths: Vec<PathBuf>,
        /// A file, folder or `-`, as kubectl's `-f` (repeatable).
        #[arg(short = 'f', long)]
        filename: Vec<PathBuf>,
    },
    /// The configuration revision (every change to the stored configuration bumps it) and
    /// how much is stored.
    Status {
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Write the stored subscriptions and policies into a folder (subscriptions.yaml,
    /// policies.yaml) that `diff` finds equal and `load` can apply.
    Export {
        /// The folder to write (created if missing; the two files are overwritten).
        dir: PathBuf,
    },
    /// Act as a hookpoint: send an event and print the decision. Values `[a,b]` are lists,
    /// `{k: v}` maps. The decision is real: conn-limit takes a slot and rate-limit a token
    /// (use --dry-run to change nothing).
    Emit {
        /// The event to send.
        event: String,
        /// Attributes as key=value.
        attributes: Vec<String>,
        /// Ask what would be decided, changing nothing (header `Policy-Dry-Run: true`).
        #[arg(long)]
        dry_run: bool,
    },
    /// Explain a decision without making it: each agent's answer and time, and which policy
    /// decided, for the live policy set (a dry run: nothing is taken or recorded).
    Explain {
        /// The event to explain.
        event: String,
        /// Attributes as key=value, as for `emit`.
        attributes: Vec<String>,
    },
    /// Run test cases (YAML: name, event, attributes, expect) against the live engine as
    /// dry runs; exits 1 if any case fails, 2 on an error.
    Test {
        /// Test files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Stream decisions from the tap, one line each (human, or JSON with `-o json`).
    Tap {
        /// Only this event's decisions.
        event: Option<String>,
        /// How to print: the one-line human form (the default) or JSON, one object a line.
        #[arg(short = 'o', long = "output", value_enum, default_value = "human")]
        output: TapOutput,
    },
    /// Read the durable decision log: what was decided, when and why, newest last; filters
    /// combine. The dispatchers keep it (bounded by age and size) unless told not to.
    Log {
        /// How far back to start.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        since: Duration,
        /// Only this event's decisions.
        #[arg(long)]
        event: Option<String>,
        /// Only decisions with this action.
        #[arg(long, value_parser = ["allow", "deny"])]
        action: Option<String>,
        /// Only decisions about this service (`dst_service`, or `service` of an expose).
        #[arg(long)]
        service: Option<String>,
        /// Only decisions this agent kind was called for or gave a reason in.
        #[arg(long)]
        agent: Option<String>,
        /// Stop after this many decisions.
        #[arg(long)]
        limit: Option<usize>,
        /// How to print: one human line a decision (the default), or JSON, one record a line.
        #[arg(short = 'o', long = "output", value_enum, default_value = "human")]
        output: TapOutput,
        /// At the hub of a fleet (with --fleet): this site's decisions, sourced from it; `all`
        /// for every site's.
        #[arg(long)]
        site: Option<String>,
    },
    /// A live view of the tap: decisions/s, deny ratio and latency percentiles per event and
    /// per agent, refreshed in place.
    Top {
        /// How often the view is refreshed.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Stop after this many refreshes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Start a local stack (NATS if none answers, dispatcher, every agent kind), load the
    /// examples and send sample traffic. Ctrl-C stops everything it started.
    Up {
        /// Folder with subscriptions.yaml and policy files.
        #[arg(long, default_value = "examples")]
        examples: PathBuf,
        /// Pause between sample events; 0 sends none (for `policyctl bench`).
        #[arg(long, default_value = "700ms", value_parser = humantime::parse_duration)]
        every: Duration,
        /// Where the monitor serves GET /metrics.
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics_addr: String,
        /// Run the bus secured: one nkey and least-privilege permissions per role (see
        /// `policyctl auth`); starts its own nats-server with them.
        #[arg(long)]
        secure: bool,
        /// Where --secure keeps nats.conf and the seeds (kept across runs).
        #[arg(long, default_value = auth::DEFAULT_DIR, requires = "secure")]
        auth_dir: PathBuf,
        /// Start a local JetStream cluster of this many nats-servers (client ports from
        /// --nats-url's up), the engine spread over it and its buckets replicated.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=9))]
        cluster: u16,
        /// Start a local fleet instead (docs/fleet.md): a hub on --nats-url's port and this many
        /// sites on the next ports, each its own nats-server and engine, the sites leaf nodes
        /// of the hub. --examples go to the hub (the fleet's), --site-examples to every site.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=9), conflicts_with = "cluster")]
        sites: Option<u16>,
        /// With --sites: every site's own documents.
        #[arg(long, default_value = "examples/fleet/site")]
        site_examples: PathBuf,
    },
    /// Print a shell completion script: `source <(policyctl completions bash)`, or save it
    /// where your shell loads completions from.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// GET an http:// URL and exit 0 when it answers 200, 1 otherwise: the containers'
    /// healthcheck of a process's /readyz (the image has no curl). Needs no NATS.
    Probe {
        /// For example http://127.0.0.1:9090/readyz.
        url: String,
    },
    /// Credentials and permissions for a secured bus: one nkey per role, and the nats-server
    /// configuration that gives each role exactly what it needs.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Drive load and report decisions/s and latency next to the raw NATS request/reply floor.
    Bench {
        /// The event to send.
        #[arg(long, default_value = "new-connection")]
        event: String,
        /// Events (and floor requests) in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// How long each of the two phases (floor, then events) runs.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Event attributes as key=value, each overriding that field of the event's sample.
        attributes: Vec<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Bench this chain: the event's deciding subscriptions are set to it for the run and
        /// put back after. Stages separated by `,`, kinds sharing a stage by `+`, for example
        /// `acl,lb,conn-limit+rate-limit`.
        #[arg(long)]
        chain: Option<crate::bench::ChainSpec>,
        /// The operator's nkey seed, to set --chain on a secured bus (the load itself runs
        /// with --nkey-file, a gateway's).
        #[arg(long, value_name = "FILE", requires = "chain")]
        operator_nkey_file: Option<PathBuf>,
        /// Send the events as dry runs. Without it, the bench's events are real: conn-limit
        /// takes slots (held until their lease, as nothing closes them) and rate-limit spends
        /// tokens.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
pub enum AuthCommand {
    /// Write a seed for every shipped role (existing ones are kept) and DIR/nats.conf.
    Init {
        /// Where the seeds and nats.conf go (kept: existing seeds are not replaced).
        #[arg(long, default_value = auth::DEFAULT_DIR)]
        auth_dir: PathBuf,
        /// Also write the operator-mode setup: an operator, account and user JWTs with the
        /// same permissions, DIR/<role>.creds files and DIR/nats-jwt.conf (a memory resolver).
        #[arg(long)]
        jwt: bool,
    },
    /// Add a role for a third-party agent kind (DIR/agent-<kind>.nk) and rewrite
    /// DIR/nats.conf (and the operator-mode files, if written); reload the server afterwards.
    AddAgent {
        /// The third-party agent kind.
        kind: String,
        /// The folder `auth init` wrote.
        #[arg(long, default_value = auth::DEFAULT_DIR)]
        auth_dir: PathBuf,
    },
    /// Print the permission set as a nats-server configuration template for your own NATS,
    /// with each role's public nkey taken from an environment variable.
    Template,
    /// Write a secured fleet's files (docs/fleet.md): DIR/hub/ for the hub (its engine's
    /// seeds, each site's leaf users) and DIR/<site>/ for each site (its engine's seeds, its
    /// leaf seeds and connections); each folder's nats.conf runs that server. Existing seeds
    /// are kept; run again with more sites to add them, then reload the hub.
    Fleet {
        /// The sites' names, which are their JetStream domains.
        #[arg(long, value_delimiter = ',', required = true)]
        sites: Vec<String>,
        /// The hub's JetStream domain.
        #[arg(long, default_value = "hub")]
        hub_domain: String,
        /// Where the hub takes the sites' leaf connections.
        #[arg(long, default_value = "0.0.0.0:7422")]
        leaf_listen: String,
        /// Where the sites reach the hub's leaf port.
        #[arg(long, default_value = "nats-leaf://hub:7422")]
        hub_url: String,
        /// Where the folders go.
        #[arg(long, default_value = "policy-bus-fleet")]
        auth_dir: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Store a WebAssembly module (binary .wasm or text .wat) as agent kind KIND, after a wasm
    /// host checked that it loads. Every wasm host then serves KIND, or swaps to this version
    /// without a restart; subscribe KIND to events as any kind.
    Deploy {
        /// The kind's name: its queue group and subject token (not a shipped kind's).
        kind: String,
        /// The module.
        file: PathBuf,
        /// Store it although no wasm host is live to check it.
        #[arg(long)]
        force: bool,
        /// How long to wait for every live wasm host to serve this version (0: do not wait).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// Remove a deployed module: every wasm host drains the kind and stops serving it.
    Remove {
        /// The kind to remove.
        kind: String,
    },
    /// List the deployed modules.
    List {
        #[command(flatten)]
        output: output::OutputArgs,
    },
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Add policies from YAML files; every document is validated before any is stored.
    Add {
        /// A policy file (YAML; `---` between documents); give -f once per file.
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
    /// Remove one policy.
    Remove {
        /// The policy's agent kind.
        agent: String,
        /// The policy's id.
        id: String,
    },
    /// List policies; `-o yaml` or `-o json` prints documents `apply` reads back.
    List {
        /// Only this agent kind's policies (an error if it has none).
        agent: Option<String>,
        #[command(flatten)]
        output: output::OutputArgs,
    },
}

/// Writes `shell`'s completion script for every command and flag.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "policyctl", out);
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if cli.fleet {
        match bus::Subjects::new(&cli.common.prefix) {
            Ok(s) => cli.common.prefix = s.fleet().prefix().to_string(),
            Err(e) => {
                eprintln!("policyctl: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if matches!(cli.command, Command::Up { .. }) {
        // The decisions are the output; only warnings from policyctl itself.
        daemon::init_logging(cli.common.log_json, "warn");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("policyctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<explain::Exit>().is_some() => {
            let code = e.downcast_ref::<explain::Exit>().map_or(1, |x| x.0);
            eprintln!("policyctl: {}", daemon::one_line(e.chain()));
            ExitCode::from(code)
        }
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            // The reader of the output went away (`policyctl ... | head`): nothing to say.
            ExitCode::SUCCESS
        }
        Err(e) => {
            // One line a person can act on: the context chain, outermost first.
            eprintln!("policyctl: {}", daemon::one_line(e.chain()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[path = "main_tests.rs"]
mod tests;
