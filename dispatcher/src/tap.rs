//! The tap record of a decision already sent: to the tap, to the durable decision log when it
//! is on, and to the metrics.

use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use bus::event::EventName;
use bus::headers;
use bus::tap::{AgentTiming, RawTapRecord};
use bytes::Bytes;

use crate::Dispatcher;

/// The parts of a tap record, encoded and published after the reply.
pub(crate) struct Tap {
    pub(crate) name: EventName,
    pub(crate) event_id: String,
    /// The hookpoint's attributes (with the connection id), as encoded.
    pub(crate) attributes: Bytes,
    /// The decision, as sent.
    pub(crate) decision: Bytes,
    pub(crate) timings: Vec<AgentTiming>,
    pub(crate) total_us: u64,
    pub(crate) trace: HeaderMap,
    /// `allow`, `deny` or `degraded`, for the metrics.
    pub(crate) result: &'static str,
}

impl Dispatcher {
    /// Publishes the tap record of a decision already sent. At most once: a lost record is
    /// a gap in the monitor's counts, never a lost decision.
    pub(crate) async fn tap(&self, tap: Tap) {
        // Counted here, after the reply, with the tap: the metrics' label work (a lock and a
        // few strings per event) stays off the decision path.
        if let Some(m) = &self.metrics {
            m.decided(tap.name.as_str(), tap.result, tap.total_us, &tap.timings);
        }
        let record = RawTapRecord {
            event: tap.name.as_str(),
            event_id: &tap.event_id,
            attributes: &tap.attributes,
            decision: &tap.decision,
            total_us: tap.total_us,
            agents: &tap.timings,
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            traceparent: headers::get(Some(&tap.trace), headers::TRACEPARENT),
        };
        match record.encode() {
            Ok(bytes) => {
                let bytes = Bytes::from(bytes);
                if self.log_decisions {
                    // A plain publish the stream stores: nothing waits for its acknowledgement.
                    let subject = self.subjects.decision_log(tap.name.as_str());
                    if let Err(e) = self
                        .jet
                        .client()
                        .publish_with_headers(subject, tap.trace.clone(), bytes.clone())
                        .await
                    {
                        tracing::warn!(error = %e, "could not publish to the decision log");
                    }
                }
                let subject = self.subjects.tap(tap.name.as_str());
                if let Err(e) = self
                    .nats
                    .publish_with_headers(subject, tap.trace, bytes)
                    .await
                {
                    tracing::warn!(error = %e, "could not publish tap record");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not encode tap record"),
        }
    }
}
