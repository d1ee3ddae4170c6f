//! The shared state: a MessagePack map carried from agent to agent in the `Policy-State`
//! header. It is the one stringly-typed map in the system, on purpose: agents of any kind and
//! language put their own keys in it, and the decision hands them to the gateway.

use std::collections::BTreeMap;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};

/// A MessagePack value: what a state key maps to.
pub type Value = rmpv::Value;

/// A value of a MessagePack map by key (a reason's fields, an event's attributes, a map in the
/// state); `None` when `map` is no map or has no such key.
pub fn field<'a>(map: &'a Value, name: &str) -> Option<&'a Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v)
}

/// [`field`], as a string.
pub fn field_str<'a>(map: &'a Value, name: &str) -> Option<&'a str> {
    field(map, name)?.as_str()
}

/// Well-known state keys with merge rules of their own (see [`crate::merge`]).
pub mod keys {
    pub const ACTION: &str = "action";
    pub const DST_PEERS: &str = "dst_peers";
    pub const TARGET_PEERS: &str = "target_peers";
    pub const SERVICES: &str = "services";
    pub const TARGET_PEER: &str = "target_peer";
    pub const RATE_LIMIT: &str = "rate_limit";
    pub const REASONS: &str = "reasons";
    pub const CONNECTION_ID: &str = "connection_id";
    pub const EVENT_ID: &str = "event_id";
    /// One dispatcher's run of the event's chain. A hookpoint that hedges sends the same event
    /// (same `event_id`) to two dispatchers; what an agent takes for one run is undone by that
    /// run's id, never the other's.
    pub const RUN_ID: &str = "run_id";
    pub const DEGRADED: &str = "degraded";
    /// On a dry run's decision: `true`. For the agents, the runtime sets it in the state it
    /// gives a kind (from the `Policy-Dry-Run` header), so a kind that takes something knows
    /// to take nothing.
    pub const DRY_RUN: &str = "dry_run";
    /// On a dry run's decision: each agent's timing, as in the tap record (`policyctl
    /// explain` prints them).
    pub const AGENTS: &str = "agents";
    /// In an answer: the agent holds something for the connection's target peer as it was
    /// when it answered (the peer, or nil for none), so it may not change afterwards (merge
    /// rule 7). Limiters whose policies name `target_peer` set it; the dispatcher keeps it out
    /// of the decision.
    pub const HOLDS_TARGET: &str = "holds_target";
    /// Candidate lists: they only narrow along the chain.
    pub const CANDIDATES: [&str; 3] = [DST_PEERS, TARGET_PEERS, SERVICES];
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("Policy-State is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("Policy-State: {0}")]
    Codec(#[from] CodecError),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct State(pub BTreeMap<String, Value>);

impl State {
    pub fn new() -> Self {
        State::default()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.0.insert(key.into(), value.into());
    }

    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `key` holds `true` (a flag such as [`keys::DRY_RUN`]).
    pub fn flag(&self, key: &str) -> bool {
        self.get(key) == Some(&Value::Boolean(true))
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    /// A list of strings, or `None` when the key is absent or not such a list.
    pub fn get_strings(&self, key: &str) -> Option<Vec<&str>> {
        match self.get(key)? {
            Value::Array(items) => items.iter().map(|v| v.as_str()).collect(),
            _ => None,
        }
    }

    pub fn set_strings<S: AsRef<str>>(&mut self, key: &str, items: &[S]) {
        let arr = items.iter().map(|s| Value::from(s.as_ref())).collect();
        self.insert(key, Value::Array(arr));
    }

    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode("state", self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        codec::decode("state", bytes)
    }

    /// The header form: standard padded base64 of the MessagePack map.
    pub fn to_header(&self) -> Result<String, CodecError> {
        Ok(base64::engine::general_purpose::STANDARD.encode(self.encode()?))
    }

    pub fn from_header(value: &str) -> Result<Self, StateError> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(value.trim())?;
        Ok(Self::decode(&bytes)?)
    }

    /// An agent's answer (a patch): the `Policy-State` header when there is one, else the
    /// payload, an empty payload being an empty patch. An answer over `max_bytes` is refused
    /// before it is decoded. The error says what is wrong, for the failed agent's reason.
    pub fn from_reply(
        header: Option<&str>,
        payload: &[u8],
        max_bytes: usize,
    ) -> Result<Self, String> {
        let size = header.map_or(payload.len(), str::len);
        if size > max_bytes {
            return Err(format!(
                "answer of {size} bytes is over the limit of {max_bytes} (--max-patch-bytes)"
            ));
        }
        match header {
            Some(h) => Self::from_header(h).map_err(|e| e.to_string()),
            None if payload.is_empty() => Ok(State::new()),
            None => Self::decode(payload).map_err(|e| e.to_string()),
        }
    }
}

impl FromIterator<(String, Value)> for State {
    fn from_iter<T: IntoIterator<Item = (String, Value)>>(iter: T) -> Self {
        State(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_codec_round_trips() {
        let mut s = State::new();
        s.set_strings(keys::DST_PEERS, &["a", "b"]);
        s.insert(
            "custom",
            Value::Map(vec![(Value::from("k"), Value::from(7))]),
        );
        s.insert("bin", Value::Binary(vec![0, 255]));
        let h = s.to_header().unwrap();
        assert!(h.bytes().all(|b| b.is_ascii_graphic()));
        assert_eq!(State::from_header(&h).unwrap(), s);
        assert_eq!(s.get_strings(keys::DST_PEERS), Some(vec!["a", "b"]));
    }

    #[test]
    fn state_is_a_named_map_on_the_wire() {
        let mut s = State::new();
        s.insert(keys::ACTION, "allow");
        let raw: rmpv::Value = rmpv::decode::read_value(&mut &s.encode().unwrap()[..]).unwrap();
        assert!(raw.is_map());
    }

    #[test]
    fn bad_headers_are_errors_not_panics() {
        assert!(matches!(
            State::from_header("***"),
            Err(StateError::Base64(_))
        ));
        // Valid base64 of a MessagePack array, not a map.
        let arr = base64::engine::general_purpose::STANDARD.encode([0x91, 0x01]);
        assert!(matches!(
            State::from_header(&arr),
            Err(StateError::Codec(_))
        ));
        assert!(State::from_header("")
            .unwrap_err()
            .to_string()
            .contains("Policy-State"));
    }
}
