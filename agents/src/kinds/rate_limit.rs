//! Rate limiter: limits new connections per key with GCRA, and hands the data plane a
//! per-connection bandwidth cap.
//!
//! Instances share the budget through one key-value entry per limited key (bucket
//! `<prefix>_rates`), holding the GCRA timestamp. An instance admits a connection only by a
//! compare-and-set of that entry from the revision it read, so two instances can never spend
//! the same slot of the budget: the admitted count over any window stays within
//! `rate × window + burst + 1` whatever the number of instances. The only error term is clock
//! skew between the instances' hosts (each uses its own wall clock): at most
//! `rate × skew` extra connections, none on one machine.
//!
//! A connection that matches several rate policies spends from all of them or from none: all
//! are checked before any is written, and a write that loses a race and then finds its policy
//! refusing gives the earlier writes back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use bus::event::{Event, NewConnection};
use bus::state::keys;
use bus::{Effect, Reason, State, Value};
use serde::Deserialize;

use super::limit_match::{key_token, LimitMatch};
use super::rate::{Bandwidth, Gcra, Rate};
use super::rate_keys::KeySet;
use crate::kind::{self, AgentKind, Attach, AttachError, Stored};

pub const NAME: &str = "rate-limit";
/// Entries idle this long are dropped by JetStream; an absent entry is a full budget.
const IDLE_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// Compare-and-set attempts before a contended key fails closed.
const ATTEMPTS: usize = 16;
/// Cached entries before the cache is cleared (it is only a shortcut to the last revision).
const CACHE_MAX: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPolicy {
    pub agent: String,
    pub id: String,
    #[serde(default, rename = "match")]
    pub matcher: LimitMatch,
    pub rate: Option<Rate>,
    #[serde(default)]
    pub burst: u32,
    pub bandwidth: Option<Bandwidth>,
    /// Distinct keys counted apart, per instance (see [`super::rate_keys`]).
    #[serde(default)]
    pub max_keys: Option<std::num::NonZeroU32>,
}

/// Keys a rate policy counts apart unless it says otherwise.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

pub struct Compiled {
    id: String,
    matcher: LimitMatch,
    gcra: Option<(Gcra, Rate, u32)>,
    bandwidth: Option<u64>,
    max_keys: usize,
}

/// Wall-clock nanoseconds: shared by instances on one host, close across NTP-synced hosts.
pub trait Clock: Send + Sync + 'static {
    fn now_ns(&self) -> u64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }
}

/// Lock stripes: requests of one instance for one key take turns, so an instance never loses
/// a compare-and-set to itself; only other instances can make it retry.
const STRIPES: usize = 64;

pub struct RateLimiter {
    store: Option<kv::Store>,
    clock: Box<dyn Clock>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Last (TAT, revision) this instance saw per key, to skip a read before the write.
    cache: Mutex<HashMap<String, (Option<u64>, u64)>>,
    keys: KeySet,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter {
            store: None,
            clock: Box::new(SystemClock),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            cache: Mutex::new(HashMap::new()),
            keys: KeySet::new(IDLE_EXPIRY.as_nanos() as u64),
        }
    }
}

/// Why a connection is not admitted.
enum Refusal {
    /// Over the rate of this policy.
    Over,
    /// The shared state could not be read or written: fail closed.
    Unavailable(String),
}

/// One rate policy a connection must pass: its GCRA on its key.
struct Step<'a> {
    policy: &'a Compiled,
    key: String,
    gcra: Gcra,
}

/// A write that landed: the key, and the revision it left the entry at.
type Committed = (String, u64);

