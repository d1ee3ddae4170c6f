//! Connection limiter: at most `max_connections` live connections per policy, exactly, across
//! every instance.
//!
//! A policy's slots are grouped in blocks of 16, keys `slot.<policy>.<b>` of the bucket
//! `<prefix>_conns`, each holding one line per holder (see [`super::conn_block`]). Admitting
//! is a compare-and-set of a block, so no block ever holds more than its share of the limit,
//! whoever writes it; each instance batches the admissions waiting at that moment into one
//! write (see [`super::conn_admit`]). Each instance watches the bucket to know the holders
//! (a restarted or added instance loads them first), so any instance can release any slot;
//! the view is a hint, the compare-and-set decides.
//!
//! A holder is `<connection>#<run>/<copy>`: the dispatcher's run of the event, which every
//! hedged copy of one agent call shares, and the copy. Slots are released on
//! `connection-closed` or a `connection-status` that says closed (every slot of the
//! connection, once this instance's view has caught up with the bucket); on a final deny after
//! conn-limit answered or failed, by the dispatcher's `_undo` request (every slot of the run,
//! a copy still under way anywhere too: see [`Slots::undo`]); and by the lease (`--lease`,
//! default 1 h), each holder's admission or last renewal time, so a holder whose close never
//! came stops counting.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bus::config::{self, Change, Update};
use bus::decision::failure;
use bus::event::{ConnectionState, Event, NewConnection};
use bus::state::{field_str, keys};
use bus::{Effect, Reason, State, Value};
use serde::Deserialize;

use super::conn_slots::{slot_key, Called, Slots};
use super::conn_view::{run_of as view_run_of, SlotRef, Taken};
use super::limit_match::{key_token, LimitMatch};
use crate::kind::{self, AgentKind, Attach, AttachError, Stored};

pub const NAME: &str = "conn-limit";
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnLimitPolicy {
    pub agent: String,
    pub id: String,
    #[serde(default, rename = "match")]
    pub matcher: LimitMatch,
    pub max_connections: NonZeroU32,
}

pub struct Compiled {
    id: String,
    matcher: LimitMatch,
    max: u32,
}

/// The state key where an admission records its slots and holder: what it took, in the
/// decision, for the gateway and the monitor to see.
pub(crate) const STATE_KEY: &str = "conn_limit";

pub struct ConnLimiter {
    pub lease: Duration,
    slots: Option<Arc<Slots>>,
}

impl ConnLimiter {
    pub fn new(lease: Duration) -> Self {
        ConnLimiter { lease, slots: None }
    }

