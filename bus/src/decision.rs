//! Typed decisions, as the Rust hookpoint client returns them. On the wire a decision is the
//! final state plus `event_id`; keys not named here arrive in `extra`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::state::{keys, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// The action of a state (a patch, or the decision so far), typed: here, beside [`Action`],
/// so that `state` needs nothing of decisions.
impl crate::state::State {
    /// The decision's `action` so far, typed (`None`: not set, or not a known action).
    pub fn action(&self) -> Option<Action> {
        match self.get_str(keys::ACTION)? {
            a if a == Action::Deny.as_str() => Some(Action::Deny),
            a if a == Action::Allow.as_str() => Some(Action::Allow),
            _ => None,
        }
    }

    /// Whether the state (a patch, or the decision so far) denies.
    pub fn denies(&self) -> bool {
        self.action() == Some(Action::Deny)
    }

    pub fn set_action(&mut self, action: Action) {
        self.insert(keys::ACTION, action.as_str());
    }
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// What a policy did to a decision. Effects the contract does not name (a third-party agent's)
/// are kept as `Other` rather than failing the whole decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Effect {
    Allow,
    Deny,
    Narrow,
    Pick,
    Limit,
    Audit,
    Skipped,
    Other(String),
}

impl Effect {
    pub fn as_str(&self) -> &str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
            Effect::Narrow => "narrow",
            Effect::Pick => "pick",
            Effect::Limit => "limit",
            Effect::Audit => "audit",
            Effect::Skipped => "skipped",
            Effect::Other(s) => s,
        }
    }
}

impl From<String> for Effect {
    fn from(s: String) -> Self {
        match s.as_str() {
            "allow" => Effect::Allow,
            "deny" => Effect::Deny,
            "narrow" => Effect::Narrow,
            "pick" => Effect::Pick,
            "limit" => Effect::Limit,
            "audit" => Effect::Audit,
            "skipped" => Effect::Skipped,
            _ => Effect::Other(s),
        }
    }
}

impl From<Effect> for String {
    fn from(e: Effect) -> String {
        e.as_str().to_string()
    }
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `policy` of the reason the dispatcher adds for an agent that failed: no answer within
/// its timeout, no live instance, or an error answer. A kind that takes something reads them in
/// an undo: a failed call may still be under way, and take after the undo has run.
pub mod failure {
    pub const TIMEOUT: &str = "agent-timeout";
    pub const NO_RESPONDERS: &str = "no-responders";
    pub const ERROR: &str = "agent-error";
    pub const ALL: [&str; 3] = [TIMEOUT, NO_RESPONDERS, ERROR];
}

/// One line of a decision's explanation: which agent and policy did what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    pub agent: String,
    /// The policy id; for a reason the dispatcher adds about a failed agent, the failure code.
    pub policy: String,
    pub effect: Effect,
    /// A human explanation, when the id and effect alone do not say enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// `fleet` when the policy is the fleet's (at a site of a fleet, see `crate::fleet`);
    /// absent for a site's own, and for everything a single engine decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<crate::fleet::Level>,
    /// The object the policy was made from, when it was made from another format's
    /// (`AccessPolicy default/deny-gw1`, see [`crate::origin`]), so that an operator reads the
    /// name they wrote rather than the generated id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl Reason {
    pub fn new(agent: &str, policy: &str, effect: Effect) -> Self {
        Reason {
            agent: agent.into(),
            policy: policy.into(),
            effect,
            detail: None,
            level: None,
            origin: None,
        }
    }
    /// Marks the reason as the fleet's when `level` is (a site's own stays unmarked).
    pub fn with_level(mut self, level: crate::fleet::Level) -> Self {
        self.level = (level == crate::fleet::Level::Fleet).then_some(level);
        self
    }
    pub fn with_origin(mut self, origin: Option<&crate::origin::Origin>) -> Self {
        self.origin = origin.map(ToString::to_string);
        self
    }
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
    /// The state form (a MessagePack map), for agents building a patch.
    pub fn to_value(&self) -> Value {
        let mut m = vec![
            (Value::from("agent"), Value::from(self.agent.as_str())),
            (Value::from("policy"), Value::from(self.policy.as_str())),
            (Value::from("effect"), Value::from(self.effect.as_str())),
        ];
        if let Some(d) = &self.detail {
            m.push((Value::from("detail"), Value::from(d.as_str())));
        }
        if let Some(l) = self.level {
            m.push((Value::from("level"), Value::from(l.as_str())));
        }
        if let Some(o) = &self.origin {
            m.push((Value::from("origin"), Value::from(o.as_str())));
        }
        Value::Map(m)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    pub bits_per_second: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionDecision {
    pub action: Action,
    #[serde(default)]
    pub target_peer: Option<String>,
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub connection_id: Option<String>,
    pub event_id: String,
    #[serde(default)]
    pub reasons: Vec<Reason>,
    #[serde(default)]
    pub degraded: bool,
    /// The event was asked as a dry run (`Policy-Dry-Run: true`): nothing was taken for it.
    /// A hookpoint must never act on such a decision.
    #[serde(default)]
    pub dry_run: bool,
    /// Every other key the agents put in the state (`dst_peers` among them).
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExposeDecision {
    pub target_peers: Vec<String>,
    pub event_id: String,
    #[serde(default)]
    pub reasons: Vec<Reason>,
    #[serde(default)]
    pub degraded: bool,
    /// The event was asked as a dry run (`Policy-Dry-Run: true`): nothing was taken for it.
    /// A hookpoint must never act on such a decision.
    #[serde(default)]
    pub dry_run: bool,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListDecision {
    pub services: Vec<String>,
    pub event_id: String,
    #[serde(default)]
    pub reasons: Vec<Reason>,
    #[serde(default)]
    pub degraded: bool,
    /// The event was asked as a dry run (`Policy-Dry-Run: true`): nothing was taken for it.
    /// A hookpoint must never act on such a decision.
    #[serde(default)]
    pub dry_run: bool,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// The decision on a `connection-closed` event: an acknowledgement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClosedDecision {
    pub event_id: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::state::{keys, State};

    #[test]
    fn a_final_state_decodes_as_a_typed_decision() {
        let mut s = State::new();
        s.insert(keys::ACTION, "allow");
        s.insert(keys::TARGET_PEER, "p1");
        s.insert(keys::EVENT_ID, "e1");
        s.set_strings(keys::DST_PEERS, &["p1"]);
        s.insert(
            keys::REASONS,
            Value::Array(vec![
                Reason::new("acl", "r1", Effect::Allow).to_value(),
                Reason::new("x", "y", Effect::Other("custom".into())).to_value(),
            ]),
        );
        s.insert("custom_key", 5);
        let d: ConnectionDecision = codec::decode("d", &s.encode().unwrap()).unwrap();
        assert_eq!(d.action, Action::Allow);
        assert_eq!(d.target_peer.as_deref(), Some("p1"));
        assert_eq!(d.reasons[0].effect, Effect::Allow);
        assert_eq!(d.reasons[1].effect, Effect::Other("custom".into()));
        assert_eq!(d.extra.get("custom_key"), Some(&Value::from(5)));
        assert!(d.extra.contains_key(keys::DST_PEERS));
        assert!(!d.degraded);
    }
}
