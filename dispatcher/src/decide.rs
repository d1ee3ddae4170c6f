//! Deciding one event: check and decode it (once), run its chain, finalize the decision, and
//! prepare what is published after the reply (the tap record) and undone (a denied event's
//! takings). The reply goes out first: the hookpoint never waits for the tap or an undo.

use std::time::Instant;

use async_nats::HeaderMap;
use bus::event::{new_id, Event, EventName};
use bus::state::keys;
use bus::tap::Outcome;
use bus::{codec, headers, ErrorCode, ErrorReply, Value};
use bytes::Bytes;

use crate::chain::{self, finalize, Call};
use crate::tap::Tap;
use crate::Dispatcher;

pub(crate) type Reply = (HeaderMap, Bytes);

/// A decision, and what follows it once it is sent.
pub(crate) struct Decided {
    pub reply: Reply,
    pub undo: Option<crate::undo::UndoCall>,
    /// None for a dry run: the tap is what was decided, and a dry run decided nothing.
    pub tap: Option<Tap>,
}

fn bad(e: impl ToString) -> ErrorReply {
    ErrorReply::new(ErrorCode::BadRequest, e.to_string())
}

fn internal(e: impl ToString) -> ErrorReply {
    ErrorReply::new(ErrorCode::Internal, e.to_string())
}