    async fn new_connection(&self, rules: &[Compiled], e: &NewConnection, state: &State) -> State {
        let target = state.get_str(keys::TARGET_PEER);
        let matched: Vec<&Compiled> = rules
            .iter()
            .filter(|c| c.matcher.matches(e, target))
            .collect();
        if matched.is_empty() {
            return State::new();
        }
        let deny = |c: &Compiled, detail: String| {
            kind::deny(Reason::new(NAME, &c.id, Effect::Deny).with_detail(detail))
        };
        let (Some(slots), Some(conn)) = (&self.slots, e.connection_id.as_deref()) else {
            return deny(
                matched[0],
                "no connection_id or no slot store: cannot count".into(),
            );
        };
        if state.flag(keys::DRY_RUN) {
            return dry_run(slots, &matched);
        }
        let token = key_token(conn);
        // The dispatcher's run, which every copy of this request shares (an undo names it),
        // and this copy: a refused copy gives back only what it took itself.
        let run = holder(&token, &run_of(state).unwrap_or_else(bus::event::new_id));
        let holder = format!("{run}/{:08x}", rand::random::<u32>());
        let mut taken: Vec<SlotRef> = Vec::new();
        let mut reasons = Vec::new();
        for c in &matched {
            // Under one policy, a copy of a run another copy already took a slot for (a hedge)
            // shares it: hedges cost no capacity. Not under several (see `Slots::shared`).
            let shared = match matched.len() {
                1 => slots.shared(&c.id, &run).await,
                _ => None,
            };
            let refused = match shared {
                Some(slot) => {
                    taken.push(slot);
                    None
                }
                None => match slots.take(&c.id, c.max, &holder, matched.len() == 1).await {
                    Ok(Taken::Slot(b)) => {
                        taken.push(SlotRef {
                            key: slot_key(&c.id, b),
                            holder: holder.clone(),
                        });
                        None
                    }
                    Ok(Taken::Shared(slot)) => {
                        taken.push(slot);
                        None
                    }
                    Ok(Taken::Full) => Some(format!("limit of {} live connections reached", c.max)),
                    Ok(Taken::Released) => Some("the connection was closed, or its event denied, while this copy of its admission was under way".into()),
                    Err(why) => Some(format!("slot store unavailable, failing closed: {why}")),
                },
            };
            if refused.is_none() {
                let used = slots.view().in_use(&c.id);
                reasons.push(
                    Reason::new(NAME, &c.id, Effect::Allow)
                        .with_detail(format!("{used} of {} in use", c.max)),
                );
            }
            if let Some(detail) = refused {
                if let Err(e) = slots.release_exact(&taken).await {
                    tracing::debug!(%holder, error = %e, "could not give back the slots of a refused admission yet");
                    slots.give_back(taken.clone());
                }
                return deny(c, detail);
            }
        }
        if slots.is_undone(&holder) {
            // The event was denied while this (late or duplicate) admission was under way.
            if let Err(e) = slots.release_exact(&taken).await {
                tracing::debug!(%holder, error = %e, "could not give back the slots of an undone admission yet");
                slots.give_back(taken.clone());
            }
            return deny(matched[0], "the event was already denied".into());
        }
        // The holder in the bucket: a shared slot's is the copy that took it.
        let holder = taken.first().map_or(holder, |s| s.holder.clone());
        let mut patch = State::new();
        let slot_list = Value::Array(taken.iter().map(|s| Value::from(s.key.as_str())).collect());
        patch.insert(
            STATE_KEY,
            Value::Map(vec![
                (Value::from("holder"), Value::from(holder.as_str())),
                (Value::from("slots"), slot_list),
            ]),
        );
        patch.insert(keys::REASONS, kind::reasons(reasons));
        patch
    }
}

/// What an admission would come to, from this instance's view, taking nothing: a dry run.
fn dry_run(slots: &Slots, matched: &[&Compiled]) -> State {
    let lease_ms = slots.lease.as_millis() as u64;
    let now = super::conn_block::now_ms();
    let mut reasons = Vec::new();
    for c in matched {
        let used = slots.view().live_in_use(&c.id, now, lease_ms);
        if used >= c.max as usize {
            return kind::deny(Reason::new(NAME, &c.id, Effect::Deny).with_detail(format!(
                "dry run: limit of {} live connections reached",
                c.max
            )));
        }
        reasons.push(Reason::new(NAME, &c.id, Effect::Allow).with_detail(format!(
            "dry run: would take a slot ({used} of {} in use)",
            c.max
        )));
    }
    let mut patch = State::new();
    patch.insert(keys::REASONS, kind::reasons(reasons));
    patch
}

/// Keeps this instance's view of the slots in step with the bucket, loading them before the
/// first request so a new instance knows the live connections. Changes are applied one by one:
/// a rebuild would forget how long each slot was held.
async fn watch_slots(slots: Arc<Slots>) -> Result<(), AttachError> {
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let watched = slots.clone();
    let on = move |update: Update<'_>| {
        let revision = {
            let mut view = watched.view();
            match update {
                Update::Loaded(snap) => {
                    // Each block at its own revision, so a release writes it with no read
                    // first. A `_gone` marker too: any admission of its connection written
                    // after it gives back.
                    let known = view.block_keys();
                    for (key, value) in &snap.values {
                        let revision = snap.revisions.get(key).copied().unwrap_or(snap.revision);
                        view.apply_at(key, Some(value), revision);
                    }
                    // A (re)load, not a rebuild: a block gone while the watch was away is a
                    // delete, so its holders' releases are recorded as the changes would have.
                    for key in known.iter().filter(|k| !snap.values.contains_key(*k)) {
                        view.apply_at(key, None, snap.revision);
                    }
                    snap.revision
                }
                Update::Changed(changes) => {
                    for change in changes {
                        match change {
                            Change::Put {
                                key,
                                value,
                                revision,
                            } => view.apply_change(key, Some(value), *revision),
                            Change::Delete { key, revision } => {
                                view.apply_change(key, None, *revision)
                            }
                        }
                    }
                    changes.iter().map(Change::revision).max().unwrap_or(0)
                }
            }
        };
        let late = watched.view().take_late();
        watched.give_back_late(late);
        // Told after the view has the changes: a close waiting on it then finds them.
        watched.applied(revision);
    };
    tokio::spawn(config::watch(
        slots.store.clone(),
        "slot.>".into(),
        on,
        Some(ready_tx),
    ));
    ready
        .await
        .map_err(|_| "the slot watch stopped before loading")?;

    Ok(())
}

