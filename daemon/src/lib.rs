//! What every policy-bus process shares: the common flags of the contract (`--nats-url`,
//! `--prefix`), logging (human or JSON), the NATS connection, and the shutdown signal.
#![forbid(unsafe_code)]

pub mod service;
pub mod telemetry;
pub mod traces;

use std::path::PathBuf;

pub use tokio_util::task::TaskTracker;

/// Flags every process takes, with the environment variables of the contract.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// NATS server URL; several, comma-separated, for a cluster. `tls://` requires TLS;
    /// `nats://user:password@host` logs in with a user and password.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true,
        hide_env_values = true
    )]
    pub nats_url: String,
    /// Subject prefix, so several engines can share one NATS system.
    #[arg(long, env = "POLICY_PREFIX", default_value = "policy", global = true)]
    pub prefix: String,
    /// Replicas of a bucket when this process is the one to create it (a NATS cluster
    /// wants 3).
    #[arg(long, env = "POLICY_KV_REPLICAS", default_value_t = 1, global = true)]
    pub kv_replicas: usize,
    /// Log JSON lines instead of human-readable text.
    #[arg(long, env = "POLICY_LOG_JSON", global = true)]
    pub log_json: bool,
    #[command(flatten)]
    pub auth: Auth,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Prefix(#[from] bus::error::InvalidName),
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// Redacted: no password or token.
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("NATS URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("{0}")]
    Auth(String),
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

mod auth;
mod connect;
mod process;

pub use auth::{redact, server_addrs, Auth};
pub use connect::FOREIGN_INBOX;
pub use process::{
    drain, exit, init_logging, main, one_line, runtime, shutdown_signal, until, Drain, DRAIN_GRACE,
    DRAIN_WINDOW, RECONNECT_GRACE,
};
