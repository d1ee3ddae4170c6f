//! ACL: allow or deny by service, peer and direction, narrowing the candidates.
//!
//! Rules are ordered by level (every fleet rule before any site rule, see `bus::fleet`), then
//! `priority` (lower first), then deny before allow, then id; the first
//! matching `enforce` rule decides and no match means the agent's default (deny unless
//! `--default allow`). `audit` rules never change a decision: every audit rule that matches is
//! reported in `reasons` with effect `audit`.
//!
//! - `new-connection`: each candidate in `dst_peers` is checked with the event's attributes
//!   and `dst_peer` set to that candidate; the candidates no rule allows are removed, and the
//!   connection is denied when none is left. Without `dst_peers` the rules are checked once
//!   with no `dst_peer`.
//! - `expose-service` (`service`, candidates `target_peers`) and `service-list-request`
//!   (`src_peer`, candidates `services`) ask "may this peer reach this service": each
//!   candidate is checked as an incoming connection with `src_peer` = the peer and
//!   `dst_service` = the service. These events have no source service and no destination
//!   peer, so only rules whose `src_service` and `dst_peer` are absent or `*` count for them;
//!   a rule naming either applies to connections only.
//!
//! Rules may also select by labels (Kubernetes label selectors, see [`crate::selector`]):
//! `src_labels` (the source workload's), `dst_labels` or its alias `service_labels` (the
//! destination service's), `dst_peer_labels` (the candidate peer's, connections only) and
//! `peer_labels` (the peer asking, expose and list only).
//!
//! Matching uses an index on exact `dst_service` and `src_peer`, and one on a required label
//! of the destination service: an event checks the rules that name its service, peer or a
//! label it has, plus the rules that leave all three open, never the whole list.

use bus::attrs;
use bus::event::{Direction, Event, Labels};
use bus::fleet::Level;
use bus::origin::Origin;
use bus::state::keys;
use bus::{Action, Effect, Reason, State};
use serde::Deserialize;

use crate::kind::{self, AgentKind, Stored};
use crate::pattern::{self, Pattern};
use crate::selector::{self, Selector};

#[path = "acl_index.rs"]
mod index;
use index::Index;

pub const NAME: &str = "acl";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum DirectionMatch {
    Any,
    Only(Direction),
}

impl TryFrom<String> for DirectionMatch {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "*" => Ok(DirectionMatch::Any),
            "incoming" => Ok(DirectionMatch::Only(Direction::Incoming)),
            "outgoing" => Ok(DirectionMatch::Only(Direction::Outgoing)),
            _ => Err(format!("{s:?} is not one of incoming, outgoing, *")),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    pub src_service: Option<Pattern>,
    pub dst_service: Option<Pattern>,
    pub src_peer: Option<Pattern>,
    pub dst_peer: Option<Pattern>,
    pub direction: Option<DirectionMatch>,
    pub src_labels: Option<Selector>,
    #[serde(alias = "service_labels")]
    pub dst_labels: Option<Selector>,
    pub dst_peer_labels: Option<Selector>,
    pub peer_labels: Option<Selector>,
    /// ClusterLink's namespace rule: the connection's `namespace` must equal this.
    pub namespace: Option<String>,
    /// ClusterLink's `from`: the client's attributes (`src_labels`) match one of these.
    pub from: Option<Vec<Selector>>,
    /// ClusterLink's `to`: the destination's attributes (`dst_labels`, with the candidate
    /// peer's labels over them) match one of these.
    pub to: Option<Vec<Selector>>,
}

impl Match {
    /// Whether the rule reads something only a connection has.
    fn connections_only(&self) -> bool {
        !(pattern::is_any(&self.src_service)
            && pattern::is_any(&self.dst_peer)
            && self.src_labels.is_none()
            && self.dst_peer_labels.is_none()
            && self.namespace.is_none()
            && self.from.is_none()
            && self.to.is_none())
    }

