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
//! A slot's holder is `<connection>#<event id>`. Slots are released on `connection-closed`
//! (every slot of the connection); on a final deny after conn-limit answered or failed, by the
//! dispatcher's `_undo` request, a request/reply rather than the at-most-once tap (every slot
//! of that connection and event, a hedged duplicate's too; an admission of an undone holder
//! still under way here gives its slots back as it ends); and by the lease: the bucket's
//! `max_age`, so JetStream itself drops a slot whose close never came (`--lease`, default 1 h;
//! a connection that lives longer than the lease stops counting).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bus::config::{self, Change, Update};
use bus::event::{Event, NewConnection};
use bus::state::keys;
use bus::{Effect, Reason, State, Value};
use serde::Deserialize;

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

/// A slot as this instance knows it: who holds it (`<connection>#<nonce>`, empty when only
/// a failed create told us it is taken) and since when this instance has seen it held.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    holder: String,
    seen: Instant,
}

/// What this instance knows of the slots. Only a hint: the atomic create decides.
#[derive(Default)]
pub(crate) struct View {
    /// policy id -> slot number -> holder
    slots: HashMap<String, HashMap<u32, Held>>,
}

impl View {
    pub(crate) fn apply(&mut self, key: &str, holder: Option<String>) {
        let Some((policy, n)) = parse_slot(key) else {
            return;
        };
        match holder {
            Some(h) => {
                let slots = self.slots.entry(policy.to_string()).or_default();
                // A failed create says "taken" but not by whom: keep a known holder.
                if h.is_empty() && slots.contains_key(&n) {
                    return;
                }
                slots.insert(
                    n,
                    Held {
                        holder: h,
                        seen: Instant::now(),
                    },
                );
            }
            None => {
                if let Some(m) = self.slots.get_mut(policy) {
                    m.remove(&n);
                }
            }
        }
    }

    /// A failed create: the slot is held (by whom the watch will say), seen held from now on so
    /// it is not probed again before a lease.
    fn mark_taken(&mut self, key: &str) {
        let Some((policy, n)) = parse_slot(key) else {
            return;
        };
        let held = self
            .slots
            .entry(policy.to_string())
            .or_default()
            .entry(n)
            .or_insert(Held {
                holder: String::new(),
                seen: Instant::now(),
            });
        held.seen = Instant::now();
    }

    /// A slot below `max` that looks free, starting from `start` so instances spread out.
    fn free_slot(&self, policy: &str, max: u32, start: u32, tried: &[u32]) -> Option<u32> {
        let taken = self.slots.get(policy);
        (0..max)
            .map(|i| (start + i) % max)
            .find(|n| !tried.contains(n) && !taken.is_some_and(|t| t.contains_key(n)))
    }

    /// The slot held longest, if it has been held past the lease (JetStream may have dropped
    /// it: the watch does not report expiries).
    fn expired_slot(&self, policy: &str, max: u32, lease: Duration) -> Option<u32> {
        self.slots
            .get(policy)?
            .iter()
            .filter(|(n, h)| **n < max && h.seen.elapsed() >= lease)
            .min_by_key(|(_, h)| h.seen)
            .map(|(n, _)| *n)
    }

    /// Slots of the policy this instance knows to be held, above the limit too (after the
    /// limit was lowered they still count).
    pub(crate) fn in_use(&self, policy: &str) -> usize {
        self.slots.get(policy).map_or(0, HashMap::len)
    }

    /// The slot of `policy` that `holder` holds, if this instance has seen it.
    fn slot_of(&self, policy: &str, holder: &str) -> Option<u32> {
        self.slots
            .get(policy)?
            .iter()
            .find(|(_, h)| h.holder == holder)
            .map(|(n, _)| *n)
    }

    /// The slots held by exactly `holder`.
    fn held_as(&self, holder: &str) -> Vec<(String, String)> {
        self.slots
            .iter()
            .flat_map(|(p, m)| {
                m.iter()
                    .filter(|(_, h)| h.holder == holder)
                    .map(move |(n, h)| (slot_key(p, *n), h.holder.clone()))
            })
            .collect()
    }

    /// The slots a connection holds, by its token.
    fn held_by(&self, token: &str) -> Vec<(String, String)> {
        let prefix = format!("{token}#");
        self.slots
            .iter()
            .flat_map(|(p, m)| {
                m.iter()
                    .filter(|(_, h)| h.holder.starts_with(&prefix))
                    .map(move |(n, h)| (slot_key(p, *n), h.holder.clone()))
            })
            .collect()
    }
}

fn slot_key(policy: &str, n: u32) -> String {
    format!("slot.{policy}.{n}")
}

