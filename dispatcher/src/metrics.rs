//! What a dispatcher counts, served on `--metrics-addr` (`daemon::telemetry`): decisions by
//! event and result (a degraded allow counted as such), refused events by error code, events
//! in progress, decision latency, each agent's outcome and latency as the dispatcher saw it,
//! verdict-cache hits, and the configuration it runs (revision, subscriptions).
//!
//! Label values come from the network (event names anyone may send), so a label takes at most
//! [`MAX_EVENTS`] distinct values and counts the rest as `other`.

use bus::tap::{AgentTiming, Outcome};
use daemon::telemetry::{Names, Telemetry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Distinct event or agent names a label takes before the rest are `other`.
const MAX_EVENTS: usize = 200;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    event: String,
    /// `allow`, `deny`, or `degraded` (allowed with an agent skipped by `failure: open`).
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    event: String,
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    event: String,
    agent: String,
    /// `answered`, `timeout`, `no-responders`, `error`, `observed`, or `cached`.
    outcome: String,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// 50 µs to ~1.6 s, doubling.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

pub struct DispatcherMetrics {
    decisions: Family<DecisionLabels, Counter>,
    refused: Family<CodeLabels, Counter>,
    dropped: Counter,
    in_flight: Gauge,
    seconds: HistFamily<EventLabels>,
    agent_calls: Family<OutcomeLabels, Counter>,
    agent_seconds: HistFamily<AgentLabels>,
    revision: Gauge,
    subscriptions: Gauge,
    fleet_revision: Gauge,
    fleet_lag: Gauge,
    fleet_hub_age: Gauge,
    fleet_hub_reset: Gauge,
    fleet_synced: Gauge,
    events: Names,
    agents: Names,
}

/// Counts an event in progress until dropped.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl DispatcherMetrics {
    pub fn new(telemetry: &Telemetry) -> DispatcherMetrics {
        let m = DispatcherMetrics {
            decisions: Family::default(),
            refused: Family::default(),
            dropped: Counter::default(),
            in_flight: Gauge::default(),
            seconds: HistFamily::new_with_constructor(latency),
            agent_calls: Family::default(),
            agent_seconds: HistFamily::new_with_constructor(latency),
            revision: Gauge::default(),
            subscriptions: Gauge::default(),
            fleet_revision: Gauge::default(),
            fleet_lag: Gauge::default(),
            fleet_hub_age: Gauge::default(),
            fleet_hub_reset: Gauge::default(),
            fleet_synced: Gauge::default(),
            events: Names::new(MAX_EVENTS),
            agents: Names::new(MAX_EVENTS),
        };
        telemetry.register(|r| {
            r.register(
                "dispatcher_decisions",
                "Decisions by event and result (allow, deny, degraded: allowed with an agent skipped); dry runs not counted",
                m.decisions.clone(),
            );
            r.register(
                "dispatcher_refused",
                "Events answered with an error instead of a decision, by error code",
                m.refused.clone(),
            );
            r.register(
                "dispatcher_dropped",
                "Events not run: a hookpoint's hedged copy of one in progress, or one past its deadline",
                m.dropped.clone(),
            );
            r.register(
                "dispatcher_in_flight",
                "Events being decided",
                m.in_flight.clone(),
            );
            r.register(
                "dispatcher_decision_seconds",
                "Time from receiving an event to sending its decision, by event",
                m.seconds.clone(),
            );
            r.register(
                "dispatcher_agent_calls",
                "Agent calls by event, agent and outcome (answered, timeout, no-responders, error, observed, cached)",
                m.agent_calls.clone(),
            );
            r.register(
                "dispatcher_agent_seconds",
                "Agent answer time as the dispatcher saw it, by event and agent (cache hits not included)",
                m.agent_seconds.clone(),
            );
            r.register(
                "config_revision",
                "The configuration revision (config bucket sequence) this dispatcher has applied",
                m.revision.clone(),
            );
            r.register(
                "dispatcher_subscriptions",
                "Subscriptions in this dispatcher's chain table",
                m.subscriptions.clone(),
            );
            r.register(
                "fleet_revision",
                "At a site of a fleet: the hub's configuration revision this site has (0: none yet)",
                m.fleet_revision.clone(),
            );
            r.register(
                "fleet_lag",
                "At a site of a fleet: hub configuration revisions this site does not have yet, as of the last time the hub answered",
                m.fleet_lag.clone(),
            );
            r.register(
                "fleet_synced",
                "At a site of a fleet: 1 once the site has had the fleet's configuration; 0 while it denies every event for want of it",
                m.fleet_synced.clone(),
            );
            r.register(
                "fleet_hub_unreachable_seconds",
                "At a site of a fleet: seconds since the hub last answered (0 while it answers)",
                m.fleet_hub_age.clone(),
            );
            r.register(
                "fleet_hub_reset",
                "At a site of a fleet: 1 when the hub's bucket is not the one this site's fleet documents came from (made again: its revisions started over)",
                m.fleet_hub_reset.clone(),
            );
        });
        m
    }

    pub fn started(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    pub fn dropped(&self) {
        self.dropped.inc();
    }

    pub fn refused(&self, code: &str) {
        self.refused
            .get_or_create(&CodeLabels { code: code.into() })
            .inc();
    }

    /// A decision sent (not a dry run).
    pub fn decided(&self, event: &str, result: &str, total_us: u64, timings: &[AgentTiming]) {
        let event = self.events.admit(event);
        self.decisions
            .get_or_create(&DecisionLabels {
                event: event.clone(),
                result: result.into(),
            })
            .inc();
        self.seconds
            .get_or_create(&EventLabels {
                event: event.clone(),
            })
            .observe(total_us as f64 / 1e6);
        for t in timings {
            let agent = self.agents.admit(&t.agent);
            let label = if t.cached {
                "cached"
            } else {
                t.outcome.as_str()
            };
            self.agent_calls
                .get_or_create(&OutcomeLabels {
                    event: event.clone(),
                    agent: agent.clone(),
                    outcome: label.into(),
                })
                .inc();
            if !t.cached && t.outcome != Outcome::Observed {
                self.agent_seconds
                    .get_or_create(&AgentLabels {
                        event: event.clone(),
                        agent,
                    })
                    .observe(t.latency_us as f64 / 1e6);
            }
        }
    }

    /// A site's view of the fleet: the hub revision it has, how many it lacks, and how long
    /// since the hub answered.
    pub fn fleet(
        &self,
        synced: bool,
        revision: u64,
        lag: u64,
        unreachable_for: std::time::Duration,
        hub_reset: bool,
    ) {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.fleet_synced.set(i64::from(synced));
        self.fleet_revision.set(n(revision));
        self.fleet_lag.set(n(lag));
        self.fleet_hub_age.set(n(unreachable_for.as_secs()));
        self.fleet_hub_reset.set(i64::from(hub_reset));
    }

    pub fn config(&self, revision: u64, subscriptions: usize) {
        self.revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
        self.subscriptions.set(subscriptions as i64);
    }
}