impl Dispatcher {
    /// Decides one event. Errors are the caller's or the configuration's: a failed agent is
    /// not an error but a (deny or degraded) decision.
    pub(crate) async fn decide(
        &self,
        msg: &async_nats::Message,
        started: Instant,
    ) -> Result<Decided, ErrorReply> {
        let raw = self.subjects.event_of(&msg.subject).unwrap_or_default();
        let name = EventName::new(raw)
            .map_err(|e| ErrorReply::new(ErrorCode::UnknownEvent, e.to_string()))?;
        // A site of a fleet that has never had the fleet's configuration decides nothing.
        let unsynced = self.fleet.as_ref().and_then(|f| f.unsynced());
        let Some(chain) = self.table.chain(name.as_str()) else {
            if let Some(why) = unsynced {
                return Err(ErrorReply::new(ErrorCode::NoSubscribers, why));
            }
            return Err(if name.is_contract() {
                ErrorReply::new(
                    ErrorCode::NoSubscribers,
                    format!("no agent is subscribed to {name}: policyctl subscribe {name} <agent> --priority N"),
                )
            } else {
                let mut known: Vec<String> = bus::event::CONTRACT_EVENTS
                    .iter()
                    .map(|e| e.to_string())
                    .collect();
                known.extend(self.table.events());
                let hint =
                    bus::subject::did_you_mean(name.as_str(), known.iter().map(String::as_str))
                        .map(|k| format!(" (did you mean `{k}`?)"))
                        .unwrap_or_default();
                ErrorReply::new(
                    ErrorCode::UnknownEvent,
                    format!("unknown event `{name}`{hint}: not an event of the contract and no agent is subscribed to it"),
                )
            });
        };
        // The payload is decoded once as a value, for the bounds, the agents' copy and the
        // tap, and once into its type, for validation and the initial state.
        let attributes = self
            .options
            .limits
            .decode_event(&msg.payload)
            .map_err(|e| bad(format!("{name} event: {e}")))?;
        let mut event = Event::decode(&name, &msg.payload).map_err(bad)?;
        let mut attributes = attributes.unwrap_or(Value::Nil);

        let mut trace = HeaderMap::new();
        headers::propagate(msg.headers.as_ref(), &mut trace);
        let event_id = match headers::get(msg.headers.as_ref(), headers::POLICY_EVENT_ID) {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => {
                let id = new_id();
                trace.insert(headers::POLICY_EVENT_ID, id.as_str());
                id
            }
        };
        tracing::Span::current().record("event.id", event_id.as_str());

        // Stateful agents key on the connection id, so it must exist before the chain runs. It
        // is written into the hookpoint's own attributes, so those this version does not know
        // still reach the agents.
        let mut changed = false;
        let mut connection_id = None;
        match &mut event {
            Event::NewConnection(nc) => {
                let id = match nc.connection_id.clone().filter(|c| !c.is_empty()) {
                    Some(id) => id,
                    None => {
                        let id = new_id();
                        set_attribute(&mut attributes, keys::CONNECTION_ID, &id);
                        changed = true;
                        nc.connection_id = Some(id.clone());
                        id
                    }
                };
                connection_id = Some(id);
            }
            Event::ConnectionClosed(cc) if cc.connection_id.is_empty() => {
                return Err(bad("bad connection-closed event: connection_id is empty"));
            }
            Event::ConnectionStatus(cs) if cs.connection_id.is_empty() => {
                return Err(bad("bad connection-status event: connection_id is empty"));
            }
            _ => {}
        }

        let mut state = event.initial_state();
        self.removed_peers.narrow(&mut state);
        if let Some(id) = &connection_id {
            state.insert(keys::CONNECTION_ID, id.as_str());
        }
        // Agents may key on the event and on this run of it (conn-limit's slots list the runs
        // holding them, and a denied run's undo takes out that run only); like the connection
        // id, no patch can change either.
        state.insert(keys::EVENT_ID, event_id.as_str());
        state.insert(keys::RUN_ID, new_id().as_str());
        // What the hookpoint sent, with the connection id: the tap's copy. The agents' copy
        // leaves the candidates out: they travel once, in the state.
        let hook_attributes: Bytes = if changed {
            codec::encode("event attributes", &attributes)
                .map_err(internal)?
                .into()
        } else {
            msg.payload.clone()
        };
        let to_agents: Bytes = match agents_copy(&attributes) {
            Some(copy) => codec::encode("event attributes", &copy)
                .map_err(internal)?
                .into(),
            None => hook_attributes.clone(),
        };
        let first_header = state.to_header().map_err(internal)?;
        // What each agent call carries: the payload, the state in base64, the headers. An event
        // the server could not carry to an agent is refused here, not blamed on the agent.
        let per_call = to_agents.len() + first_header.len() + 1024;
        let max = self.nats.server_info().max_payload;
        if max > 0 && per_call > max {
            return Err(bad(format!(
                "{name} event: with its candidates in the state, a call to an agent would be {per_call} bytes, more than the server's max_payload of {max}"
            )));
        }
        // A close is an acknowledgement, not a decision (see below). A status that says the
        // connection ended releases its slots as a close does.
        let releases = match &event {
            Event::ConnectionClosed(_) => true,
            Event::ConnectionStatus(s) => s.state != bus::event::ConnectionState::Open,
            _ => false,
        };
        // A site that never had the fleet's configuration decides nothing; it still frees what
        // a release frees, which is never less safe.
        let mut run = if let Some(why) = unsynced.filter(|_| !releases) {
            chain::refused_run(state, "fleet", why)
        } else if chain.broken.is_empty() {
            let call = Call {
                nats: &self.nats,
                event: name.as_str(),
                attributes: &attributes,
                verdicts: &self.verdicts,
                payload: to_agents,
                trace: trace.clone(),
                max_patch_bytes: self.options.max_patch_bytes,
            };
            call.run_chain(&chain, state, first_header).await
        } else {
            chain::broken_chain(state, &chain.broken)
        };
        // If an agent subscribed to a release failed (conn-limit down, say), acking it would
        // hide that its slots were not freed. The hookpoint gets an error instead, and sends
        // the close again.
        if releases {
            if let Some(failed) = run.timings.iter().find(|t| {
                matches!(
                    t.outcome,
                    Outcome::Timeout | Outcome::NoResponders | Outcome::Error
                )
            }) {
                let code = match failed.outcome {
                    Outcome::Timeout => ErrorCode::AgentTimeout,
                    _ => ErrorCode::AgentError,
                };
                return Err(ErrorReply::new(
                    code,
                    format!(
                        "the close was not confirmed by {} ({}): send it again",
                        failed.agent,
                        outcome_name(failed.outcome)
                    ),
                ));
            }
        }
        if !matches!(event, Event::ConnectionClosed(_))
            && bus::hedge::past_deadline(msg.headers.as_ref())
        {
            tracing::info!(event = %name, "decided after the hookpoint's deadline: denied and undone");
            chain::deny_late(&mut run);
        }
        let dry_run = headers::dry_run(msg.headers.as_ref());
        if !dry_run && !run.state.denies() {
            crate::peers::record(self, &event).await?;
        }
        finalize(&mut run, &event_id, &event);
        if dry_run {
            // What `policyctl explain` shows: the flag, and each agent's answer time.
            run.state.insert(keys::DRY_RUN, true);
            // Named fields, as in the tap record (a plain `to_value` would give arrays).
            let encoded = codec::encode("agent timings", &run.timings).map_err(internal)?;
            let timings: Value = codec::decode("agent timings", &encoded).map_err(internal)?;
            run.state.insert(keys::AGENTS, timings);
        }

        let body = run.state.encode().map_err(internal)?;
        // The agents' keys all end up in the decision: if they made it larger than the server
        // carries, say so rather than leave the gateway waiting for a reply that cannot be sent.
        if max > 0 && body.len() + 1024 > max {
            return Err(internal(format!(
                "the decision is {} bytes, more than the server's max_payload of {max}: the agents put too much in the state",
                body.len()
            )));
        }
        let total_us = started.elapsed().as_micros() as u64;
        tracing::debug!(event = %name, action = run.state.get_str(keys::ACTION), total_us, "decided");
        let body = Bytes::from(body);
        // A dry run took nothing: nothing to undo, nothing for the monitor to count.
        let undo = (!dry_run || run.ignored_dry_run)
            .then(|| crate::undo::undo_for(&run.state, &run.timings, run.owed, &body, &trace))
            .flatten();
        let result = match run.state.action() {
            Some(bus::Action::Deny) => "deny",
            _ if run.state.flag(keys::DEGRADED) => "degraded",
            _ => "allow",
        };
        let tap = (!dry_run).then(|| Tap {
            name,
            result,
            event_id,
            attributes: hook_attributes,
            decision: body.clone(),
            timings: run.timings,
            total_us,
            trace: trace.clone(),
        });
        Ok(Decided {
            reply: (trace, body),
            undo,
            tap,
        })
    }
}