fn parse_slot(key: &str) -> Option<(&str, u32)> {
    let rest = key.strip_prefix("slot.")?;
    let (policy, n) = rest.rsplit_once('.')?;
    Some((policy, n.parse().ok()?))
}

/// The state key where an admission records its slots and holder: what it took, in the
/// decision, for the gateway and the monitor to see.
pub(crate) const STATE_KEY: &str = "conn_limit";
/// Create attempts for one admission before it is denied as contended.
const ATTEMPTS: usize = 8;

/// The shared slot store and this instance's view of it.
pub(crate) struct Slots {
    pub(crate) store: kv::Store,
    lease: Duration,
    pub(crate) view: Mutex<View>,
    /// Holders whose event was denied in the end, with when this instance heard: an admission
    /// of theirs still in progress here (a late or duplicate request) gives its slots back.
    undone: Mutex<HashMap<String, Instant>>,
}

/// How long an undone holder is remembered: longer than any subscription timeout.
const UNDONE_FOR: Duration = Duration::from_secs(120);

impl Slots {
    pub(crate) fn new(store: kv::Store, lease: Duration) -> Self {
        Slots {
            store,
            lease,
            view: Mutex::new(View::default()),
            undone: Mutex::new(HashMap::new()),
        }
    }

    /// Gives back every slot `holder` holds that this instance knows of, and remembers the
    /// holder so that an admission of it still in progress here gives its slots back too.
    pub(crate) async fn undo(&self, holder: &str) {
        {
            let mut undone = self.undone.lock().unwrap_or_else(|e| e.into_inner());
            undone.retain(|_, at| at.elapsed() < UNDONE_FOR);
            undone.insert(holder.to_string(), Instant::now());
        }
        let held = self.view().held_as(holder);
        self.release_exact(&held).await;
    }

    fn is_undone(&self, holder: &str) -> bool {
        self.undone
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(holder)
    }

