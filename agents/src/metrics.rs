//! What every agent process counts, per kind (a wasm host serves several): requests by
//! operation and outcome, requests in progress, decide latency, and the policies loaded (and
//! broken) at which configuration revision. Served on `--metrics-addr` with the process's
//! readiness (`daemon::telemetry`).

use std::sync::Arc;
use std::time::Duration;

use daemon::telemetry::Telemetry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: String,
    /// `decide`, `validate`, `undo` or `observe` (an observer's event, no reply).
    op: String,
    /// `ok`, `error` (an error reply: bad request, agent error, invalid policy) or `dropped`
    /// (a hedged copy of a request in progress, or one past its deadline).
    outcome: String,
}

type HistFamily = Family<KindLabels, Histogram, fn() -> Histogram>;

/// 10 µs to ~80 ms, doubling: an agent's own share of a decision.
fn histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 2.0, 14))
}

pub struct AgentMetrics {
    requests: Family<RequestLabels, Counter>,
    seconds: HistFamily,
    in_flight: Family<KindLabels, Gauge>,
    policies: Family<KindLabels, Gauge>,
    broken: Family<KindLabels, Gauge>,
    revision: Family<KindLabels, Gauge>,
}

/// Counts a request in progress until dropped.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl AgentMetrics {
    pub fn new(telemetry: &Telemetry) -> Arc<AgentMetrics> {
        let m = AgentMetrics {
            requests: Family::default(),
            seconds: HistFamily::new_with_constructor(histogram),
            in_flight: Family::default(),
            policies: Family::default(),
            broken: Family::default(),
            revision: Family::default(),
        };
        telemetry.register(|r| {
            r.register(
                "agent_requests",
                "Requests an agent answered, by kind, operation (decide, validate, undo, observe) and outcome (ok, error, dropped)",
                m.requests.clone(),
            );
            r.register(
                "agent_decide_seconds",
                "Time an agent took to decide, from request to reply, by kind",
                m.seconds.clone(),
            );
            r.register(
                "agent_in_flight",
                "Requests an agent is working on, by kind",
                m.in_flight.clone(),
            );
            r.register(
                "agent_policies",
                "Policies an agent kind has loaded",
                m.policies.clone(),
            );
            r.register(
                "agent_broken_policies",
                "Stored policies of a kind that do not load (the kind denies while any does)",
                m.broken.clone(),
            );
            r.register(
                "agent_config_revision",
                "The configuration revision (config bucket sequence) of a kind's loaded policies",
                m.revision.clone(),
            );
        });
        Arc::new(m)
    }

    fn kind(kind: &str) -> KindLabels {
        KindLabels { kind: kind.into() }
    }

    pub fn started(&self, kind: &str) -> InFlight {
        let g = self.in_flight.get_or_create(&Self::kind(kind)).clone();
        g.inc();
        InFlight(g)
    }

    pub fn answered(&self, kind: &str, op: &str, outcome: &str) {
        let labels = RequestLabels {
            kind: kind.into(),
            op: op.into(),
            outcome: outcome.into(),
        };
        self.requests.get_or_create(&labels).inc();
    }

    pub fn decided_in(&self, kind: &str, took: Duration) {
        self.seconds
            .get_or_create(&Self::kind(kind))
            .observe(took.as_secs_f64());
    }

    pub fn loaded(&self, kind: &str, policies: usize, broken: usize, revision: u64) {
        let k = Self::kind(kind);
        self.policies.get_or_create(&k).set(policies as i64);
        self.broken.get_or_create(&k).set(broken as i64);
        self.revision
            .get_or_create(&k)
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }
}
