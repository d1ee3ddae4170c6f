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
//! 6. Any other key belongs to the kind that set it first in the run: a later answer of the
//!    same kind replaces it; another kind's answer that sets it otherwise is refused whole. So
//!    no agent can rewrite what another keeps in the state for itself (conn-limit's
//!    `conn_limit`, which says which slots its undo gives back).
//! 7. `target_peer` must be a string. An answer that holds something for the connection's
//!    target (`holds_target`: the peer it admitted the connection for, or nil for none; the
//!    limiters set it when a policy of theirs names `target_peer`) fixes it: a later answer
//!    that sets it to another peer, or sets it at all when none was set, is refused whole, and
//!    so is a `holds_target` that is not the target as it stands. A limiter that admitted the
//!    connection for one peer (or for none) cannot be walked around by moving it to another.
//!    `holds_target` is not kept in the state. That `target_peer` is one of the final
//!    `dst_peers` is checked once the chain is over (a later agent may still narrow the
//!    candidates, which can only make the decision a deny).
//! 8. Each reason an answer carries is stamped with the answering kind: no agent can speak
//!    for another (a forged conn-limit deny would spare conn-limit its undo).
//!
//! A patch that breaks a rule (a well-known key of the wrong shape, a key another kind holds)
//! is rejected whole ([`MergeError`]) and the state is left untouched, so an agent cannot
//! half-apply an answer; the dispatcher counts that agent as failed.

use std::collections::{BTreeMap, HashSet};

use crate::decision::Action;
use crate::state::{keys, State, Value};

/// What the chain does after a merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The patch denied: the chain stops here.
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("agent answer has a malformed `{key}`: {expected}")]
    Malformed { key: String, expected: &'static str },
    #[error("agent answer sets `{key}`, which {owner} set: only {owner} may change it")]
    Owned { key: String, owner: String },
    #[error("agent answer moves `target_peer` to {to:?} after {holder} answered for {from:?}: a limiter's admission is for its peer")]
    TargetHeld {
        holder: String,
        from: Option<String>,
        to: String,
    },
}

fn bad(key: &str, expected: &'static str) -> MergeError {
    MergeError::Malformed {
        key: key.to_string(),
        expected,
    }
}

/// What one run's earlier answers hold, for rules 6 and 7: the chain keeps one per run and
/// hands it to every merge.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Holds {
    /// The kind that first set each key of rule 6. Empty for the shipped kinds but
    /// conn-limit, so most runs allocate nothing.
    owners: BTreeMap<String, String>,
    /// The kind whose answer fixed `target_peer`.
    target: Option<String>,
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
        let known = [Action::Allow, Action::Deny].map(Action::as_str);
        if !a.as_str().is_some_and(|a| known.contains(&a)) {
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
    if let Some(h) = patch.get(keys::HOLDS_TARGET) {
        if !(h.is_nil() || h.as_str().is_some()) {
            return Err(bad(
                keys::HOLDS_TARGET,
                "the target peer it holds for, or nil",
            ));
        }
    }
    Ok(())
}

/// Checks rules 6 and 7 for `by`'s patch against what earlier answers hold.
fn check_holds(state: &State, patch: &State, by: &str, holds: &Holds) -> Result<(), MergeError> {
    if let (Some(holder), Some(to)) = (&holds.target, patch.get_str(keys::TARGET_PEER)) {
        let from = state.get_str(keys::TARGET_PEER);
        if from != Some(to) {
            return Err(MergeError::TargetHeld {
                holder: holder.clone(),
                from: from.map(str::to_string),
                to: to.to_string(),
            });
        }
    }
    if let Some(held) = patch.get(keys::HOLDS_TARGET) {
        // The target as this answer leaves it: its own pick, else what stands.
        let now = patch
            .get_str(keys::TARGET_PEER)
            .or_else(|| state.get_str(keys::TARGET_PEER));
        if held.as_str() != now {
            return Err(bad(
                keys::HOLDS_TARGET,
                "the target peer as it stands (the chain moved it meanwhile: subscribe the limiter after whatever picks the peer)",
            ));
        }
    }
    for (key, value) in &patch.0 {
        if let Some(owner) = holds.owners.get(key) {
            if owner != by && state.get(key) != Some(value) {
                return Err(MergeError::Owned {
                    key: key.clone(),
                    owner: owner.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Rule 8: each reason names the kind that gave it.
fn stamp(reasons: &mut [Value], by: &str) {
    for r in reasons {
        let Value::Map(fields) = r else { continue };
        match fields.iter_mut().find(|(k, _)| k.as_str() == Some("agent")) {
            // The usual case, an agent naming itself, costs no allocation.
            Some((_, v)) if v.as_str() == Some(by) => {}
            Some((_, v)) => *v = Value::from(by),
            None => fields.push((Value::from("agent"), Value::from(by))),
        }
    }
}

/// Folds `by`'s patch into the state. See the module docs for the rules.
pub fn merge(
    state: &mut State,
    patch: State,
    by: &str,
    holds: &mut Holds,
) -> Result<Flow, MergeError> {
    check(&patch)?;
    check_holds(state, &patch, by, holds)?;
    let mut flow = Flow::Continue;
    for (key, value) in patch.0 {
        match key.as_str() {
            keys::ACTION => {
                // `check` made sure the patch's action is one of the two.
                if value.as_str() == Some(Action::Deny.as_str()) {
                    flow = Flow::Stop;
                    state.set_action(Action::Deny);
                } else if !state.denies() {
                    state.set_action(Action::Allow);
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
                stamp(&mut new, by);
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
            keys::TARGET_PEER => state.insert(key, value),
            keys::HOLDS_TARGET => {
                if holds.target.is_none() {
                    holds.target = Some(by.to_string());
                }
            }
            _ => {
                if !holds.owners.contains_key(&key) {
                    holds.owners.insert(key.clone(), by.to_string());
                }
                state.insert(key, value)
            }
        }
    }
    Ok(flow)
}

#[cfg(test)]
#[path = "merge_tests.rs"]
mod tests;