/// The holder of a connection's slots for one run of an event: `<connection>#<run>`, as key
/// tokens.
fn holder(connection: &str, run: &str) -> String {
    format!("{connection}#{run}")
}

/// What the final decision says of conn-limit's call for `run`: its answer with a slot of the
/// run, a failure the dispatcher recorded, a refusal (of a hedged call: another copy may have
/// admitted), or an answer that took nothing.
fn called(decision: &State, run: &str) -> Called {
    let took = decision
        .get(STATE_KEY)
        .and_then(|c| field_str(c, "holder"))
        .is_some_and(|h| view_run_of(h) == run);
    if took {
        return Called::Took;
    }
    let Some(Value::Array(reasons)) = decision.get(keys::REASONS) else {
        return Called::Nothing;
    };
    let mut called = Called::Nothing;
    for r in reasons {
        let field = |name: &str| field_str(r, name);
        if field("agent") != Some(NAME) {
            continue;
        }
        if field("policy").is_some_and(|p| failure::ALL.contains(&p)) {
            return Called::Failed;
        }
        // The dispatcher undoes a kind that refused only when its call was hedged.
        if field("effect") == Some("deny") {
            called = Called::Refused;
        }
    }
    called
}

/// The dispatcher's run of the event, as a key token (the event id from a dispatcher that
/// sets no run id).
fn run_of(state: &State) -> Option<String> {
    state
        .get_str(keys::RUN_ID)
        .or_else(|| state.get_str(keys::EVENT_ID))
        .map(key_token)
}

impl AgentKind for ConnLimiter {
    const INLINE: bool = false;
    const TAKES: bool = true;

