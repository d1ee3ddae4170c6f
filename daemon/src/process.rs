//! A process's life: its runtime and logging, its last words, the shutdown signal and the
//! drain of in-flight work.

use std::time::Duration;

use crate::{service, traces, TaskTracker};

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

/// The runtime a daemon runs on. One worker (the default) is a current-thread runtime: a
/// dispatcher or agent mostly waits on one NATS socket, and handing each message between
/// threads cost more than the work (docs/performance.md: CPU per decision fell by a quarter).
/// More workers help a CPU-heavy kind on a host with cores to spare; more instances in the
/// queue group do too, and also survive a crash.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if worker_threads > 1 {
            b.worker_threads(worker_threads);
        }
        b.enable_all().build()
    }
}

/// Runs a daemon's `main` on [`runtime`], and exits as [`exit`] does.
pub fn main<E, F>(program: &str, worker_threads: usize, run: F) -> std::process::ExitCode
where
    E: std::error::Error + 'static,
    F: std::future::Future<Output = Result<(), E>>,
{
    traces::set_process(program);
    match runtime(worker_threads) {
        Ok(rt) => {
            let done = rt.block_on(run);
            traces::flush();
            exit(program, done)
        }
        Err(e) => {
            eprintln!("{program}: cannot start the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` filters (default `default_level`).
pub fn init_logging(json: bool, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour only on a terminal: `docker logs` and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    // The spans of the engine's own crates go to OTLP whatever RUST_LOG keeps for the logs.
    let spans = tracing_subscriber::filter::Targets::new()
        .with_target("dispatcher", tracing::Level::INFO)
        .with_target("agents", tracing::Level::INFO);
    let otel = traces::layer().map(|l| l.with_filter(spans));
    tracing_subscriber::registry().with(fmt).with(otel).init();
}

/// Resolves on the first SIGINT or SIGTERM. A second one, a second or more later, exits at
/// once: an operator who presses Ctrl-C again does not want to wait for the drain. One that
/// comes right after the first is the same request twice (a terminal's Ctrl-C reaches the whole
/// process group, and `policyctl up` then sends its own SIGTERM) and is ignored.
pub async fn shutdown_signal() {
    signal().await;
    let first = tokio::time::Instant::now();
    tracing::info!("shutdown requested: finishing in-flight work (a second signal exits at once)");
    tokio::spawn(async move {
        loop {
            signal().await;
            if first.elapsed() >= Duration::from_secs(1) {
                tracing::warn!("second shutdown signal: exiting without finishing in-flight work");
                std::process::exit(130);
            }
        }
    });
}

async fn signal() {
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
}

/// How long in-flight work may take to finish after a shutdown signal.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// How long a shutdown waits for a lost NATS connection to come back before it abandons the
/// in-flight work that could not be answered without it.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(1);

/// Waits for `tracker`'s tasks to finish, then flushes NATS so the replies they sent leave the
/// process. It never hangs: past [`DRAIN_GRACE`], or when NATS has been unreachable for
/// [`RECONNECT_GRACE`] (nothing in flight could be answered anyway), it abandons what is left
/// and says how much.
pub async fn drain(tracker: &TaskTracker, client: &async_nats::Client) {
    use async_nats::connection::State;
    tracker.close();
    let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    loop {
        let tick = tokio::time::sleep(Duration::from_millis(50));
        tokio::select! {
            _ = tracker.wait() => break,
            _ = tick => {}
        }
        let now = tokio::time::Instant::now();
        if client.connection_state() == State::Connected {
            unreachable_since = None;
        } else if now - *unreachable_since.get_or_insert(now) >= RECONNECT_GRACE {
            tracing::warn!(
                abandoned = tracker.len(),
                "NATS is unreachable: abandoning in-flight work that could not be answered"
            );
            return;
        }
        if now >= deadline {
            tracing::warn!(
                abandoned = tracker.len(),
                "drain grace period over; abandoning in-flight work"
            );
            break;
        }
    }
    match tokio::time::timeout(RECONNECT_GRACE, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not flush NATS before exit"),
        Err(_) => tracing::warn!("could not flush NATS before exit: unreachable"),
    }
}

/// How long the endpoints may take to hand over what the server had already sent them, once
/// they are drained (a round trip to the server, normally).
pub const DRAIN_WINDOW: Duration = Duration::from_secs(2);

/// A serving loop's way out: on the shutdown signal it drains every endpoint, so the server
/// routes new requests to the other instances while those already sent still arrive here and
/// are answered; the loop ends when the endpoints end, or at the deadline (without NATS the
/// endpoints never end: the deadline is then now).
#[derive(Debug, Default)]
pub struct Drain {
    deadline: Option<tokio::time::Instant>,
}

impl Drain {
    pub fn started(&self) -> bool {
        self.deadline.is_some()
    }

    /// When the loop should stop waiting for the endpoints to end.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline
    }

    pub async fn start(
        &mut self,
        client: &async_nats::Client,
        endpoints: &mut [&mut service::Endpoint],
    ) {
        let now = tokio::time::Instant::now();
        if client.connection_state() != async_nats::connection::State::Connected {
            tracing::warn!("NATS is unreachable: not draining the endpoints");
            self.deadline = Some(now);
            return;
        }
        for e in endpoints.iter_mut() {
            if let Err(err) = e.drain().await {
                tracing::warn!(endpoint = e.name, error = %err, "could not drain the endpoint");
            }
        }
        self.deadline = Some(now + DRAIN_WINDOW);
    }
}

/// Resolves at `deadline`, or never without one.
pub async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
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
