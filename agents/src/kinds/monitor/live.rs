//! The live page the monitor serves at `/`: the decision stream as it happens, rates and
//! denies per service and agent, and a latency chart. The page (`live.html`) is in the binary
//! and needs nothing from the internet; it polls `/api/live`, which this module answers from
//! the last decisions the tap brought.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use bus::state::{field_str, keys};
use bus::tap::TapRecord;
use bus::Value;
use serde::Serialize;

/// Decisions the page can show; older ones fall off.
const KEEP: usize = 200;
/// Services and agents the totals keep, past which the rest count as `other` (names come from
/// the network).
const MAX_NAMES: usize = 200;

pub const PAGE: &str = include_str!("live.html");

#[derive(Serialize, Clone)]
struct Call {
    agent: String,
    latency_us: u64,
    outcome: &'static str,
    cached: bool,
}

#[derive(Serialize, Clone)]
struct Reason {
    agent: String,
    policy: String,
    effect: String,
}

#[derive(Serialize, Clone)]
struct Recent {
    seq: u64,
    at_ms: u64,
    event: String,
    event_id: String,
    action: String,
    degraded: bool,
    service: String,
    source: String,
    target: String,
    total_us: u64,
    reasons: Vec<Reason>,
    agents: Vec<Call>,
}

#[derive(Serialize, Default, Clone)]
struct Count {
    allow: u64,
    deny: u64,
}

#[derive(Serialize, Default, Clone)]
struct AgentCount {
    calls: u64,
    failed: u64,
}

#[derive(Serialize, Default)]
struct Snapshot {
    /// Decisions seen since the monitor started; the page takes rates from its change.
    total: u64,
    recent: Vec<Recent>,
    services: BTreeMap<String, Count>,
    agents: BTreeMap<String, AgentCount>,
}

#[derive(Default)]
struct Inner {
    recent: VecDeque<Recent>,
    total: u64,
    services: BTreeMap<String, Count>,
    agents: BTreeMap<String, AgentCount>,
}

#[derive(Default)]
pub struct Live(Mutex<Inner>);

fn bounded<'a, T: Default>(map: &'a mut BTreeMap<String, T>, name: &str) -> &'a mut T {
    let name = if map.contains_key(name) || map.len() < MAX_NAMES {
        name
    } else {
        "other"
    };
    map.entry(name.to_string()).or_default()
}

impl Live {
    pub fn record(&self, r: &TapRecord) {
        let d = &r.decision;
        // A report (a close, a status) is recorded, not decided; the other events without an
        // action (exposes, lists) are allowed, narrowed to what their decision lists.
        let report = matches!(
            r.event.as_str(),
            bus::event::CONNECTION_CLOSED | bus::event::CONNECTION_STATUS
        );
        let action = match (d.get_str(keys::ACTION), report) {
            (Some(a), _) => a,
            (None, true) => "report",
            (None, false) => "allow",
        }
        .to_string();
        let service = field_str(&r.attributes, bus::attrs::DST_SERVICE)
            .or_else(|| field_str(&r.attributes, bus::attrs::SERVICE))
            .unwrap_or("")
            .to_string();
        let source = field_str(&r.attributes, bus::attrs::SRC_SERVICE)
            .or_else(|| field_str(&r.attributes, bus::attrs::SRC_PEER))
            .unwrap_or("")
            .to_string();
        let reasons = match d.get(keys::REASONS) {
            Some(Value::Array(list)) => list
                .iter()
                .map(|x| Reason {
                    agent: field_str(x, "agent").unwrap_or("?").into(),
                    policy: field_str(x, "policy").unwrap_or("?").into(),
                    effect: field_str(x, "effect").unwrap_or("?").into(),
                })
                .collect(),
            _ => Vec::new(),
        };
        let agents: Vec<Call> = r
            .agents
            .iter()
            .map(|a| Call {
                agent: a.agent.clone(),
                latency_us: a.latency_us,
                outcome: a.outcome.as_str(),
                cached: a.cached,
            })
            .collect();
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inner.total += 1;
        if !service.is_empty() {
            let c = bounded(&mut inner.services, &service);
            match action.as_str() {
                "deny" => c.deny += 1,
                "report" => {}
                _ => c.allow += 1,
            }
        }
        for a in &agents {
            let c = bounded(&mut inner.agents, &a.agent);
            c.calls += 1;
            if matches!(a.outcome, "timeout" | "no-responders" | "error") {
                c.failed += 1;
            }
        }
        let seq = inner.total;
        inner.recent.push_back(Recent {
            seq,
            at_ms: r.at_ms,
            event: r.event.clone(),
            event_id: r.event_id.clone(),
            action,
            degraded: d.flag(keys::DEGRADED),
            service,
            source,
            target: d.get_str(keys::TARGET_PEER).unwrap_or("").to_string(),
            total_us: r.total_us,
            reasons,
            agents,
        });
        while inner.recent.len() > KEEP {
            inner.recent.pop_front();
        }
    }

    /// What `/api/live` answers: the last decisions, newest last, and the totals.
    pub fn json(&self) -> String {
        let inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot = Snapshot {
            total: inner.total,
            recent: inner.recent.iter().cloned().collect(),
            services: inner.services.clone(),
            agents: inner.agents.clone(),
        };
        serde_json::to_string(&snapshot).unwrap_or_else(|_| "{}".into())
    }
}