    /// A `from` term that selects by some attribute: with one, ClusterLink denies a connection
    /// whose client it cannot name.
    fn selects_clients(&self) -> bool {
        self.from.iter().flatten().any(|s| !s.is_empty())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclPolicy {
    pub agent: String,
    pub id: String,
    #[serde(default)]
    pub priority: i32,
    pub action: Action,
    #[serde(default, rename = "match")]
    pub matcher: Match,
    #[serde(default)]
    pub mode: Mode,
    /// The object this policy was made from (see `bus::origin`).
    #[serde(default)]
    pub origin: Option<Origin>,
}

/// What a rule is checked against. `partial` marks expose and list checks, for which rules
/// naming a source service or destination peer (or selecting their labels) do not count, and
/// for which alone `peer_labels` counts.
#[derive(Debug, Clone, Copy, Default)]
struct Query<'a> {
    src_service: Option<&'a str>,
    dst_service: Option<&'a str>,
    src_peer: Option<&'a str>,
    dst_peer: Option<&'a str>,
    direction: Option<Direction>,
    namespace: Option<&'a str>,
    partial: bool,
    src_labels: Option<&'a Labels>,
    dst_labels: Option<&'a Labels>,
    dst_peer_labels: Option<&'a Labels>,
    peer_labels: Option<&'a Labels>,
}

#[derive(Debug)]
struct Rule {
    id: String,
    /// Every fleet rule is checked before any site rule (see `bus::fleet`).
    level: Level,
    action: Action,
    m: Match,
    origin: Option<Origin>,
}

impl Rule {
    fn matches<'a>(&self, q: &Query<'a>) -> bool {
        let m = &self.m;
        if q.partial && m.connections_only() {
            return false;
        }
        if !q.partial && m.peer_labels.is_some() {
            return false;
        }
        let dir_ok = match m.direction {
            None | Some(DirectionMatch::Any) => true,
            Some(DirectionMatch::Only(d)) => q.direction == Some(d),
        };
        dir_ok
            && pattern::matches(&m.dst_service, q.dst_service)
            && pattern::matches(&m.src_service, q.src_service)
            && pattern::matches(&m.src_peer, q.src_peer)
            && pattern::matches(&m.dst_peer, q.dst_peer)
            && selector::matches(&m.dst_labels, q.dst_labels)
            && selector::matches(&m.src_labels, q.src_labels)
            && selector::matches(&m.dst_peer_labels, q.dst_peer_labels)
            && selector::matches(&m.peer_labels, q.peer_labels)
            && m.namespace
                .as_deref()
                .is_none_or(|ns| q.namespace == Some(ns))
            && m.from
                .as_ref()
                .is_none_or(|any| any.iter().any(|s| s.matches(q.src_labels)))
            && m.to.as_ref().is_none_or(|any| {
                // ClusterLink's destination attributes: the service's and the peer's, in one
                // map (their keys differ by prefix; on a clash the peer's count, as there).
                let get = |k: &str| {
                    let from = |l: Option<&'a Labels>| l.and_then(|l| l.get(k));
                    from(q.dst_peer_labels).or_else(|| from(q.dst_labels))
                };
                any.iter().any(|s| s.matches_with(get))
            })
    }
}

pub struct AclRules {
    enforce: Index,
    audit: Index,
    /// The first enforce rule whose `from` selects clients by an attribute, if any: then a
    /// connection without client attributes is denied, as ClusterLink denies it.
    needs_client: Option<(String, Option<Origin>)>,
}

/// The ACL agent kind. `default` is what happens when no enforce rule matches.
pub struct Acl {
    pub default: Action,
}

impl Default for Acl {
    fn default() -> Self {
        Acl {
            default: Action::Deny,
        }
    }
}

/// Collects reasons, one per rule, in the order rules first decided something.
#[derive(Default)]
struct Explain {
    reasons: Vec<Reason>,
}

impl Explain {
    fn add(&mut self, rule: Option<&Rule>, effect: Effect, detail: Option<String>) {
        let policy = rule.map_or("default", |r| r.id.as_str());
        if let Some(r) = self.reasons.iter_mut().find(|r| r.policy == policy) {
            // A rule that allowed some candidates and removed others narrowed.
            if r.effect != effect && r.effect != Effect::Audit {
                r.effect = Effect::Narrow;
            }
            return;
        }
        let mut r = Reason::new(NAME, policy, effect);
        r.detail = detail;
        if let Some(rule) = rule {
            r = r.with_level(rule.level).with_origin(rule.origin.as_ref());
        }
        self.reasons.push(r);
    }
}

