//! Typed events (version 1 of the contract) and their decoding at the boundary.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::clusterlink::{
    ConnectionState, ConnectionStatus, PeerChange, RemoteService, CONNECTION_STATUS, PEER_ADDED,
    PEER_REMOVED, REMOTE_SERVICE_ADDED, REMOTE_SERVICE_REMOVED,
};
use crate::codec::{self, CodecError};
use crate::error::InvalidName;
use crate::state::{keys, State, Value};
use crate::subject::check_event;

pub const NEW_CONNECTION: &str = "new-connection";
pub const EXPOSE_SERVICE: &str = "expose-service";
pub const SERVICE_LIST_REQUEST: &str = "service-list-request";
pub const CONNECTION_CLOSED: &str = "connection-closed";
/// The events this version of the contract gives a schema to. Others are generic maps.
pub const V1_EVENTS: [&str; 4] = [
    NEW_CONNECTION,
    EXPOSE_SERVICE,
    SERVICE_LIST_REQUEST,
    CONNECTION_CLOSED,
];
/// Every event the contract (docs/contract.md) names, ClusterLink's among them: with no subscription they are
/// `no-subscribers`, any other name `unknown-event`; `subscribe` takes them without `--force`.
pub const CONTRACT_EVENTS: [&str; 9] = [
    NEW_CONNECTION,
    EXPOSE_SERVICE,
    SERVICE_LIST_REQUEST,
    CONNECTION_CLOSED,
    CONNECTION_STATUS,
    PEER_ADDED,
    PEER_REMOVED,
    REMOTE_SERVICE_ADDED,
    REMOTE_SERVICE_REMOVED,
];

/// A new unique id (NUID): for event ids and connection ids the hookpoint did not set.
pub fn new_id() -> String {
    nuid::next().to_string()
}

/// A validated event name (a kebab-case subject token).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventName(String);

impl EventName {
    pub fn new(s: &str) -> Result<Self, InvalidName> {
        check_event(s)?;
        Ok(EventName(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Whether this crate decodes the event's attributes into a type.
    pub fn is_v1(&self) -> bool {
        V1_EVENTS.contains(&self.0.as_str())
    }
    /// Whether the contract names this event.
    pub fn is_contract(&self) -> bool {
        CONTRACT_EVENTS.contains(&self.0.as_str())
    }
}

impl TryFrom<String> for EventName {
    type Error = InvalidName;
    fn try_from(s: String) -> Result<Self, InvalidName> {
        EventName::new(&s)
    }
}

impl From<EventName> for String {
    fn from(e: EventName) -> String {
        e.0
    }
}

impl fmt::Display for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Incoming,
    Outgoing,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Incoming => "incoming",
            Direction::Outgoing => "outgoing",
        }
    }
}

/// Labels of a workload, service or peer (Kubernetes-style `key: value`), which ACL rules may
/// select on. Every label field is optional: a name-only event is decided by names alone.
pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewConnection {
    pub src_service: String,
    pub dst_service: String,
    pub direction: Direction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_peer: Option<String>,
    /// Candidate peers that offer `dst_service`; seeds the state's `dst_peers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_peers: Option<Vec<String>>,
    /// Set by the hookpoint, or by the dispatcher before the chain runs so that stateful
    /// agents can key on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<String>,
    /// The source workload's labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_labels: Option<Labels>,
    /// The destination service's labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_labels: Option<Labels>,
    /// Labels of candidate peers, by peer name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_labels: Option<BTreeMap<String, Labels>>,
    /// The namespace the connection belongs to, as ClusterLink scopes its AccessPolicies: the
    /// Import's on the client's side, the Export's on the service's side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposeService {
    pub service: String,
    /// Candidate peers; seeds the state's `target_peers`.
    pub peers: Vec<String>,
    /// The service's labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_labels: Option<Labels>,
    /// Labels of candidate peers, by peer name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_labels: Option<BTreeMap<String, Labels>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceListRequest {
    pub src_peer: String,
    /// Candidate services; seeds the state's `services`.
    pub services: Vec<String>,
    /// The requesting peer's labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_peer_labels: Option<Labels>,
    /// Labels of candidate services, by service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_labels: Option<BTreeMap<String, Labels>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionClosed {
    pub connection_id: String,
    pub src_service: String,
    pub dst_service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_peer: Option<String>,
}

