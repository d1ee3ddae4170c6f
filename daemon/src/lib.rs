//! What every policy-bus process shares: the common flags of the contract (`--nats-url`,
//! `--prefix`), logging (human or JSON), the NATS connection, and the shutdown signal.
#![forbid(unsafe_code)]

use std::time::Duration;

use bus::Subjects;
pub use tokio_util::task::TaskTracker;

/// Flags every process takes, with the environment variables of the contract.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// NATS server URL (several may be given, comma-separated).
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,
    /// Subject prefix, so several engines can share one NATS system.
    #[arg(long, env = "POLICY_PREFIX", default_value = "policy", global = true)]
    pub prefix: String,
    /// Replicas of the config bucket when this process is the one to create it (a NATS
    /// cluster wants 3).
    #[arg(long, env = "POLICY_KV_REPLICAS", default_value_t = 1, global = true)]
    pub kv_replicas: usize,
    /// Log JSON lines instead of human-readable text.
    #[arg(long, env = "POLICY_LOG_JSON", global = true)]
    pub log_json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Prefix(#[from] bus::error::InvalidName),
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

impl Common {
    pub fn subjects(&self) -> Result<Subjects, DaemonError> {
        Ok(Subjects::new(&self.prefix)?)
    }

    /// Connects to NATS. A long-running process (`retry`) waits for the server to come up and
    /// reconnects forever; a one-shot command fails at once with a message a person can act on.
    pub async fn connect(
        &self,
        name: &str,
        retry: bool,
    ) -> Result<async_nats::Client, DaemonError> {
        let name_owned = name.to_string();
        let mut opts = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(3))
            .subscription_capacity(16 * 1024)
            .event_callback(move |event| {
                let name = name_owned.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => tracing::info!(%name, "connected to NATS"),
                        async_nats::Event::Disconnected => {
                            tracing::warn!(%name, "disconnected from NATS; reconnecting")
                        }
                        async_nats::Event::SlowConsumer(sid) => {
                            tracing::warn!(%name, sid, "slow consumer: messages were dropped")
                        }
                        other => tracing::info!(%name, event = %other, "NATS event"),
                    }
                }
            });
        if retry {
            opts = opts.retry_on_initial_connect();
        } else {
            opts = opts.max_reconnects(Some(3));
        }
        opts.connect(self.nats_url.as_str())
            .await
            .map_err(|source| DaemonError::Connect {
                url: self.nats_url.clone(),
                source,
            })
    }
}

/// An error and its causes on one line, each cause once (a message that already quotes its
/// cause does not get it again): what a failed process prints last.
pub fn one_line<'a>(chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>) -> String {
    let mut line = String::new();
    for cause in chain {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// How a long-running process ends: success, or its error and causes on one line after the
/// program's name, and a failure status.
pub fn exit<E: std::error::Error + 'static>(
    program: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let chain =
                std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                });
            eprintln!("{program}: {}", one_line(chain));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` filters (default `default_level`).
pub fn init_logging(json: bool, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops this process");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested: finishing in-flight work");
}

/// How long in-flight work may take to finish after a shutdown signal.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Waits for `tracker`'s tasks to finish, up to [`DRAIN_GRACE`], then flushes NATS so the
/// replies they sent leave the process.
pub async fn drain(tracker: &TaskTracker, client: &async_nats::Client) {
    tracker.close();
    if tokio::time::timeout(DRAIN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = tracker.len(),
            "drain grace period over; abandoning in-flight work"
        );
    }
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "could not flush NATS before exit");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn one_line_quotes_each_cause_once() {
        let e = Outer(Inner);
        let chain = std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        });
        assert_eq!(one_line(chain), "outer: inner");
    }
}