impl Acl {
    /// Checks each candidate; returns the allowed ones and the explanation.
    fn narrow<'c>(
        &self,
        rules: &AclRules,
        candidates: &[&'c str],
        query: impl Fn(&'c str) -> Query<'c>,
    ) -> (Vec<&'c str>, Explain) {
        let mut explain = Explain::default();
        let mut allowed = Vec::with_capacity(candidates.len());
        for &c in candidates {
            let q = query(c);
            let rule = rules.enforce.first_match(&q);
            if rule.map_or(self.default, |r| r.action) == Action::Allow {
                allowed.push(c);
                explain.add(rule, Effect::Allow, None);
            } else {
                explain.add(rule, Effect::Deny, None);
            }
            for r in rules.audit.candidates(&q).filter(|r| r.matches(&q)) {
                let detail = format!("would {}", r.action.as_str());
                explain.add(Some(r), Effect::Audit, Some(detail));
            }
        }
        (allowed, explain)
    }

    /// Candidate-list events never deny; rules that only removed candidates show as `narrow`.
    fn narrowed_patch(key: &str, allowed: &[&str], mut explain: Explain) -> State {
        for r in &mut explain.reasons {
            if r.effect == Effect::Deny {
                r.effect = Effect::Narrow;
            }
        }
        let mut patch = State::new();
        patch.set_strings(key, allowed);
        patch.insert(keys::REASONS, kind::reasons(explain.reasons));
        patch
    }

    /// Whether to import a service a peer offers: asked as "may this peer reach us with this
    /// service", the partial check expose and list make, with the service's labels.
    fn import(&self, rules: &AclRules, e: &bus::event::RemoteService) -> State {
        let (allowed, explain) = self.narrow(rules, &[e.peer.as_str()], |p| Query {
            dst_service: Some(&e.service),
            src_peer: Some(p),
            direction: Some(Direction::Incoming),
            partial: true,
            dst_labels: e.labels.as_ref(),
            ..Query::default()
        });
        let action = if allowed.is_empty() {
            Action::Deny
        } else {
            Action::Allow
        };
        let mut patch = State::new();
        patch.insert(keys::ACTION, action.as_str());
        patch.insert(keys::REASONS, kind::reasons(explain.reasons));
        patch
    }

    fn new_connection(
        &self,
        rules: &AclRules,
        e: &bus::event::NewConnection,
        state: &State,
    ) -> State {
        if let Some((id, origin)) = &rules.needs_client {
            if e.src_labels.as_ref().is_none_or(Labels::is_empty) {
                let reason = Reason::new(NAME, "unknown-client", Effect::Deny).with_detail(format!(
                    "the connection carries no client attributes (src_labels), and {} selects clients by them",
                    origin.as_ref().map_or_else(|| format!("policy {id}"), ToString::to_string)
                ));
                return kind::deny(reason);
            }
        }
        let base = Query {
            src_service: Some(&e.src_service),
            dst_service: Some(&e.dst_service),
            src_peer: e.src_peer.as_deref(),
            direction: Some(e.direction),
            namespace: e.namespace.as_deref(),
            src_labels: e.src_labels.as_ref(),
            dst_labels: e.dst_labels.as_ref(),
            ..Query::default()
        };
        let peer_labels = |p: &str| e.peer_labels.as_ref().and_then(|m| m.get(p));
        let mut patch = State::new();
        let (action, explain) = match state.get_strings(keys::DST_PEERS) {
            Some(peers) if peers.is_empty() => {
                let reason =
                    Reason::new(NAME, "default", Effect::Deny).with_detail("no candidate peers");
                return kind::deny(reason);
            }
            Some(peers) => {
                let (allowed, mut explain) = self.narrow(rules, &peers, |p| Query {
                    dst_peer: Some(p),
                    dst_peer_labels: peer_labels(p),
                    ..base
                });
                if allowed.is_empty() {
                    (Action::Deny, explain)
                } else {
                    if allowed.len() < peers.len() {
                        patch.set_strings(keys::DST_PEERS, &allowed);
                        for r in &mut explain.reasons {
                            if r.effect == Effect::Deny {
                                r.effect = Effect::Narrow;
                            }
                        }
                    }
                    (Action::Allow, explain)
                }
            }
            None => {
                let (allowed, explain) = self.narrow(rules, &[""], |_| base);
                let action = if allowed.is_empty() {
                    Action::Deny
                } else {
                    Action::Allow
                };
                (action, explain)
            }
        };
        patch.insert(keys::ACTION, action.as_str());
        patch.insert(keys::REASONS, kind::reasons(explain.reasons));
        patch
    }
}

impl AgentKind for Acl {
    type Policy = AclPolicy;
    type Rules = AclRules;

    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, p: &AclPolicy) -> Result<(), String> {
        kind::check_identity(NAME, &p.agent, &p.id)?;
        let m = &p.matcher;
        for (field, s) in [
            ("match.src_labels", &m.src_labels),
            ("match.dst_labels", &m.dst_labels),
            ("match.dst_peer_labels", &m.dst_peer_labels),
            ("match.peer_labels", &m.peer_labels),
        ] {
            if let Some(s) = s {
                s.validate(field)?;
            }
        }
        for (field, list) in [("match.from", &m.from), ("match.to", &m.to)] {
            match list.as_deref() {
                Some([]) => return Err(format!("{field}: an empty list matches no connection; give at least one selector ({{}} matches every one)")),
                Some(list) => {
                    for (i, s) in list.iter().enumerate() {
                        s.validate(&format!("{field}[{i}]"))?;
                    }
                }
                None => {}
            }
        }
        if m.namespace.as_deref() == Some("") {
            return Err("match.namespace: empty; leave it out to match every namespace".into());
        }
        if m.peer_labels.is_some() && m.connections_only() {
            return Err("match.peer_labels applies to expose-service and service-list-request only, and this rule also reads what only a connection has (src_service, dst_peer, src_labels, dst_peer_labels, namespace, from or to): it never matches".into());
        }
        Ok(())
    }

