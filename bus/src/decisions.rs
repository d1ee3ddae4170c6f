//! The durable decision log: every decision's record (the tap's), kept in a JetStream stream
//! bounded by age and size, so that an operator can audit after the fact what was decided and
//! why (`policyctl log`), where the tap is at most once and gone when nobody listens. The
//! dispatcher publishes to it after the reply, fire-and-forget: the decision path never waits
//! for the log.

use std::time::Duration;

use async_nats::jetstream::stream;

use crate::error::ConfigError;
use crate::store::{Jet, Store};
use crate::subject::Subjects;

/// How long and how large the log may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    pub max_bytes: i64,
}

/// Opens the decision log's stream, creating it with `retention` on first use. An existing
/// stream keeps its own limits (an operator may have changed them with `nats stream edit`).
pub async fn ensure(
    client: &async_nats::Client,
    subjects: &Subjects,
    replicas: usize,
    retention: Retention,
) -> Result<stream::Stream, ConfigError> {
    let js = Jet::reach(client, subjects, Store::Log).await?.context();
    let name = subjects.decisions_stream();
    if let Ok(s) = js.get_stream(&name).await {
        return Ok(s);
    }
    let config = stream::Config {
        name: name.clone(),
        description: Some("policy-bus decision log: one record per decision".into()),
        subjects: vec![subjects.decision_log_wildcard()],
        max_age: retention.max_age,
        max_bytes: retention.max_bytes,
        // Oldest first: an audit log keeps the recent past, and a full one never refuses.
        discard: stream::DiscardPolicy::Old,
        num_replicas: replicas.max(1),
        consumer_limits: Some(crate::streams::consumer_limits()),
        ..Default::default()
    };
    match js.create_stream(config).await {
        Ok(s) => Ok(s),
        // Another dispatcher may have created it meanwhile.
        Err(e) => js.get_stream(&name).await.map_err(|_| ConfigError::io(e)),
    }
}
