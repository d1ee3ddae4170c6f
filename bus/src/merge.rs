//! The merge rules of the chain, in one function.
//!
//! The dispatcher calls the agents of an event in priority order (lower first) and folds each
//! agent's answer (a *patch*: the state keys it sets) into the state with [`merge`]:
//!
//! 1. `action: deny` is final: the state's action becomes `deny` and the chain stops.
//!    `action: allow` never overrides an earlier deny.
//! 2. Candidate lists (`dst_peers`, `target_peers`, `services`) only narrow: the result is the
//!    patch's list (in the patch's order, so an agent may reorder by preference) restricted to
//!    the current candidates. A list the event never offered stays absent.
//! 3. `rate_limit` (`{bits_per_second}`) keeps the most restrictive (smallest) value.
//! 4. `reasons` accumulate in chain order.
//! 5. The dispatcher's own keys (`event_id`, `connection_id`, `degraded`) are ignored in a
//!    patch: no agent can re-key a connection, forge an event id, or mark a decision degraded
//!    or whole. The dispatcher sets them itself.
//! 6. Any other key: the later agent's value replaces the earlier one. `target_peer` is one of
//!    these, but must be a string; that it is one of the final `dst_peers` is checked once the
//!    chain is over (a later agent may still narrow the candidates).
//!
//! A patch whose well-known keys have the wrong shape is rejected whole ([`MergeError`]) and
//! the state is left untouched, so a buggy agent cannot half-apply an answer.

use std::collections::HashSet;

use crate::state::{keys, State, Value};

/// What the chain does after a merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The patch denied: the chain stops here.
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("agent answer has a malformed `{key}`: {expected}")]
pub struct MergeError {
    pub key: String,
    pub expected: &'static str,
}

fn bad(key: &str, expected: &'static str) -> MergeError {
    MergeError {
        key: key.to_string(),
        expected,
    }
}

fn bits_per_second(v: &Value) -> Option<u64> {
    match v {
        Value::Map(entries) => entries
            .iter()
            .find(|(k, _)| k.as_str() == Some("bits_per_second"))
            .and_then(|(_, v)| v.as_u64()),
        _ => None,
    }
}

/// Checks every well-known key of the patch before anything is applied.
fn check(patch: &State) -> Result<(), MergeError> {
    if let Some(a) = patch.get(keys::ACTION) {
        if !matches!(a.as_str(), Some("allow" | "deny")) {
            return Err(bad(keys::ACTION, "\"allow\" or \"deny\""));
        }
    }
    for key in keys::CANDIDATES {
        if patch.get(key).is_some() && patch.get_strings(key).is_none() {
            return Err(bad(key, "a list of strings"));
        }
    }
    if let Some(r) = patch.get(keys::RATE_LIMIT) {
        if bits_per_second(r).is_none() {
            return Err(bad(
                keys::RATE_LIMIT,
                "a map {bits_per_second: unsigned integer}",
            ));
        }
    }
    if let Some(r) = patch.get(keys::REASONS) {
        if !matches!(r, Value::Array(items) if items.iter().all(Value::is_map)) {
            return Err(bad(keys::REASONS, "a list of maps {agent, policy, effect}"));
        }
    }
    if let Some(t) = patch.get(keys::TARGET_PEER) {
        if t.as_str().is_none() {
            return Err(bad(keys::TARGET_PEER, "a string (one of the candidates)"));
        }
    }
    Ok(())
}

/// Folds one agent's patch into the state. See the module docs for the rules.
pub fn merge(state: &mut State, patch: State) -> Result<Flow, MergeError> {
    check(&patch)?;
    let mut flow = Flow::Continue;
    for (key, value) in patch.0 {
        match key.as_str() {
            keys::ACTION => {
                if value.as_str() == Some("deny") {
                    flow = Flow::Stop;
                    state.insert(keys::ACTION, "deny");
                } else if state.get_str(keys::ACTION) != Some("deny") {
                    state.insert(keys::ACTION, "allow");
                }
            }
            keys::DST_PEERS | keys::TARGET_PEERS | keys::SERVICES => {
                let Some(current) = state.get_strings(&key) else {
                    continue;
                };
                let mut allowed: HashSet<&str> = current.into_iter().collect();
                let Value::Array(items) = value else {
                    unreachable!("checked above")
                };
                // Removing from `allowed` as we go also drops duplicates in the patch.
                let narrowed: Vec<Value> = items
                    .into_iter()
                    .filter(|v| v.as_str().is_some_and(|s| allowed.remove(s)))
                    .collect();
                state.insert(key, Value::Array(narrowed));
            }
            keys::RATE_LIMIT => {
                let new = bits_per_second(&value);
                let old = state.get(keys::RATE_LIMIT).and_then(bits_per_second);
                if old.is_none() || new < old {
                    state.insert(key, value);
                }
            }
            keys::REASONS => {
                let Value::Array(mut new) = value else {
                    unreachable!("checked above")
                };
                match state.0.get_mut(keys::REASONS) {
                    Some(Value::Array(old)) => old.append(&mut new),
                    _ => state.insert(keys::REASONS, Value::Array(new)),
                }
            }
            keys::EVENT_ID
            | keys::RUN_ID
            | keys::CONNECTION_ID
            | keys::DEGRADED
            | keys::DRY_RUN
            | keys::AGENTS => {}
            _ => state.insert(key, value),
        }
    }
    Ok(flow)
}

#[cfg(test)]
#[path = "merge_tests.rs"]
mod tests;