/// An event as an agent or the dispatcher sees it after decoding.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    NewConnection(NewConnection),
    ExposeService(ExposeService),
    ServiceListRequest(ServiceListRequest),
    ConnectionClosed(ConnectionClosed),
    ConnectionStatus(ConnectionStatus),
    PeerAdded(PeerChange),
    PeerRemoved(PeerChange),
    RemoteServiceAdded(RemoteService),
    RemoteServiceRemoved(RemoteService),
    /// An event this version of the contract has no schema for: its attributes as a map.
    Other {
        name: EventName,
        attributes: BTreeMap<String, Value>,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("bad {event} event: {source}")]
pub struct EventError {
    pub event: String,
    #[source]
    pub source: CodecError,
}

impl Event {
    /// Decodes the payload of `name`: strictly typed for v1 events (missing or ill-typed fields
    /// are errors, unknown extra fields are ignored), a plain map otherwise. Always a map: a
    /// list of positional fields is refused (`codec::decode_map`).
    pub fn decode(name: &EventName, payload: &[u8]) -> Result<Event, EventError> {
        let err = |source| EventError {
            event: name.to_string(),
            source,
        };
        let ev = match name.as_str() {
            NEW_CONNECTION => {
                Event::NewConnection(codec::decode_map("new-connection", payload).map_err(err)?)
            }
            EXPOSE_SERVICE => {
                Event::ExposeService(codec::decode_map("expose-service", payload).map_err(err)?)
            }
            SERVICE_LIST_REQUEST => Event::ServiceListRequest(
                codec::decode_map("service-list-request", payload).map_err(err)?,
            ),
            CONNECTION_CLOSED => Event::ConnectionClosed(
                codec::decode_map("connection-closed", payload).map_err(err)?,
            ),
            CONNECTION_STATUS => {
                Event::ConnectionStatus(codec::decode_map(CONNECTION_STATUS, payload).map_err(err)?)
            }
            PEER_ADDED => Event::PeerAdded(codec::decode_map(PEER_ADDED, payload).map_err(err)?),
            PEER_REMOVED => {
                Event::PeerRemoved(codec::decode_map(PEER_REMOVED, payload).map_err(err)?)
            }
            REMOTE_SERVICE_ADDED => Event::RemoteServiceAdded(
                codec::decode_map(REMOTE_SERVICE_ADDED, payload).map_err(err)?,
            ),
            REMOTE_SERVICE_REMOVED => Event::RemoteServiceRemoved(
                codec::decode_map(REMOTE_SERVICE_REMOVED, payload).map_err(err)?,
            ),
            _ => Event::Other {
                name: name.clone(),
                attributes: codec::decode_map("event attributes", payload).map_err(err)?,
            },
        };
        Ok(ev)
    }

    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        match self {
            Event::NewConnection(e) => codec::encode("new-connection", e),
            Event::ExposeService(e) => codec::encode("expose-service", e),
            Event::ServiceListRequest(e) => codec::encode("service-list-request", e),
            Event::ConnectionClosed(e) => codec::encode("connection-closed", e),
            Event::ConnectionStatus(e) => codec::encode(CONNECTION_STATUS, e),
            Event::PeerAdded(e) => codec::encode(PEER_ADDED, e),
            Event::PeerRemoved(e) => codec::encode(PEER_REMOVED, e),
            Event::RemoteServiceAdded(e) => codec::encode(REMOTE_SERVICE_ADDED, e),
            Event::RemoteServiceRemoved(e) => codec::encode(REMOTE_SERVICE_REMOVED, e),
            Event::Other { attributes, .. } => codec::encode("event attributes", attributes),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Event::NewConnection(_) => NEW_CONNECTION,
            Event::ExposeService(_) => EXPOSE_SERVICE,
            Event::ServiceListRequest(_) => SERVICE_LIST_REQUEST,
            Event::ConnectionClosed(_) => CONNECTION_CLOSED,
            Event::ConnectionStatus(_) => CONNECTION_STATUS,
            Event::PeerAdded(_) => PEER_ADDED,
            Event::PeerRemoved(_) => PEER_REMOVED,
            Event::RemoteServiceAdded(_) => REMOTE_SERVICE_ADDED,
            Event::RemoteServiceRemoved(_) => REMOTE_SERVICE_REMOVED,
            Event::Other { name, .. } => name.as_str(),
        }
    }

    /// Whether the event asks for a decision (allow or deny, candidates): the reports
    /// (`connection-closed`, `connection-status`, peers coming and going, a service withdrawn)
    /// are acknowledged, and a kind that cannot decide does not deny them.
    pub fn is_report(&self) -> bool {
        matches!(
            self,
            Event::ConnectionClosed(_)
                | Event::ConnectionStatus(_)
                | Event::PeerAdded(_)
                | Event::PeerRemoved(_)
                | Event::RemoteServiceRemoved(_)
        )
    }

    /// The state the chain starts from: the event's candidate lists, under the keys agents
    /// narrow (`dst_peers`; `peers` as `target_peers`; `services`), each candidate once (a
    /// duplicate would let a load balancer weigh one peer twice). A generic event seeds the
    /// same keys from attributes of those names.
    pub fn initial_state(&self) -> State {
        let mut s = State::new();
        match self {
            Event::NewConnection(e) => {
                if let Some(p) = &e.dst_peers {
                    s.set_strings(keys::DST_PEERS, &unique(p.iter().map(String::as_str)));
                }
            }
            Event::ExposeService(e) => s.set_strings(
                keys::TARGET_PEERS,
                &unique(e.peers.iter().map(String::as_str)),
            ),
            Event::ServiceListRequest(e) => s.set_strings(
                keys::SERVICES,
                &unique(e.services.iter().map(String::as_str)),
            ),
            Event::ConnectionClosed(_)
            | Event::ConnectionStatus(_)
            | Event::PeerAdded(_)
            | Event::PeerRemoved(_)
            | Event::RemoteServiceAdded(_)
            | Event::RemoteServiceRemoved(_) => {}
            Event::Other { attributes, .. } => {
                for (from, to) in [
                    (keys::DST_PEERS, keys::DST_PEERS),
                    ("peers", keys::TARGET_PEERS),
                    (keys::SERVICES, keys::SERVICES),
                ] {
                    if let Some(Value::Array(items)) = attributes.get(from) {
                        // Only a list of strings is a candidate list; anything else stays an
                        // ordinary attribute.
                        if let Some(names) =
                            items.iter().map(Value::as_str).collect::<Option<Vec<_>>>()
                        {
                            s.set_strings(to, &unique(names.into_iter()));
                        }
                    }
                }
            }
        }
        s
    }
}

