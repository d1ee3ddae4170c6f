//! Monitor: taps every decision (a plain, non-queue subscriber on `<prefix>.tap.>`, so every
//! monitor instance sees everything), keeps counters and latency histograms, and adds them to
//! its process's `/metrics` (`--metrics-addr`, `daemon::telemetry`). Subscribed into a chain it
//! is an observe-only agent: it answers at once with an empty patch and never changes a
//! decision.

mod bytes;
mod live;
pub mod metrics;

use std::sync::Arc;

use bus::codec;
use bus::tap::TapRecord;
use futures::StreamExt;

use crate::kind::{AgentKind, Attach, AttachError, Stored};

pub const NAME: &str = "monitor";

pub struct Monitor {
    /// The process's metrics endpoint, which serves the monitor's families too.
    pub telemetry: Arc<daemon::telemetry::Telemetry>,
    /// The monitor's counters, fed from the tap (`attach` starts the task that feeds them).
    pub metrics: Arc<metrics::Metrics>,
}

impl Monitor {
    pub fn new(telemetry: Arc<daemon::telemetry::Telemetry>) -> Self {
        Monitor {
            telemetry,
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
        let families = self.metrics.clone();
        self.telemetry
            .add_source(Box::new(move || families.encode()));
        let live = Arc::new(live::Live::default());
        self.telemetry.add_page(daemon::telemetry::Page {
            path: "/",
            content_type: "text/html; charset=utf-8",
            body: Box::new(|| live::PAGE.to_string()),
        });
        let api = live.clone();
        self.telemetry.add_page(daemon::telemetry::Page {
            path: "/api/live",
            content_type: "application/json",
            body: Box::new(move || api.json()),
        });

        let mut tap = ctx.nats.subscribe(ctx.subjects.tap_wildcard()).await?;
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            while let Some(msg) = tap.next().await {
                match codec::decode::<TapRecord>("tap record", &msg.payload) {
                    Ok(record) => {
                        metrics.record(&record);
                        live.record(&record);
                    }
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