impl RateLimiter {
    fn cached(&self, key: &str) -> Option<(Option<u64>, u64)> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
    }

    fn remember(&self, key: &str, value: Option<(Option<u64>, u64)>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match value {
            Some(v) => {
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                cache.insert(key.to_string(), v);
            }
            None => {
                cache.remove(key);
            }
        }
    }

    async fn read(store: &kv::Store, key: &str) -> Result<(Option<u64>, u64), String> {
        match store.entry(key).await.map_err(|e| e.to_string())? {
            Some(e) if e.operation == kv::Operation::Put => {
                let tat = <[u8; 8]>::try_from(e.value.as_ref())
                    .ok()
                    .map(u64::from_be_bytes);
                Ok((tat, e.revision))
            }
            Some(e) => Ok((None, e.revision)),
            None => Ok((None, 0)),
        }
    }

    /// The entry as this instance last saw it, or as stored. A stale cached entry is caught by
    /// the compare-and-set; a stale deny errs on the strict side.
    async fn current(&self, store: &kv::Store, key: &str) -> Result<(Option<u64>, u64), String> {
        match self.cached(key) {
            Some(c) => Ok(c),
            None => Self::read(store, key).await,
        }
    }

    /// A compare-and-set of the entry from `revision`: `Ok(Some(new revision))`, `Ok(None)`
    /// when another instance moved the entry on first.
    async fn write(
        &self,
        store: &kv::Store,
        key: &str,
        tat: u64,
        revision: u64,
    ) -> Result<Option<u64>, String> {
        let value = bytes::Bytes::copy_from_slice(&tat.to_be_bytes());
        let written = if revision == 0 {
            store
                .create(key, value)
                .await
                .map_err(|e| e.kind() == kv::CreateErrorKind::AlreadyExists)
        } else {
            store
                .update(key, value, revision)
                .await
                .map_err(|e| e.kind() == kv::UpdateErrorKind::WrongLastRevision)
        };
        match written {
            Ok(rev) => {
                self.remember(key, Some((Some(tat), rev)));
                Ok(Some(rev))
            }
            Err(conflict) => {
                self.remember(key, None);
                if conflict {
                    Ok(None)
                } else {
                    Err(format!("cannot write {key}"))
                }
            }
        }
    }

    /// Admits a connection through every matching rate policy, or through none: each is checked
    /// before any is written, and if a write then loses a race and the policy now refuses, the
    /// writes already made are given back. A connection denied by a second policy never spends
    /// the first one's budget.
    async fn admit_all(
        &self,
        store: &kv::Store,
        steps: &[Step<'_>],
    ) -> Result<(), (usize, Refusal)> {
        // This instance's requests on the same keys take turns (in one global order, so two
        // requests never wait on each other); only other instances can make a write retry.
        let mut stripes: Vec<usize> = steps.iter().map(|s| stripe(&s.key)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut _turns = Vec::with_capacity(stripes.len());
        for i in stripes {
            _turns.push(self.stripes[i].lock().await);
        }

        let now = self.clock.now_ns();
        let mut planned = Vec::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            let (tat, revision) = self
                .current(store, &step.key)
                .await
                .map_err(|e| (i, Refusal::Unavailable(e)))?;
            let new_tat = step.gcra.check(tat, now).map_err(|_| (i, Refusal::Over))?;
            planned.push((new_tat, revision));
        }

        let mut committed: Vec<Committed> = Vec::with_capacity(steps.len());
        for (i, (step, (mut new_tat, mut revision))) in steps.iter().zip(planned).enumerate() {
            let mut landed = None;
            for _ in 0..ATTEMPTS {
                match self.write(store, &step.key, new_tat, revision).await {
                    Ok(Some(rev)) => {
                        landed = Some(rev);
                        break;
                    }
                    Ok(None) => {
                        // Another instance moved the entry on: decide again from what it wrote.
                        let fresh = Self::read(store, &step.key).await;
                        let refusal = match fresh {
                            Ok((tat, rev)) => match step.gcra.check(tat, self.clock.now_ns()) {
                                Ok(t) => {
                                    (new_tat, revision) = (t, rev);
                                    continue;
                                }
                                Err(_) => Refusal::Over,
                            },
                            Err(e) => Refusal::Unavailable(e),
                        };
                        self.give_back(store, steps, &committed).await;
                        return Err((i, refusal));
                    }
                    Err(e) => {
                        self.give_back(store, steps, &committed).await;
                        return Err((i, Refusal::Unavailable(e)));
                    }
                }
            }
            match landed {
                Some(rev) => committed.push((step.key.clone(), rev)),
                None => {
                    self.give_back(store, steps, &committed).await;
                    let why = format!("{} too contended", step.key);
                    return Err((i, Refusal::Unavailable(why)));
                }
            }
        }
        Ok(())
    }

    /// Returns one period to each entry written for a connection that was refused after all:
    /// its TAT moves back by one period, as if that admission never happened. If the give-back
    /// itself fails, the budget stays spent (the strict side) and a warning says so.
    async fn give_back(&self, store: &kv::Store, steps: &[Step<'_>], committed: &[Committed]) {
        for (key, _) in committed {
            let Some(step) = steps.iter().find(|s| &s.key == key) else {
                continue;
            };
            let mut returned = false;
            for _ in 0..ATTEMPTS {
                let Ok((Some(tat), revision)) = Self::read(store, key).await else {
                    break;
                };
                let back = tat.saturating_sub(step.gcra.period_ns);
                match self.write(store, key, back, revision).await {
                    Ok(Some(_)) => {
                        returned = true;
                        break;
                    }
                    Ok(None) => continue,
                    Err(_) => break,
                }
            }
            if !returned {
                tracing::warn!(%key, "could not give back a rate token of a refused connection");
            }
        }
    }

    async fn new_connection(&self, rules: &[Compiled], e: &NewConnection, state: &State) -> State {
        let target = state.get_str(keys::TARGET_PEER);
        let matched: Vec<&Compiled> = rules
            .iter()
            .filter(|c| c.matcher.matches(e, target))
            .collect();
        let steps: Vec<Step> = matched
            .iter()
            .filter_map(|c| {
                let (gcra, _, _) = c.gcra.as_ref()?;
                Some(Step {
                    policy: c,
                    key: self.keys.key(
                        &c.id,
                        key_token(&c.matcher.key(e, target)),
                        c.max_keys,
                        self.clock.now_ns(),
                    ),
                    gcra: *gcra,
                })
            })
            .collect();
        if let Some(first) = steps.first() {
            let deny = |c: &Compiled, detail: String| {
                kind::deny(Reason::new(NAME, &c.id, Effect::Deny).with_detail(detail))
            };
            let Some(store) = &self.store else {
                return deny(first.policy, "no rate state store".into());
            };
            if let Err((i, refusal)) = self.admit_all(store, &steps).await {
                let c = steps[i].policy;
                let detail = match refusal {
                    Refusal::Over => match &c.gcra {
                        Some((_, rate, burst)) => format!("over {rate} (burst {burst})"),
                        None => "over its rate".into(),
                    },
                    Refusal::Unavailable(why) => {
                        format!("rate state unavailable, failing closed: {why}")
                    }
                };
                return deny(c, detail);
            }
        }
        let mut reasons = Vec::new();
        let mut cap: Option<u64> = None;
        for c in &matched {
            if let Some(bps) = c.bandwidth {
                cap = Some(cap.map_or(bps, |old| old.min(bps)));
                reasons.push(
                    Reason::new(NAME, &c.id, Effect::Limit).with_detail(format!("{bps} bit/s")),
                );
            }
        }
        let mut patch = State::new();
        if let Some(bps) = cap {
            patch.insert(
                keys::RATE_LIMIT,
                Value::Map(vec![(Value::from("bits_per_second"), Value::from(bps))]),
            );
        }
        if !reasons.is_empty() {
            patch.insert(keys::REASONS, kind::reasons(reasons));
        }
        patch
    }
}

fn stripe(key: &str) -> usize {
    key.bytes().fold(0usize, |h, b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    }) % STRIPES
}

