//! Connection limiter: at most `max_connections` live connections per policy, exactly, across
//! every instance.
//!
//! A policy's limit is a fixed set of *slots*, keys `slot.<policy>.<n>` for `n` below the
//! limit, in the bucket `<prefix>_conns`. Admitting a connection is creating a free slot's key,
//! which JetStream does for one writer only, so no two instances can take the same slot and
//! the count can never pass the limit. A slot's value is its holder, `<connection>#<nonce>`.
//! Each instance watches the bucket to know which slots look free and who holds them (a
//! restarted or added instance loads them first), so any instance can release a connection's
//! slots; the view is only a hint, the create decides.
//!
//! A slot's holder is `<connection>#<run id>`, the dispatcher's run of the event, which every
//! hedged copy of one agent call shares. Slots are released on `connection-closed` (every slot
//! of the connection, once this instance's view has caught up with the bucket); on a final
//! deny after conn-limit answered or failed, by the dispatcher's `_undo` request, a
//! request/reply rather than the at-most-once tap (every slot of that run, a hedged
//! duplicate's too; an admission of an undone holder still under way here gives its slots back
//! as it ends); and by the lease: the bucket's
//! `max_age`, so JetStream itself drops a slot whose close never came (`--lease`, default 1 h;
//! a connection that lives longer than the lease stops counting).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bus::config::{self, Change, Update};
use bus::event::{Event, NewConnection};
use bus::state::keys;
use bus::{Effect, Reason, State, Value};
use serde::Deserialize;

use super::conn_slots::{slot_key, Slots};
use super::conn_view::{SlotRef, Taken};
use super::limit_match::{key_token, LimitMatch};
use crate::kind::{self, AgentKind, Attach, AttachError, Stored};

pub const NAME: &str = "conn-limit";
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3600);
/// ClusterLink's periodic report on a live connection.
const CONNECTION_STATUS: &str = "connection-status";

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
        let token = key_token(conn);
        // The dispatcher's run, not a random nonce: a hedged copy of this request, answered by
        // another instance, holds its slot under the same holder, and is freed with it.
        let run = run_of(state).unwrap_or_else(bus::event::new_id);
        let holder = holder(&token, &run);
        let mut taken: Vec<SlotRef> = Vec::new();
        let mut reasons = Vec::new();
        for c in &matched {
            let refused = match slots.take(&c.id, c.max, &holder).await {
                Ok(Taken::Slot(b)) => {
                    taken.push(SlotRef {
                        key: slot_key(&c.id, b),
                        holder: holder.clone(),
                    });
                    let used = slots.view().in_use(&c.id);
                    reasons.push(
                        Reason::new(NAME, &c.id, Effect::Allow)
                            .with_detail(format!("{used} of {} in use", c.max)),
                    );
                    None
                }
                Ok(Taken::Full) => Some(format!("limit of {} live connections reached", c.max)),
                Ok(Taken::Released) => {
                    Some("the connection was closed, or its event denied, while this copy of its admission was under way".into())
                }
                Err(why) => Some(format!("slot store unavailable, failing closed: {why}")),
            };
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
                    view.clear_slots();
                    // Each block at its own revision, so a release writes it with no read
                    // first. A `_gone` marker too: any admission of its connection written
                    // after it gives back.
                    for (key, value) in &snap.values {
                        let revision = snap.revisions.get(key).copied().unwrap_or(snap.revision);
                        view.apply_at(key, Some(value), revision);
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
                            } => view.apply_at(key, Some(value), *revision),
                            Change::Delete { key, revision } => view.apply_at(key, None, *revision),
                        }
                    }
                    changes.iter().map(Change::revision).max().unwrap_or(0)
                }
            }
        };
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
        kind::check_identity(NAME, &p.agent, &p.id)
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
        match event {
            Event::NewConnection(e) => Ok(self.new_connection(rules, e, state).await),
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
            Event::Other { name, attributes } if name.as_str() == CONNECTION_STATUS => {
                let (Some(slots), Some(conn)) = (
                    &self.slots,
                    attributes.get(keys::CONNECTION_ID).and_then(Value::as_str),
                ) else {
                    return Ok(State::new());
                };
                let token = key_token(conn);
                match attributes.get("state").and_then(Value::as_str) {
                    Some("open") => {
                        slots.renew_connection(&token).await;
                    }
                    Some("closed" | "failed") => slots
                        .release_connection(&token, false)
                        .await
                        .map_err(|e| format!("the connection's slots may not all be freed: {e}"))?,
                    _ => {}
                }
                Ok(State::new())
            }
            _ => Ok(State::new()),
        }
    }

    /// The event was denied after this kind answered (or failed) on it: its slots, taken
    /// under `<connection>#<run>`, go back.
    async fn undo<'a>(&'a self, decision: &'a State) {
        let (Some(slots), Some(conn), Some(run)) = (
            &self.slots,
            decision.get_str(keys::CONNECTION_ID),
            run_of(decision),
        ) else {
            return;
        };
        slots.undo(&holder(&key_token(conn), &run)).await;
    }

    async fn attach(&mut self, ctx: Attach<'_>) -> Result<(), AttachError> {
        let store = ctx
            .state_bucket(
                ctx.subjects.conn_bucket(),
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