    type Policy = ConnLimitPolicy;
    type Rules = Vec<Compiled>;

    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, p: &ConnLimitPolicy) -> Result<(), String> {
        kind::check_identity(NAME, &p.agent, &p.id)?;
        // Keys under `slot._` are markers (see `conn_view::GONE_PREFIX`), never blocks.
        if p.id.starts_with('_') {
            return Err(format!(
                "conn-limit policy id {:?} starts with `_`, which the slot bucket keeps for its markers: rename it",
                p.id
            ));
        }
        Ok(())
    }

    fn compile(&self, mut policies: Vec<Stored<ConnLimitPolicy>>) -> Vec<Compiled> {
        policies.sort_by(|a, b| a.0.cmp(&b.0));
        policies
            .into_iter()
            .map(|(id, p)| Compiled {
                id,
                matcher: p.matcher,
                max: p.max_connections.get(),
            })
            .collect()
    }

    async fn decide_async<'a>(
        &'a self,
        rules: &'a Vec<Compiled>,
        event: &'a Event,
        state: &'a State,
    ) -> Result<State, String> {
        let dry_run = state.flag(keys::DRY_RUN);
        match event {
            Event::NewConnection(e) => Ok(super::limit_match::hold_target(
                rules.iter().map(|c| &c.matcher),
                state,
                self.new_connection(rules, e, state).await,
            )),
            // A dry run frees nothing.
            _ if dry_run => Ok(State::new()),
            Event::ConnectionClosed(e) => {
                if let Some(slots) = &self.slots {
                    let limited = rules
                        .iter()
                        .any(|c| c.matcher.may_match(&e.src_service, &e.dst_service));
                    slots
                        .release_connection(&key_token(&e.connection_id), limited)
                        .await
                        .map_err(|e| format!("the close's slots may not all be freed: {e}"))?;
                }
                Ok(State::new())
            }
            // ClusterLink's connection status: `open` renews the lease of the connection's
            // slots, `closed` and `failed` release them as a close does.
            Event::ConnectionStatus(status) => {
                let Some(slots) = &self.slots else {
                    return Ok(State::new());
                };
                let token = key_token(&status.connection_id);
                match status.state {
                    ConnectionState::Open => {
                        slots.renew_connection(&token).await;
                    }
                    // No marker when no slot is found (unlike a cancelled connection's close):
                    // a status comes from a connection the gateway opened, so its admission
                    // has taken its slot, and freeing it records the release for any late
                    // copy. A marker per unlimited connection would be a write per close.
                    ConnectionState::Closed | ConnectionState::Failed => slots
                        .release_connection(&token, false)
                        .await
                        .map_err(|e| format!("the connection's slots may not all be freed: {e}"))?,
                }
                Ok(State::new())
            }
            _ => Ok(State::new()),
        }
    }

    /// The event was denied after this kind answered (or failed) on it: its slots, taken
    /// under `<connection>#<run>`, go back.
    async fn undo<'a>(&'a self, decision: &'a State) -> Result<(), String> {
        let (Some(slots), Some(conn), Some(run)) = (
            &self.slots,
            decision.get_str(keys::CONNECTION_ID),
            run_of(decision),
        ) else {
            return Ok(());
        };
        let run = holder(&key_token(conn), &run);
        slots.undo(&run, called(decision, &run)).await
    }

    async fn attach(&mut self, ctx: Attach<'_>) -> Result<(), AttachError> {
        let store = ctx
            .state_bucket(
                bus::store::Store::Conns,
                "policy-bus connection limiter slots",
                self.lease,
            )
            .await?;
        let actual = store.status().await?.max_age();
        if actual != self.lease {
            tracing::warn!(bucket = %ctx.subjects.conn_bucket(), lease = ?self.lease, bucket_max_age = ?actual,
                "the slot bucket already exists with another lease; using the bucket's");
            self.lease = actual;
        }
        let slots = Arc::new(Slots::new(store, self.lease));
        self.slots = Some(slots.clone());
        watch_slots(slots).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(reason: Option<(&str, &str, Effect)>, holder: Option<&str>) -> State {
        let mut d = State::new();
        if let Some((agent, policy, effect)) = reason {
            let r = Reason::new(agent, policy, effect).to_value();
            d.insert(keys::REASONS, Value::Array(vec![r]));
        }
        if let Some(h) = holder {
            d.insert(
                STATE_KEY,
                Value::Map(vec![(Value::from("holder"), Value::from(h))]),
            );
        }
        d
    }

    #[test]
    fn a_policy_id_may_not_look_like_a_marker() {
        let limiter = ConnLimiter::new(DEFAULT_LEASE);
        let policy = |id: &str| ConnLimitPolicy {
            agent: NAME.into(),
            id: id.into(),
            matcher: LimitMatch::default(),
            max_connections: NonZeroU32::MIN,
        };
        assert!(limiter.check(&policy("db")).is_ok());
        let refused = limiter
            .check(&policy("_gone"))
            .expect_err("a marker's name");
        assert!(refused.contains("rename"), "{refused}");
    }

    #[test]
    fn an_undo_reads_what_conn_limit_did_from_the_final_decision() {
        let run = "c1#r1";
        let took = decision(
            Some(("rate-limit", "api", Effect::Deny)),
            Some("c1#r1/0badc0de"),
        );
        assert_eq!(called(&took, run), Called::Took);
        let another_run = decision(None, Some("c1#r2/0badc0de"));
        assert_eq!(called(&another_run, run), Called::Nothing);
        for (policy, effect) in [
            (failure::TIMEOUT, Effect::Deny),
            (failure::ERROR, Effect::Skipped),
        ] {
            let d = decision(Some((NAME, policy, effect.clone())), None);
            assert_eq!(called(&d, run), Called::Failed, "{policy} {effect}");
        }
        let refused = decision(Some((NAME, "db", Effect::Deny)), None);
        assert_eq!(called(&refused, run), Called::Refused);
        let other = decision(Some(("rate-limit", failure::TIMEOUT, Effect::Deny)), None);
        assert_eq!(called(&other, run), Called::Nothing, "another kind failed");
    }
}
