//! Monitor: taps every decision (a plain, non-queue subscriber on `<prefix>.tap.>`, so every
//! monitor instance sees everything), keeps counters and latency histograms, and serves them
//! in the Prometheus text format at `http://<metrics-addr>/metrics`. Subscribed into a chain it
//! is an observe-only agent: it answers at once with an empty patch and never changes a
//! decision.

mod bytes;
mod http;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use bus::codec;
use bus::tap::TapRecord;
use futures::StreamExt;

use crate::kind::{AgentKind, Attach, AttachError, Stored};

pub const NAME: &str = "monitor";

pub struct Monitor {
    pub metrics_addr: SocketAddr,
    /// Filled in by `attach`; the agent side of the monitor does not need it.
    pub metrics: Arc<metrics::Metrics>,
}

impl Monitor {
    pub fn new(metrics_addr: SocketAddr) -> Self {
        Monitor {
            metrics_addr,
            metrics: Arc::new(metrics::Metrics::new()),
        }
    }
}

impl AgentKind for Monitor {
    /// The monitor takes no policies.
    type Policy = serde::de::IgnoredAny;
    type Rules = ();

    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, _p: &serde::de::IgnoredAny) -> Result<(), String> {
        Err("the monitor takes no policies".into())
    }

    fn compile(&self, _policies: Vec<Stored<serde::de::IgnoredAny>>) {}

    async fn attach(&mut self, ctx: Attach<'_>) -> Result<(), AttachError> {
        let listener = tokio::net::TcpListener::bind(self.metrics_addr)
            .await
            .map_err(|e| format!("cannot listen for /metrics on {}: {e}", self.metrics_addr))?;
        tracing::info!(addr = %self.metrics_addr, "serving /metrics");
        tokio::spawn(http::serve(listener, self.metrics.clone()));

        let mut tap = ctx.nats.subscribe(ctx.subjects.tap_wildcard()).await?;
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            while let Some(msg) = tap.next().await {
                match codec::decode::<TapRecord>("tap record", &msg.payload) {
                    Ok(record) => metrics.record(&record),
                    Err(e) => {
                        metrics.tap_errors.inc();
                        tracing::warn!(subject = %msg.subject, error = %e, "undecodable tap record");
                    }
                }
            }
        });
        Ok(())
    }
}