    pub(crate) fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one slot of `c` for `holder`: `Ok(Some(slot))`, `Ok(None)` when all are taken.
    async fn take(&self, c: &Compiled, holder: &str, start: u32) -> Result<Option<u32>, String> {
        // The same request twice (a hedge) on this instance: the same slot.
        if let Some(n) = self.view().slot_of(&c.id, holder) {
            return Ok(Some(n));
        }
        let mut tried = Vec::new();
        for _ in 0..ATTEMPTS {
            let next = {
                let view = self.view();
                if view.in_use(&c.id) >= c.max as usize {
                    view.expired_slot(&c.id, c.max, self.lease)
                        .filter(|n| !tried.contains(n))
                } else {
                    view.free_slot(&c.id, c.max, start, &tried).or_else(|| {
                        view.expired_slot(&c.id, c.max, self.lease)
                            .filter(|n| !tried.contains(n))
                    })
                }
            };
            let Some(n) = next else { return Ok(None) };
            tried.push(n);
            let key = slot_key(&c.id, n);
            match self
                .store
                .create(&key, bytes::Bytes::copy_from_slice(holder.as_bytes()))
                .await
            {
                Ok(_) => {
                    self.view().apply(&key, Some(holder.to_string()));
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    self.view().mark_taken(&key)
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(None)
    }

    /// Frees the given slots if they still hold `holder` (after a lease a slot may belong to
    /// another connection, and a reused connection id to another admission).
    pub(crate) async fn release_exact(&self, slots: &[(String, String)]) {
        for (key, holder) in slots {
            let Ok(Some(e)) = self.store.entry(key).await else {
                continue;
            };
            if e.operation == kv::Operation::Put && e.value.as_ref() == holder.as_bytes() {
                match self
                    .store
                    .delete_expect_revision(key, Some(e.revision))
                    .await
                {
                    Ok(()) => self.view().apply(key, None),
                    Err(err) => tracing::debug!(%key, error = %err, "slot changed before release"),
                }
            }
        }
    }

    /// Renews every slot a connection holds: writing the same holder again restarts the
    /// bucket's `max_age`, so a connection that reports itself open outlives the lease. A
    /// failed renewal (the slot changed, the bucket is away) is left to the next report.
    pub(crate) async fn renew_connection(&self, token: &str) -> usize {
        let held = self.view().held_by(token);
        let mut renewed = 0;
        for (key, holder) in held {
            let Ok(Some(e)) = self.store.entry(&key).await else {
                continue;
            };
            if e.operation != kv::Operation::Put || e.value.as_ref() != holder.as_bytes() {
                continue;
            }
            match self.store.update(&key, e.value.clone(), e.revision).await {
                Ok(_) => renewed += 1,
                Err(err) => tracing::debug!(%key, error = %err, "slot changed before renewal"),
            }
        }
        renewed
    }

    /// Frees every slot a connection holds, wherever it was admitted. A close can reach this
    /// instance before its watch has seen the admission, so when the view knows no slot of the
    /// connection it looks again a moment later, in the background: most connections match no
    /// limit, and their close must not wait.
    pub(crate) async fn release_connection(self: &Arc<Self>, token: &str) {
        let held = self.view().held_by(token);
        if !held.is_empty() {
            self.release_exact(&held).await;
            return;
        }
        let (slots, token) = (self.clone(), token.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let held = slots.view().held_by(&token);
            slots.release_exact(&held).await;
        });
    }
}

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
        // The event id, not a random nonce: a hedged duplicate of this request, answered by
        // another instance, holds its slot under the same holder, and is freed with it.
        let event = state
            .get_str(keys::EVENT_ID)
            .map(key_token)
            .unwrap_or_else(bus::event::new_id);
        let holder = holder(&token, &event);
        let start = (fnv(&holder) % u64::from(u32::MAX)) as u32;
        let mut taken: Vec<(String, String)> = Vec::new();
        let mut reasons = Vec::new();
        for c in &matched {
            let refused = match slots.take(c, &holder, start % c.max).await {
                Ok(Some(n)) => {
                    taken.push((slot_key(&c.id, n), holder.clone()));
                    let used = slots.view().in_use(&c.id);
                    reasons.push(
                        Reason::new(NAME, &c.id, Effect::Allow)
                            .with_detail(format!("{used} of {} in use", c.max)),
                    );
                    None
                }
                Ok(None) => Some(format!("limit of {} live connections reached", c.max)),
                Err(why) => Some(format!("slot store unavailable, failing closed: {why}")),
            };
            if let Some(detail) = refused {
                slots.release_exact(&taken).await;
                return deny(c, detail);
            }
        }
        if slots.is_undone(&holder) {
            // The event was denied while this (late or duplicate) admission was under way.
            slots.release_exact(&taken).await;
            return deny(matched[0], "the event was already denied".into());
        }
        let mut patch = State::new();
        let slot_list = Value::Array(taken.iter().map(|(k, _)| Value::from(k.as_str())).collect());
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
        let mut view = watched.view();
        match update {
            Update::Loaded(snap) => {
                *view = View::default();
                for (key, value) in &snap.values {
                    view.apply(key, Some(String::from_utf8_lossy(value).into_owned()));
                }
            }
            Update::Changed(changes) => {
                for change in changes {
                    match change {
                        Change::Put { key, value, .. } => {
                            view.apply(key, Some(String::from_utf8_lossy(value).into_owned()))
                        }
                        Change::Delete { key, .. } => view.apply(key, None),
                    }
                }
            }
        }
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

/// The holder of a connection's slots for one event: `<connection>#<event>`, as key tokens.
fn holder(connection: &str, event: &str) -> String {
    format!("{connection}#{event}")
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl AgentKind for ConnLimiter {
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
    ) -> State {
        match event {
            Event::NewConnection(e) => self.new_connection(rules, e, state).await,
            Event::ConnectionClosed(e) => {
                if let Some(slots) = &self.slots {
                    slots.release_connection(&key_token(&e.connection_id)).await;
                }
                State::new()
            }
            // ClusterLink's connection status: `open` renews the lease of the connection's
            // slots, `closed` and `failed` release them as a close does.
            Event::Other { name, attributes } if name.as_str() == CONNECTION_STATUS => {
                let (Some(slots), Some(conn)) = (
                    &self.slots,
                    attributes.get(keys::CONNECTION_ID).and_then(Value::as_str),
                ) else {
                    return State::new();
                };
                let token = key_token(conn);
                match attributes.get("state").and_then(Value::as_str) {
                    Some("open") => {
                        slots.renew_connection(&token).await;
                    }
                    Some("closed" | "failed") => slots.release_connection(&token).await,
                    _ => {}
                }
                State::new()
            }
            _ => State::new(),
        }
    }

    /// The event was denied after this kind answered (or failed) on it: its slots, taken
    /// under `<connection>#<event>`, go back.
    async fn undo<'a>(&'a self, decision: &'a State) {
        let (Some(slots), Some(conn), Some(event)) = (
            &self.slots,
            decision.get_str(keys::CONNECTION_ID),
            decision.get_str(keys::EVENT_ID),
        ) else {
            return;
        };
        slots
            .undo(&holder(&key_token(conn), &key_token(event)))
            .await;
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
