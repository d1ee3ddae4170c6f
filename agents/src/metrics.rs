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

const OPS: [&str; 4] = ["decide", "validate", "undo", "observe"];
const OUTCOMES: [&str; 3] = ["ok", "error", "dropped"];

/// One agent kind's metrics.
pub struct KindMetrics {
    requests: [[Counter; 3]; 4],
    seconds: Histogram,
    in_flight: Gauge,
    policies: Gauge,
    broken: Gauge,
    revision: Gauge,
}

impl KindMetrics {
    pub fn started(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// `op` one of decide, validate, undo, observe; `outcome` one of ok, error, dropped.
    pub fn answered(&self, op: &str, outcome: &str) {
        let op = OPS.iter().position(|o| *o == op);
        let outcome = OUTCOMES.iter().position(|o| *o == outcome);
        if let (Some(op), Some(outcome)) = (op, outcome) {
            self.requests[op][outcome].inc();
        }
    }

    pub fn decided_in(&self, took: Duration) {
        self.seconds.observe(took.as_secs_f64());
    }

    pub fn loaded(&self, policies: usize, broken: usize, revision: u64) {
        self.policies.set(policies as i64);
        self.broken.set(broken as i64);
        self.revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }
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

    /// One kind's handles, made once: counting a request then takes no label lookup and no
    /// allocation on the decision path.
    pub fn for_kind(&self, kind: &str) -> KindMetrics {
        let k = KindLabels { kind: kind.into() };
        let requests = OPS.map(|op| {
            OUTCOMES.map(|outcome| {
                let labels = RequestLabels {
                    kind: kind.into(),
                    op: op.into(),
                    outcome: outcome.into(),
                };
                self.requests.get_or_create(&labels).clone()
            })
        });
        KindMetrics {
            requests,
            seconds: self.seconds.get_or_create(&k).clone(),
            in_flight: self.in_flight.get_or_create(&k).clone(),
            policies: self.policies.get_or_create(&k).clone(),
            broken: self.broken.get_or_create(&k).clone(),
            revision: self.revision.get_or_create(&k).clone(),
        }
    }
}
