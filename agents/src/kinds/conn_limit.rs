//! Connection limiter: at most `max_connections` live connections per policy, exactly, across
//! every instance.
//!
//! A policy's limit is a fixed set of *slots*, keys `slot.<policy>.<n>` for `n` below the
//! limit, in the bucket `<prefix>_conns`. Admitting a connection is creating a free slot's key,
//! which JetStream does for one writer only, so no two instances can take the same slot and
//! the count can never pass the limit. Each instance watches the bucket to know which slots
//! look free (a restarted or added instance loads them first), and a slot it sees as taken is
//! only ever a reason to try another. `conn.<connection>` records the slots of a connection so
//! any instance can release them on `connection-closed`.
//!
//! Slots are released on `connection-closed`, on a final deny by a later agent (read from the
//! tap by one instance of the queue group), and by the lease: the bucket's `max_age`, so
//! JetStream itself drops a slot whose close never came (`--lease`, default 1 h; a connection
//! that lives longer than the lease stops counting).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bus::event::{Event, NewConnection};
use bus::state::keys;
use bus::{Effect, Reason, State};
use serde::Deserialize;

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

/// What this instance knows of the slots: who holds each, since when it has seen it.
#[derive(Default)]
pub(crate) struct View {
    /// policy id -> slot number -> (connection token, first seen here)
    slots: HashMap<String, HashMap<u32, (String, Instant)>>,
}

impl View {
    pub(crate) fn apply(&mut self, key: &str, holder: Option<String>) {
        let Some((policy, n)) = parse_slot(key) else {
            return;
        };
        match holder {
            Some(h) => {
                self.slots
                    .entry(policy.to_string())
                    .or_default()
                    .insert(n, (h, Instant::now()));
            }
            None => {
                if let Some(m) = self.slots.get_mut(policy) {
                    m.remove(&n);
                }
            }
        }
    }

    /// A slot to try: free here, starting from `start` so instances spread out; else the one
    /// seen longest ago (the lease may have dropped it on the server).
    pub(crate) fn candidate(
        &self,
        policy: &str,
        max: u32,
        start: u32,
        tried: &[u32],
    ) -> Option<(u32, bool)> {
        let taken = self.slots.get(policy);
        for i in 0..max {
            let n = (start + i) % max;
            if !tried.contains(&n) && !taken.is_some_and(|t| t.contains_key(&n)) {
                return Some((n, true));
            }
        }
        taken?
            .iter()
            .filter(|(n, _)| **n < max && !tried.contains(n))
            .min_by_key(|(_, (_, seen))| *seen)
            .map(|(n, _)| (*n, false))
    }

    fn is_free(&self, policy: &str, n: u32) -> bool {
        !self.slots.get(policy).is_some_and(|m| m.contains_key(&n))
    }