    fn compile(&self, policies: Vec<Stored<AclPolicy>>) -> AclRules {
        let (mut enforce, mut audit) = (Vec::new(), Vec::new());
        let mut needs_client: Option<((Level, i32, String), Option<Origin>)> = None;
        for Stored {
            id,
            level,
            policy: p,
        } in policies
        {
            let rule = Rule {
                id,
                level,
                action: p.action,
                m: p.matcher,
                origin: p.origin,
            };
            // The one named in the denial: the first in evaluation order, so that the name does
            // not depend on the order policies were stored in.
            let key = (rule.level, p.priority, rule.id.clone());
            if p.mode == Mode::Enforce
                && rule.m.selects_clients()
                && needs_client.as_ref().is_none_or(|(k, _)| key < *k)
            {
                needs_client = Some((key, rule.origin.clone()));
            }
            match p.mode {
                Mode::Enforce => enforce.push((p.priority, rule)),
                Mode::Audit => audit.push((p.priority, rule)),
            }
        }
        AclRules {
            enforce: Index::new(enforce),
            audit: Index::new(audit),
            needs_client: needs_client.map(|((_, _, id), origin)| (id, origin)),
        }
    }

    /// An ACL answer depends on the names it matches and the candidates it narrows, and on
    /// nothing else.
    fn cache_inputs(
        &self,
        _rules: &AclRules,
        event: &Event,
        _state: &State,
    ) -> Option<bus::cache::Declared> {
        let (attrs, state): (&'static [&'static str], &'static [&'static str]) = match event {
            Event::NewConnection(_) => (
                &[
                    attrs::SRC_SERVICE,
                    attrs::DST_SERVICE,
                    attrs::SRC_PEER,
                    attrs::DIRECTION,
                    attrs::SRC_LABELS,
                    attrs::DST_LABELS,
                    attrs::PEER_LABELS,
                    attrs::NAMESPACE,
                ],
                &[keys::DST_PEERS],
            ),
            Event::ExposeService(_) => (
                &[attrs::SERVICE, attrs::SERVICE_LABELS, attrs::PEER_LABELS],
                &[keys::TARGET_PEERS],
            ),
            Event::ServiceListRequest(_) => (
                &[
                    attrs::SRC_PEER,
                    attrs::SRC_PEER_LABELS,
                    attrs::SERVICE_LABELS,
                ],
                &[keys::SERVICES],
            ),
            Event::RemoteServiceAdded(_) => (&[attrs::SERVICE, attrs::PEER, attrs::LABELS], &[]),
            _ => return None,
        };
        Some(bus::cache::Declared { attrs, state })
    }

    fn decide(&self, rules: &AclRules, event: &Event, state: &State) -> State {
        match event {
            Event::NewConnection(e) => self.new_connection(rules, e, state),
            Event::ExposeService(e) => {
                let peers = state.get_strings(keys::TARGET_PEERS).unwrap_or_default();
                let (allowed, explain) = self.narrow(rules, &peers, |p| Query {
                    dst_service: Some(&e.service),
                    src_peer: Some(p),
                    direction: Some(Direction::Incoming),
                    partial: true,
                    dst_labels: e.service_labels.as_ref(),
                    peer_labels: e.peer_labels.as_ref().and_then(|m| m.get(p)),
                    ..Query::default()
                });
                Self::narrowed_patch(keys::TARGET_PEERS, &allowed, explain)
            }
            Event::ServiceListRequest(e) => {
                let services = state.get_strings(keys::SERVICES).unwrap_or_default();
                let (allowed, explain) = self.narrow(rules, &services, |s| Query {
                    dst_service: Some(s),
                    src_peer: Some(&e.src_peer),
                    direction: Some(Direction::Incoming),
                    partial: true,
                    dst_labels: e.service_labels.as_ref().and_then(|m| m.get(s)),
                    peer_labels: e.src_peer_labels.as_ref(),
                    ..Query::default()
                });
                Self::narrowed_patch(keys::SERVICES, &allowed, explain)
            }
            Event::RemoteServiceAdded(e) => self.import(rules, e),
            _ => State::new(),
        }
    }
}

#[cfg(test)]
#[path = "acl_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "acl_label_tests.rs"]
mod label_tests;