/// The event's payload as agents get it: the candidate lists (`dst_peers`, `peers`,
/// `services`) emptied, since the agents read the current candidates from the state, and a
/// list that travelled twice (in the payload and, base64, in `Policy-State`) would halve the
/// candidates an event can carry. The lists stay, empty, so a typed decode still finds them.
pub fn without_candidates(payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    let Value::Map(mut map) = codec::decode::<Value>("event attributes", payload)? else {
        return Ok(payload.to_vec());
    };
    let mut emptied = false;
    for (k, v) in map.iter_mut() {
        let candidate = matches!(k.as_str(), Some("dst_peers" | "peers" | "services"));
        if candidate && matches!(v, Value::Array(items) if !items.is_empty()) {
            *v = Value::Array(Vec::new());
            emptied = true;
        }
    }
    if emptied {
        codec::encode("event attributes", &Value::Map(map))
    } else {
        Ok(payload.to_vec())
    }
}

/// The names in first-seen order, each once.
fn unique<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = std::collections::HashSet::new();
    names.filter(|n| seen.insert(*n)).collect()
}

/// Sets one attribute in an event payload and keeps every other, including those this version
/// of the contract does not know: the dispatcher adds a `connection_id` this way, so that a
/// newer hookpoint's attributes still reach the agents.
pub fn set_attribute(payload: &[u8], key: &str, value: Value) -> Result<Vec<u8>, CodecError> {
    let mut map: Vec<(Value, Value)> = match codec::decode::<Value>("event attributes", payload)? {
        Value::Map(m) => m,
        _ => Vec::new(),
    };
    match map.iter_mut().find(|(k, _)| k.as_str() == Some(key)) {
        Some((_, v)) => *v = value,
        None => map.push((Value::from(key), value)),
    }
    codec::encode("event attributes", &Value::Map(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> EventName {
        EventName::new(s).unwrap()
    }

    #[test]
    fn v1_events_round_trip_and_ignore_unknown_fields() {
        let nc = NewConnection {
            src_service: "a".into(),
            dst_service: "b".into(),
            direction: Direction::Outgoing,
            src_peer: None,
            dst_peers: Some(vec!["p1".into()]),
            connection_id: None,
            src_labels: None,
            dst_labels: None,
            peer_labels: None,
            namespace: None,
        };
        let mut map: BTreeMap<String, Value> =
            codec::decode("t", &codec::encode("t", &nc).unwrap()).unwrap();
        map.insert("future_field".into(), Value::from(1));
        let bytes = codec::encode("t", &map).unwrap();
        let ev = Event::decode(&name(NEW_CONNECTION), &bytes).unwrap();
        assert_eq!(ev, Event::NewConnection(nc));
        assert_eq!(
            ev.initial_state().get_strings(keys::DST_PEERS),
            Some(vec!["p1"])
        );
    }

    #[test]
    fn missing_and_ill_typed_fields_are_named() {
        let mut map = BTreeMap::new();
        map.insert("src_service".to_string(), Value::from("a"));
        let bytes = codec::encode("t", &map).unwrap();
        let err = Event::decode(&name(NEW_CONNECTION), &bytes).unwrap_err();
        assert!(err.to_string().contains("dst_service"), "{err}");
        map.insert("dst_service".into(), Value::from("b"));
        map.insert("direction".into(), Value::from("sideways"));
        let bytes = codec::encode("t", &map).unwrap();
        let err = Event::decode(&name(NEW_CONNECTION), &bytes).unwrap_err();
        assert!(err.to_string().contains("sideways"), "{err}");
        assert!(Event::decode(&name(EXPOSE_SERVICE), b"\xc1").is_err());
    }

    #[test]
    fn generic_events_seed_candidates_by_name() {
        let mut map = BTreeMap::new();
        map.insert("peers".to_string(), Value::Array(vec![Value::from("x")]));
        let bytes = codec::encode("t", &map).unwrap();
        let ev = Event::decode(&name("custom-hook"), &bytes).unwrap();
        assert_eq!(ev.name(), "custom-hook");
        assert_eq!(
            ev.initial_state().get_strings(keys::TARGET_PEERS),
            Some(vec!["x"])
        );
        assert!(!name("custom-hook").is_v1());
        assert!(EventName::new("Bad.Name").is_err());
    }

    #[test]
    fn duplicate_candidates_are_offered_once() {
        let e = Event::ExposeService(ExposeService {
            service: "db".into(),
            peers: vec!["b".into(), "a".into(), "b".into(), "a".into()],
            service_labels: None,
            peer_labels: None,
        });
        assert_eq!(
            e.initial_state().get_strings(keys::TARGET_PEERS),
            Some(vec!["b", "a"])
        );
    }

    #[test]
    fn agents_get_the_candidates_once() {
        let e = ExposeService {
            service: "db".into(),
            peers: vec!["a".into(), "b".into()],
            service_labels: None,
            peer_labels: None,
        };
        let bytes = codec::encode("t", &e).unwrap();
        let slim = without_candidates(&bytes).unwrap();
        assert!(slim.len() < bytes.len());
        let back = Event::decode(&name(EXPOSE_SERVICE), &slim).unwrap();
        assert_eq!(
            back,
            Event::ExposeService(ExposeService {
                service: "db".into(),
                peers: vec![],
                service_labels: None,
                peer_labels: None,
            })
        );
        let none =
            codec::encode("t", &BTreeMap::from([("x".to_string(), Value::from(1))])).unwrap();
        assert_eq!(without_candidates(&none).unwrap(), none);
    }

    #[test]
    fn setting_an_attribute_keeps_the_unknown_ones() {
        let mut map = BTreeMap::new();
        map.insert("src_service".to_string(), Value::from("a"));
        map.insert("x_future".to_string(), Value::from(7));
        map.insert("connection_id".to_string(), Value::from(""));
        let bytes = codec::encode("t", &map).unwrap();
        let out = set_attribute(&bytes, "connection_id", Value::from("c1")).unwrap();
        let back: BTreeMap<String, Value> = codec::decode("t", &out).unwrap();
        assert_eq!(back["x_future"], Value::from(7));
        assert_eq!(back["connection_id"], Value::from("c1"));
        assert_eq!(back.len(), 3);
    }
}
