//! `policy-dispatcher`: runs the agent chains. Start several to share load.
#![forbid(unsafe_code)]

use clap::Parser;

/// mimalloc rather than glibc's malloc: a decision allocates and frees many small buffers
/// (headers, the state, encoded payloads) across threads, and glibc's allocator was a third
/// of the process's CPU under load (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "policy-dispatcher",
    version,
    about = "Runs policy-bus agent chains and answers with decisions"
)]
struct Cli {
    #[command(flatten)]
    common: daemon::Common,
    /// Events this instance handles at once; past it, new events wait in NATS. More costs
    /// memory and, past a few hundred, throughput (docs/performance.md).
    #[arg(long, default_value_t = 512)]
    max_in_flight: usize,
    /// Admin commands this instance handles at once.
    #[arg(long, default_value_t = 16)]
    max_admin_in_flight: usize,
    /// Largest event payload, in bytes; a larger one is refused as bad-request.
    #[arg(long, default_value_t = 256 * 1024)]
    max_event_bytes: usize,
    /// Most items in any list (candidates) or map (labels) of an event.
    #[arg(long, default_value_t = 10_000)]
    max_candidates: usize,
    /// Longest string (a service, peer or label name) in an event, in bytes.
    #[arg(long, default_value_t = 1024)]
    max_string_bytes: usize,
    /// Largest answer an agent may give, in bytes; a larger one counts as a failed agent.
    #[arg(long, default_value_t = 512 * 1024)]
    max_patch_bytes: usize,
    /// Answers of pure agent kinds (acl; lb's static and consistent-hash) the verdict cache
    /// keeps at most, answering the same inputs without a call until the kind's policies
    /// change; 0 turns it off.
    #[arg(long, env = "POLICY_VERDICT_CACHE", default_value_t = 10_000)]
    verdict_cache: usize,
    /// Bytes the verdict cache may hold at most (keys and answers), whatever the number of
    /// entries: agents' answers can be up to --max-patch-bytes each.
    #[arg(long, env = "POLICY_VERDICT_CACHE_BYTES", default_value_t = bus::cache::DEFAULT_MAX_BYTES)]
    verdict_cache_bytes: usize,
    /// Runtime worker threads: 1 (the default) runs everything on one thread, which costs the
    /// least CPU per request; 0 is one per core. Scale out with more instances instead.
    #[arg(long, env = "POLICY_WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
    /// Where to serve GET /metrics (Prometheus text or OpenMetrics), /healthz and /readyz;
    /// none unless given.
    #[arg(long, env = "POLICY_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// How long the decision log keeps a decision (`policyctl log`); set when the first
    /// dispatcher creates the log's stream.
    #[arg(long, env = "POLICY_DECISION_LOG_MAX_AGE", default_value = "24h", value_parser = humantime::parse_duration)]
    decision_log_max_age: std::time::Duration,
    /// Bytes the decision log may hold; past it the oldest decisions go first.
    #[arg(long, env = "POLICY_DECISION_LOG_MAX_BYTES", default_value_t = 1024 * 1024 * 1024)]
    decision_log_max_bytes: i64,
    /// Keep no decision log (the tap still streams decisions to whoever listens).
    #[arg(long, env = "POLICY_NO_DECISION_LOG")]
    no_decision_log: bool,
    /// Run as a site of a fleet: the JetStream domain of the hub, whose engine (prefix
    /// `<prefix>.fleet`) holds the fleet's configuration. This site's config bucket then takes
    /// the fleet's subscriptions and policies (keys under `fleet.`) beside its own, through
    /// the leaf connection; decisions never wait on the hub (docs/fleet.md).
    #[arg(long, env = "POLICY_FLEET_HUB", value_parser = hub_domain)]
    fleet_hub: Option<String>,
    /// Run as the hub of a fleet (prefix `<prefix>.fleet`), following these sites (their
    /// JetStream domains, comma-separated): each one's standing for `policyctl --fleet status`
    /// and its decision log for `policyctl --fleet log --site` (docs/fleet.md).
    #[arg(long, env = "POLICY_FLEET_SITES", value_delimiter = ',', value_parser = hub_domain, conflicts_with = "fleet_hub")]
    fleet_sites: Vec<String>,
}

fn hub_domain(s: &str) -> Result<String, String> {
    bus::fleet::check_domain(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    daemon::main("policy-dispatcher", cli.worker_threads, run(cli))
}

async fn run(cli: Cli) -> Result<(), dispatcher::DispatcherError> {
    daemon::init_logging(cli.common.log_json, "info");
    let telemetry = daemon::telemetry::Telemetry::new("policy-dispatcher");
    if let Some(addr) = cli.metrics_addr {
        telemetry.serve(addr).await.map_err(|e| {
            dispatcher::DispatcherError::Service(format!(
                "cannot listen for /metrics on {addr}: {e}"
            ))
        })?;
    }
    let options = dispatcher::Options {
        max_in_flight: cli.max_in_flight,
        max_admin_in_flight: cli.max_admin_in_flight,
        limits: bus::limits::Limits {
            max_event_bytes: cli.max_event_bytes,
            max_candidates: cli.max_candidates,
            max_string_bytes: cli.max_string_bytes,
            ..Default::default()
        },
        max_patch_bytes: cli.max_patch_bytes,
        verdict_cache: cli.verdict_cache,
        verdict_cache_bytes: cli.verdict_cache_bytes,
        telemetry: Some(telemetry),
        decision_log: (!cli.no_decision_log).then_some(bus::decisions::Retention {
            max_age: cli.decision_log_max_age,
            max_bytes: cli.decision_log_max_bytes,
        }),
        fleet_hub: cli.fleet_hub,
        fleet_sites: cli.fleet_sites,
    };
    dispatcher::run(&cli.common, options, daemon::shutdown_signal()).await
}