impl AgentKind for RateLimiter {
    const INLINE: bool = false;

    type Policy = RateLimitPolicy;
    type Rules = Vec<Compiled>;

    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, p: &RateLimitPolicy) -> Result<(), String> {
        kind::check_identity(NAME, &p.agent, &p.id)?;
        if p.rate.is_none() && p.bandwidth.is_none() {
            return Err("fields `rate`, `bandwidth`: give at least one".into());
        }
        if p.rate.is_none() && p.burst > 0 {
            return Err("field `burst`: only means something with a `rate`".into());
        }
        if let Some(rate) = p.rate {
            // The stored timestamp runs at most (burst + 1) periods ahead; it must outlive that.
            let ahead = u128::from(rate.period_ns()) * (u128::from(p.burst) + 1);
            if ahead > IDLE_EXPIRY.as_nanos() {
                return Err(format!(
                    "fields `rate`, `burst`: {rate} with burst {} spans more than the {}h the limiter keeps state",
                    p.burst,
                    IDLE_EXPIRY.as_secs() / 3600
                ));
            }
        }
        Ok(())
    }

    fn compile(&self, mut policies: Vec<Stored<RateLimitPolicy>>) -> Vec<Compiled> {
        policies.sort_by(|a, b| a.0.cmp(&b.0));
        policies
            .into_iter()
            .map(|(id, p)| Compiled {
                id,
                gcra: p.rate.map(|r| (Gcra::new(r, p.burst), r, p.burst)),
                bandwidth: p.bandwidth.map(|b| b.0),
                max_keys: p.max_keys.map_or(DEFAULT_MAX_KEYS, |n| n.get() as usize),
                matcher: p.matcher,
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
            _ => Ok(State::new()),
        }
    }

    async fn attach(&mut self, ctx: Attach<'_>) -> Result<(), AttachError> {
        let bucket = ctx.subjects.rate_bucket();
        self.store = Some(
            ctx.state_bucket(
                bucket,
                "policy-bus rate limiter state (GCRA per key)",
                IDLE_EXPIRY,
            )
            .await?,
        );
        Ok(())
    }
}