    pub(crate) fn in_use(&self, policy: &str, max: u32) -> usize {
        self.slots
            .get(policy)
            .map_or(0, |m| m.keys().filter(|n| **n < max).count())
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

fn conn_key(token: &str) -> String {
    format!("conn.{token}")
}

/// The shared slot store and this instance's view of it.
pub(crate) struct Slots {
    store: kv::Store,
    pub(crate) view: Mutex<View>,
}

impl Slots {
    pub(crate) fn store_handle(&self) -> kv::Store {
        self.store.clone()
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one slot of `c` for `token`: `Ok(Some(slot))`, `Ok(None)` when all are taken.
    async fn take(&self, c: &Compiled, token: &str) -> Result<Option<u32>, String> {
        let start = (fnv(token) % u64::from(c.max)) as u32;
        let mut tried = Vec::new();
        loop {
            let Some((n, free)) = self.view().candidate(&c.id, c.max, start, &tried) else {
                return Ok(None);
            };
            if !free && tried.iter().any(|t| !self.view().is_free(&c.id, *t)) {
                // One look at the longest-held slot (the lease may have dropped it) is enough.
                return Ok(None);
            }
            tried.push(n);
            let key = slot_key(&c.id, n);
            match self
                .store
                .create(&key, bytes::Bytes::copy_from_slice(token.as_bytes()))
                .await
            {
                Ok(_) => {
                    self.view().apply(&key, Some(token.to_string()));
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    self.view().apply(&key, Some(String::new()));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    async fn record(&self, token: &str, taken: &[String]) {
        let value = rmp_serde::to_vec(taken).unwrap_or_default();
        if let Err(err) = self.store.put(conn_key(token), value.into()).await {
            tracing::warn!(error = %err, "could not record the connection's slots; the lease will free them");
        }
    }

    /// Frees the slots of a connection, wherever they were taken. A slot is deleted only if it
    /// still holds this connection (after a lease it may belong to another one).
    pub(crate) async fn release(&self, token: &str) {
        let keys: Vec<String> = match self.store.get(conn_key(token)).await {
            Ok(Some(v)) => rmp_serde::from_slice(&v).unwrap_or_default(),
            _ => self
                .view()
                .slots
                .iter()
                .flat_map(|(p, m)| {
                    m.iter()
                        .filter(|(_, (h, _))| h == token)
                        .map(move |(n, _)| slot_key(p, *n))
                })
                .collect(),
        };
        for key in keys {
            if let Ok(Some(e)) = self.store.entry(&key).await {
                if e.operation == kv::Operation::Put && e.value.as_ref() == token.as_bytes() {
                    match self
                        .store
                        .delete_expect_revision(&key, Some(e.revision))
                        .await
                    {
                        Ok(()) => self.view().apply(&key, None),
                        Err(err) => {
                            tracing::debug!(%key, error = %err, "slot changed before release")
                        }
                    }
                }
            }
        }
        let _ = self.store.delete(conn_key(token)).await;
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
        let mut taken: Vec<String> = Vec::new();
        let mut reasons = Vec::new();
        for c in &matched {
            let outcome = slots.take(c, &token).await;
            let refused = match outcome {
                Ok(Some(n)) => {
                    taken.push(slot_key(&c.id, n));
                    let used = slots.view().in_use(&c.id, c.max);
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
                if !taken.is_empty() {
                    slots.record(&token, &taken).await;
                    slots.release(&token).await;
                }
                return deny(c, detail);
            }
        }
        slots.record(&token, &taken).await;
        let mut patch = State::new();
        patch.insert(keys::REASONS, kind::reasons(reasons));
        patch
    }
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
        if p.agent != NAME {
            return Err(format!(
                "field `agent`: expected {NAME:?}, got {:?}",
                p.agent
            ));
        }
        bus::admin::check_policy_id(&p.id).map_err(|e| format!("field `id`: {e}"))
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

    fn decide(&self, _rules: &Vec<Compiled>, _event: &Event, _state: &State) -> State {
        State::new()
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
                    slots.release(&key_token(&e.connection_id)).await;
                }
                State::new()
            }
            _ => State::new(),
        }
    }

    async fn attach(&mut self, ctx: Attach<'_>) -> Result<(), AttachError> {
        let config = kv::Config {
            bucket: ctx.subjects.conn_bucket(),
            description: "policy-bus connection limiter slots".into(),
            history: 1,
            max_age: self.lease,
            num_replicas: ctx.kv_replicas.max(1),
            ..Default::default()
        };
        let store = bus::config::open_bucket(ctx.nats, config).await?;
        let actual = store.status().await?.max_age();
        if actual != self.lease {
            tracing::warn!(bucket = %ctx.subjects.conn_bucket(), lease = ?self.lease, bucket_max_age = ?actual,
                "the slot bucket already exists with another lease; using the bucket's");
            self.lease = actual;
        }
        let slots = Arc::new(Slots {
            store,
            view: Mutex::new(View::default()),
        });
        self.slots = Some(slots.clone());
        super::conn_limit_tasks::start(ctx, slots).await
    }
}
