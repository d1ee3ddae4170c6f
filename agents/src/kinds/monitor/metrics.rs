//! The monitor's metrics, fed from tap records. Every label value comes from the network (an
//! event name anyone may send, an agent's reasons, the gateway's service names), so each
//! label takes at most [`MAX_NAMES`] distinct values and counts the rest as `other`.

use super::bytes::ConnectionBytes;
use bus::state::keys;
use bus::tap::{Outcome, TapRecord};
use bus::Value;
use daemon::telemetry::Names;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    event: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    event: String,
    agent: String,
    policy: String,
    effect: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    event: String,
    service: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    event: String,
    peer: String,
    action: String,
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
    outcome: String,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// 50 µs to ~1.6 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Distinct service, peer or policy names a family takes before the rest are counted as
/// `other`: the names come from the network, and every one is a time series.
const MAX_NAMES: usize = 1000;

pub struct Metrics {
    registry: Registry,
    events: Names,
    agents: Names,
    effects: Names,
    services: Names,
    peers: Names,
    policies: Names,
    decisions: Family<DecisionLabels, Counter>,
    reasons: Family<ReasonLabels, Counter>,
    by_service: Family<ServiceLabels, Counter>,
    by_peer: Family<PeerLabels, Counter>,
    decision_seconds: HistFamily<EventLabels>,
    agent_seconds: HistFamily<AgentLabels>,
    agent_outcomes: Family<OutcomeLabels, Counter>,
    agent_cached: Family<AgentLabels, Counter>,
    bytes: ConnectionBytes,
    pub tap_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

use bus::state::field_str as field;

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("policy");
        let m = Metrics {
            decisions: Family::default(),
            reasons: Family::default(),
            by_service: Family::default(),
            by_peer: Family::default(),
            decision_seconds: HistFamily::new_with_constructor(latency_histogram),
            agent_seconds: HistFamily::new_with_constructor(latency_histogram),
            agent_outcomes: Family::default(),
            agent_cached: Family::default(),
            bytes: ConnectionBytes::default(),
            tap_errors: Counter::default(),
            registry: Registry::default(),
            events: Names::new(MAX_NAMES),
            agents: Names::new(MAX_NAMES),
            effects: Names::new(MAX_NAMES),
            services: Names::new(MAX_NAMES),
            peers: Names::new(MAX_NAMES),
            policies: Names::new(MAX_NAMES),
        };
        registry.register(
            "decisions",
            "Decisions by event and action",
            m.decisions.clone(),
        );
        registry.register(
            "reasons",
            "Decision reasons by agent, policy and effect",
            m.reasons.clone(),
        );
        registry.register(
            "service_decisions",
            "Decisions by destination or exposed service",
            m.by_service.clone(),
        );
        registry.register(
            "peer_decisions",
            "Decisions by target peer (new-connection) or asking peer (service-list-request)",
            m.by_peer.clone(),
        );
        registry.register(
            "decision_seconds",
            "Whole-decision latency in the dispatcher",
            m.decision_seconds.clone(),
        );
        registry.register(
            "agent_seconds",
            "Per-agent call latency as the dispatcher saw it",
            m.agent_seconds.clone(),
        );
        registry.register(
            "agent_calls",
            "Agent calls by outcome",
            m.agent_outcomes.clone(),
        );
        registry.register(
            "agent_cached",
            "Agent answers the dispatcher served from its verdict cache (also counted in agent_calls)",
            m.agent_cached.clone(),
        );
        registry.register(
            "connection_bytes",
            "Bytes carried by connections, from connection-status reports, by destination service, target peer and direction (in, out)",
            m.bytes.family.clone(),
        );
        registry.register(
            "connection_reports_untracked",
            "connection-status reports not counted in connection_bytes: more live connections than the monitor tracks (100 000)",
            m.bytes.untracked.clone(),
        );
        registry.register(
            "tap_errors",
            "Tap records that could not be decoded",
            m.tap_errors.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn record(&self, r: &TapRecord) {
        let event = self.events.admit(&r.event);
        let d = &r.decision;
        let action = match (d.get_str(keys::ACTION), d.action()) {
            (None, _) | (_, Some(bus::Action::Allow)) => "allow",
            (_, Some(bus::Action::Deny)) => "deny",
            (Some(_), None) => "other",
        }
        .to_string();
        self.decisions
            .get_or_create(&DecisionLabels {
                event: event.clone(),
                action: action.clone(),
            })
            .inc();
        if let Some(Value::Array(reasons)) = d.get(keys::REASONS) {
            for reason in reasons {
                let labels = ReasonLabels {
                    event: event.clone(),
                    agent: self.agents.admit(field(reason, "agent").unwrap_or("?")),
                    policy: self.policies.admit(field(reason, "policy").unwrap_or("?")),
                    effect: self.effects.admit(field(reason, "effect").unwrap_or("?")),
                };
                self.reasons.get_or_create(&labels).inc();
            }
        }
        let service = field(&r.attributes, bus::attrs::DST_SERVICE)
            .or_else(|| field(&r.attributes, bus::attrs::SERVICE));
        if let Some(service) = service {
            let labels = ServiceLabels {
                event: event.clone(),
                service: self.services.admit(service),
                action: action.clone(),
            };
            self.by_service.get_or_create(&labels).inc();
        }
        match event.as_str() {
            bus::event::NEW_CONNECTION if action == "allow" => {
                if let Some(c) = d.get_str(keys::CONNECTION_ID) {
                    let service = service.map(|s| self.services.admit(s));
                    let peer = d.get_str(keys::TARGET_PEER).map(|p| self.peers.admit(p));
                    self.bytes.admitted(c, service, peer);
                }
            }
            bus::event::CONNECTION_CLOSED => {
                if let Some(c) = field(&r.attributes, bus::attrs::CONNECTION_ID) {
                    self.bytes.closed(c);
                }
            }
            bus::event::CONNECTION_STATUS => self.bytes.status(&r.attributes, |name, service| {
                if service {
                    self.services.admit(name)
                } else {
                    self.peers.admit(name)
                }
            }),
            _ => {}
        }
        // The peer an event is about: the target of a connection, the peer asking for the
        // list, the peer offering or leaving.
        let peer = d
            .get_str(keys::TARGET_PEER)
            .or_else(|| match event.as_str() {
                bus::event::SERVICE_LIST_REQUEST => field(&r.attributes, bus::attrs::SRC_PEER),
                bus::event::PEER_ADDED
                | bus::event::PEER_REMOVED
                | bus::event::REMOTE_SERVICE_ADDED
                | bus::event::REMOTE_SERVICE_REMOVED => field(&r.attributes, "peer"),
                _ => None,
            });
        if let Some(peer) = peer {
            let labels = PeerLabels {
                event: event.clone(),
                peer: self.peers.admit(peer),
                action,
            };
            self.by_peer.get_or_create(&labels).inc();
        }
        self.decision_seconds
            .get_or_create(&EventLabels {
                event: event.clone(),
            })
            .observe(r.total_us as f64 / 1e6);
        for a in &r.agents {
            let name = self.agents.admit(&a.agent);
            let agent = AgentLabels {
                event: event.clone(),
                agent: name.clone(),
            };
            if a.cached {
                // No call was made: its zero latency would drag the agent's histogram down.
                self.agent_cached.get_or_create(&agent).inc();
            } else if a.outcome != Outcome::Observed {
                self.agent_seconds
                    .get_or_create(&agent)
                    .observe(a.latency_us as f64 / 1e6);
            }
            let labels = OutcomeLabels {
                event: event.clone(),
                agent: name,
                outcome: a.outcome.as_str().into(),
            };
            self.agent_outcomes.get_or_create(&labels).inc();
        }
    }

    /// The metrics in the text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus::tap::AgentTiming;
    use bus::{Effect, Reason, State};

    fn tap(action: &str, target: Option<&str>) -> TapRecord {
        let mut d = State::new();
        d.insert(keys::ACTION, action);
        if let Some(t) = target {
            d.insert(keys::TARGET_PEER, t);
        }
        d.insert(
            keys::REASONS,
            Value::Array(vec![Reason::new("acl", "r1", Effect::Allow).to_value()]),
        );
        TapRecord {
            event: "new-connection".into(),
            event_id: "e".into(),
            attributes: Value::Map(vec![(Value::from("dst_service"), Value::from("db"))]),
            decision: d,
            total_us: 1500,
            agents: vec![AgentTiming {
                agent: "acl".into(),
                priority: 1,
                latency_us: 700,
                outcome: Outcome::Answered,
                cached: false,
            }],
            at_ms: 0,
            traceparent: None,
        }
    }

    #[test]
    fn every_label_is_capped() {
        let m = Metrics::new();
        for i in 0..(MAX_NAMES + 50) {
            let mut r = tap("allow", Some("p1"));
            r.event = format!("made-up-{i}");
            r.decision.insert(keys::ACTION, format!("verdict-{i}"));
            r.decision.insert(
                keys::REASONS,
                Value::Array(vec![Reason::new(
                    &format!("a{i}"),
                    "x",
                    Effect::Other(format!("e{i}")),
                )
                .to_value()]),
            );
            m.record(&r);
        }
        let text = m.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("policy_decisions_total"))
            .count();
        assert!(series <= MAX_NAMES + 1, "{series} decision series");
        for label in [
            "event=\"other\"",
            "agent=\"other\"",
            "effect=\"other\"",
            "action=\"other\"",
        ] {
            assert!(text.contains(label), "{label} missing");
        }
    }

    #[test]
    fn counts_and_histograms_follow_the_tap() {
        let m = Metrics::new();
        m.record(&tap("allow", Some("p1")));
        m.record(&tap("allow", Some("p1")));
        m.record(&tap("deny", None));
        let text = m.encode();
        for line in [
            r#"policy_decisions_total{event="new-connection",action="allow"} 2"#,
            r#"policy_decisions_total{event="new-connection",action="deny"} 1"#,
            r#"policy_reasons_total{event="new-connection",agent="acl",policy="r1",effect="allow"} 3"#,
            r#"policy_service_decisions_total{event="new-connection",service="db",action="allow"} 2"#,
            r#"policy_peer_decisions_total{event="new-connection",peer="p1",action="allow"} 2"#,
            r#"policy_decision_seconds_count{event="new-connection"} 3"#,
            r#"policy_agent_seconds_count{event="new-connection",agent="acl"} 3"#,
            r#"policy_agent_calls_total{event="new-connection",agent="acl",outcome="answered"} 3"#,
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
    }
}