/// Sets `key` in an attributes map. A payload that is not a map has no attributes to keep:
/// it becomes a map of this one key.
fn set_attribute(attributes: &mut Value, key: &str, value: &str) {
    let Value::Map(map) = attributes else {
        *attributes = Value::Map(vec![(key.into(), value.into())]);
        return;
    };
    match map.iter_mut().find(|(k, _)| k.as_str() == Some(key)) {
        Some((_, v)) => *v = value.into(),
        None => map.push((key.into(), value.into())),
    }
}

/// The attributes as the agents get them: with the candidate lists (`dst_peers`, `peers`,
/// `services`) emptied, since the agents read the current candidates from the state, and a
/// list that travelled twice (in the payload and, base64, in `Policy-State`) would halve the
/// candidates an event can carry. The lists stay, empty, so a typed decode still finds them.
/// `None` when there is nothing to empty.
fn agents_copy(attributes: &Value) -> Option<Value> {
    let Value::Map(map) = attributes else {
        return None;
    };
    let is_candidates = |k: &Value, v: &Value| {
        k.as_str()
            .is_some_and(|k| bus::attrs::CANDIDATES.contains(&k))
            && matches!(v, Value::Array(items) if !items.is_empty())
    };
    if !map.iter().any(|(k, v)| is_candidates(k, v)) {
        return None;
    }
    Some(Value::Map(
        map.iter()
            .map(|(k, v)| {
                if is_candidates(k, v) {
                    (k.clone(), Value::Array(Vec::new()))
                } else {
                    (k.clone(), v.clone())
                }
            })
            .collect(),
    ))
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Timeout => "no answer in time",
        Outcome::NoResponders => "no live instance",
        Outcome::Error => "it answered with an error",
        Outcome::Answered | Outcome::Observed => "answered",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: Vec<(&str, Value)>) -> Value {
        Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    #[test]
    fn agents_get_the_attributes_without_the_candidates() {
        let peers = Value::Array(vec!["p1".into(), "p2".into()]);
        let a = map(vec![("dst_service", "db".into()), ("dst_peers", peers)]);
        let copy = agents_copy(&a).expect("candidates to empty");
        assert_eq!(
            copy,
            map(vec![
                ("dst_service", "db".into()),
                ("dst_peers", Value::Array(vec![]))
            ])
        );
        // Nothing to empty: the payload is sent as it came.
        assert_eq!(agents_copy(&copy), None);
        assert_eq!(agents_copy(&Value::Nil), None);
    }

    #[test]
    fn a_connection_id_is_added_or_replaced() {
        let mut a = map(vec![("src_service", "web".into())]);
        set_attribute(&mut a, keys::CONNECTION_ID, "c1");
        set_attribute(&mut a, keys::CONNECTION_ID, "c2");
        assert_eq!(
            a,
            map(vec![
                ("src_service", "web".into()),
                ("connection_id", "c2".into())
            ])
        );
    }
}
