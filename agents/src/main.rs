//! `policy-agent <kind>`: runs one agent kind in its queue group.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use agents::kinds::conn_limit::{ConnLimiter, DEFAULT_LEASE};
use agents::kinds::monitor::Monitor;
use agents::kinds::rate_limit::RateLimiter;
use agents::kinds::{acl::Acl, lb::Lb};
use agents::metrics::AgentMetrics;
use agents::runtime;
use bus::Action;
use clap::{Parser, Subcommand, ValueEnum};
use daemon::telemetry::Telemetry;

/// mimalloc rather than glibc's malloc: a decision allocates and frees many small buffers
/// (headers, the state, encoded payloads) across threads, and glibc's allocator was a third
/// of the process's CPU under load (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "policy-agent",
    version,
    about = "Runs a policy-bus agent of one kind"
)]
struct Cli {
    #[command(flatten)]
    common: daemon::Common,
    /// Requests this instance handles at once; past it, new ones wait in NATS.
    #[arg(long, default_value_t = 1024, global = true)]
    max_in_flight: usize,
    /// Bytes a stateful kind's bucket (conn-limit's slots, rate-limit's budgets) may hold,
    /// set by the instance that creates it; a full bucket makes the limiter deny.
    #[arg(long, default_value_t = 256 * 1024 * 1024, global = true)]
    state_max_bytes: i64,
    /// Runtime worker threads: 1 (the default) runs everything on one thread, which costs the
    /// least CPU per request; 0 is one per core. Scale out with more instances instead.
    #[arg(
        long,
        env = "POLICY_WORKER_THREADS",
        default_value_t = 1,
        global = true
    )]
    worker_threads: usize,
    /// Where to serve GET /metrics (Prometheus text or OpenMetrics), /healthz and /readyz;
    /// none unless given, except for the monitor (127.0.0.1:9464).
    #[arg(long, env = "POLICY_METRICS_ADDR", global = true)]
    metrics_addr: Option<SocketAddr>,
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
    /// Connection limiter: at most N live connections per policy, across all instances.
    ConnLimit {
        /// How long a slot is held when its close never arrives (the slot bucket's max age;
        /// fixed by the first instance that creates the bucket).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        lease: Duration,
    },
    /// Rate limiter: new connections per key (GCRA, shared by all instances) and a
    /// per-connection bandwidth cap.
    RateLimit,
    /// WebAssembly host: serves every agent kind deployed as a module (`policyctl agent
    /// deploy`), loading, swapping and unloading them as they are deployed and removed.
    Wasm {
        /// Fuel per call (about one unit per WebAssembly instruction): a module that uses it up
        /// fails that call with agent-error.
        #[arg(long, default_value_t = 10_000_000)]
        fuel: u64,
        /// Memory a module may grow to in one call, in MiB.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
        max_memory_mib: u32,
    },
    /// Monitor: counts and latency histograms from the tap, served for Prometheus on
    /// --metrics-addr (127.0.0.1:9464 unless given).
    Monitor,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    daemon::main("policy-agent", cli.worker_threads, run(cli))
}

async fn run(cli: Cli) -> Result<(), runtime::AgentError> {
    let shutdown = daemon::shutdown_signal();
    let process = match &cli.kind {
        KindCmd::Wasm { .. } => bus::headers::WASM_HOST_SERVICE.to_string(),
        KindCmd::Monitor => "policy-agent-monitor".to_string(),
        KindCmd::Acl { .. } => "policy-agent-acl".to_string(),
        KindCmd::Lb => "policy-agent-lb".to_string(),
        KindCmd::ConnLimit { .. } => "policy-agent-conn-limit".to_string(),
        KindCmd::RateLimit => "policy-agent-rate-limit".to_string(),
    };
    // Spans are exported under the kind's own name.
    daemon::traces::set_process(&process);
    daemon::init_logging(cli.common.log_json, "info");
    let telemetry = Telemetry::new(&process);
    let metrics_addr = match (&cli.kind, cli.metrics_addr) {
        (_, Some(addr)) => Some(addr),
        (KindCmd::Monitor, None) => Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        _ => None,
    };
    if let Some(addr) = metrics_addr {
        telemetry.serve(addr).await.map_err(|e| {
            runtime::AgentError::Service(format!("cannot listen for /metrics on {addr}: {e}"))
        })?;
    }
    let options = runtime::Options {
        max_in_flight: cli.max_in_flight,
        state_max_bytes: cli.state_max_bytes,
        role: None,
        reload: None,
        metrics: Some(AgentMetrics::new(&telemetry)),
        telemetry: Some(telemetry.clone()),
        service_metadata: None,
    };
    match cli.kind {
        KindCmd::Acl { default } => {
            let default = match default {
                Default::Allow => Action::Allow,
                Default::Deny => Action::Deny,
            };
            runtime::run(Acl { default }, &cli.common, options, shutdown).await
        }
        KindCmd::Lb => runtime::run(Lb, &cli.common, options, shutdown).await,
        KindCmd::ConnLimit { lease } => {
            let lease = if lease.is_zero() {
                DEFAULT_LEASE
            } else {
                lease
            };
            runtime::run(ConnLimiter::new(lease), &cli.common, options, shutdown).await
        }
        KindCmd::RateLimit => {
            runtime::run(RateLimiter::default(), &cli.common, options, shutdown).await
        }
        KindCmd::Wasm {
            fuel,
            max_memory_mib,
        } => {
            let limits = agents::kinds::wasm::abi::Limits {
                fuel,
                max_memory: max_memory_mib as usize * 1024 * 1024,
            };
            agents::kinds::wasm::host::run(cli.common, options, limits, shutdown).await
        }
        KindCmd::Monitor => {
            runtime::run(Monitor::new(telemetry), &cli.common, options, shutdown).await
        }
    }
}
