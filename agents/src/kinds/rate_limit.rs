//! Rate limiter: limits new connections per key with GCRA, and hands the data plane a
//! per-connection bandwidth cap.
//!
//! Instances share the budget through one key-value entry per limited key (bucket
//! `<prefix>_rates`), holding the GCRA timestamp. An instance takes tokens from that entry only
//! by a compare-and-set from the revision it read, so two instances never take the same part
//! of the budget. It takes them in *allotments* sized to the demand it sees (one token near the
//! limit) and spends them locally, so a busy key costs one write per allotment, not one per
//! admission: over any window the admitted count stays within
//! `rate × window + burst + 1 + instances × allotment` (see [`super::rate_pool`]). The only
//! other error term is clock skew between the instances' hosts (each uses its own wall clock):
//! at most `rate × skew` extra connections, none on one machine.
//!
//! A connection that matches several rate policies spends from all of them or from none: a
//! token already spent for one policy goes back to the local pool when a later one refuses.

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
use super::rate_pool::{grant, Next, Pool, Refusal};
use crate::kind::{self, AgentKind, Attach, AttachError, Stored};

pub const NAME: &str = "rate-limit";
/// Entries idle this long are dropped by JetStream; an absent entry is a full budget.
const IDLE_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// Compare-and-set attempts before a contended key fails closed.
const ATTEMPTS: usize = 16;
/// Cached entries (and pools) before they are cleared: a cache is only a shortcut to the last
/// revision, and a pool's tokens lost make the limit stricter.
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
    /// Said in its reasons when the fleet's (see `bus::fleet`).
    level: bus::fleet::Level,
    matcher: LimitMatch,
    gcra: Option<(Gcra, Rate, u32)>,
    bandwidth: Option<u64>,
    max_keys: usize,
}

impl Compiled {
    fn reason(&self, effect: Effect) -> Reason {
        Reason::new(NAME, &self.id, effect).with_level(self.level)
    }
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

/// Instances never wait on one another: each spends tokens from its own pools and takes a new
/// allotment with one compare-and-set when one runs dry (see [`super::rate_pool`]).
pub struct RateLimiter {
    store: Option<kv::Store>,
    clock: Box<dyn Clock>,
    /// Last (TAT, revision) this instance saw per key, to skip a read before the write.
    cache: Mutex<HashMap<String, (Option<u64>, u64)>>,
    pools: Mutex<HashMap<String, Pool>>,
    keys: KeySet,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter {
            store: None,
            clock: Box::new(SystemClock),
            cache: Mutex::new(HashMap::new()),
            pools: Mutex::new(HashMap::new()),
            keys: KeySet::new(IDLE_EXPIRY.as_nanos() as u64),
        }
    }
}

/// One rate policy a connection must pass: its GCRA on its key.
struct Step<'a> {
    policy: &'a Compiled,
    key: String,
    gcra: Gcra,
}

/// A refill under way: if the request doing it is dropped, the requests waiting on it are let
/// go to refill themselves instead of waiting for ever.
struct Turn<'a> {
    limiter: &'a RateLimiter,
    key: &'a str,
    done: bool,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if !self.done {
            if let Some(pool) = self.limiter.pools().get_mut(self.key) {
                pool.abandoned();
            }
        }
    }
}

impl RateLimiter {
    fn pools(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

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

    /// A compare-and-set of the entry from `revision`: `Ok(true)` when it landed, `Ok(false)`
    /// when another instance moved the entry on first.
    async fn write(
        &self,
        store: &kv::Store,
        key: &str,
        tat: u64,
        revision: u64,
    ) -> Result<bool, String> {
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
                Ok(true)
            }
            Err(conflict) => {
                self.remember(key, None);
                if conflict {
                    Ok(false)
                } else {
                    Err(format!("cannot write {key}"))
                }
            }
        }
    }

    /// Takes an allotment of up to `want` tokens from the key's shared entry in one
    /// compare-and-set: the tokens taken, or the refusal with the ns until a token conforms.
    /// The first try starts from the revision this instance last saw (a stale one is caught by
    /// the compare-and-set; the TAT only moves on, so a deny from it is right too).
    async fn take(
        &self,
        store: &kv::Store,
        key: &str,
        gcra: &Gcra,
        want: u64,
    ) -> Result<u64, (Refusal, u64)> {
        let unavailable = |e: String| (Refusal::Unavailable(e), 0);
        for attempt in 0..ATTEMPTS {
            let seen = match self.cached(key) {
                Some(c) if attempt == 0 => c,
                _ => Self::read(store, key).await.map_err(unavailable)?,
            };
            let (tat, revision) = seen;
            let (n, new_tat) = grant(gcra, tat, self.clock.now_ns(), want)
                .map_err(|wait| (Refusal::Over, wait))?;
            if self
                .write(store, key, new_tat, revision)
                .await
                .map_err(unavailable)?
            {
                return Ok(n);
            }
        }
        Err(unavailable(format!("{key} too contended")))
    }

    /// Spends one token of the key: from this instance's pool, or, when it is dry, from a new
    /// allotment one request takes while the others wait for it. No lock is held across the
    /// write.
    async fn spend(&self, store: &kv::Store, key: &str, gcra: Gcra) -> Result<(), Refusal> {
        let mut woken = false;
        let mut counted = false;
        loop {
            let now = self.clock.now_ns();
            let next = {
                let mut pools = self.pools();
                if pools.len() >= CACHE_MAX {
                    // Dropping a pool loses its tokens: the strict side.
                    pools.retain(|_, p| !p.idle());
                }
                // A key is allocated once, not on every spend.
                if !pools.contains_key(key) {
                    pools.insert(key.to_string(), Pool::new(gcra));
                }
                let Some(pool) = pools.get_mut(key) else {
                    return Err(Refusal::Unavailable("no pool for the key".into()));
                };
                if pool.gcra != gcra && pool.idle() {
                    // The policy changed: its tokens were taken under the old rate.
                    *pool = Pool::new(gcra);
                }
                if !counted {
                    pool.arrived(now);
                    counted = true;
                }
                match pool.next(now, woken) {
                    // Registered before the lock is let go, so the refill's wake-up reaches it.
                    Next::Wait(notify) => Err(notify.notified_owned()),
                    other => Ok(other),
                }
            };
            match next {
                Err(wait) => {
                    wait.await;
                    woken = true;
                }
                Ok(Next::Spent) => return Ok(()),
                Ok(Next::Refused(refusal)) => return Err(refusal),
                Ok(Next::Wait(_)) => unreachable!("waits are taken above"),
                Ok(Next::Refill(want)) => {
                    let mut turn = Turn {
                        limiter: self,
                        key,
                        done: false,
                    };
                    let outcome = self.take(store, key, &gcra, want).await;
                    turn.done = true;
                    if let Some(pool) = self.pools().get_mut(key) {
                        pool.refilled(self.clock.now_ns(), outcome.clone());
                    }
                    return outcome.map(|_| ()).map_err(|(refusal, _)| refusal);
                }
            }
        }
    }

    /// Whether every step has a token, taking none: this instance's pool, else the shared
    /// entry as it is now. For a dry run.
    async fn would_admit(
        &self,
        store: &kv::Store,
        steps: &[Step<'_>],
    ) -> Result<(), (usize, Refusal)> {
        let now = self.clock.now_ns();
        for (i, step) in steps.iter().enumerate() {
            let pooled = self
                .pools()
                .get(&step.key)
                .is_some_and(|p| p.gcra == step.gcra && p.tokens() > 0);
            if pooled {
                continue;
            }
            let (tat, _) = Self::read(store, &step.key)
                .await
                .map_err(|why| (i, Refusal::Unavailable(why)))?;
            if super::rate_pool::available(&step.gcra, tat, now).is_err() {
                return Err((i, Refusal::Over));
            }
        }
        Ok(())
    }

    /// Admits a connection through every matching rate policy, or through none: a token taken
    /// for one policy goes back to this instance's pool if a later one refuses, so a
    /// connection denied by a second policy never spends the first one's budget.
    async fn admit_all(
        &self,
        store: &kv::Store,
        steps: &[Step<'_>],
    ) -> Result<(), (usize, Refusal)> {
        for (i, step) in steps.iter().enumerate() {
            if let Err(refusal) = self.spend(store, &step.key, step.gcra).await {
                let mut pools = self.pools();
                for earlier in &steps[..i] {
                    if let Some(pool) = pools.get_mut(&earlier.key) {
                        if pool.gcra == earlier.gcra {
                            pool.give_back();
                        }
                    }
                }
                return Err((i, refusal));
            }
        }
        Ok(())
    }

    async fn new_connection(&self, rules: &[Compiled], e: &NewConnection, state: &State) -> State {
        let target = state.get_str(keys::TARGET_PEER);
        let matched: Vec<&Compiled> = rules
            .iter()
            .filter(|c| c.matcher.matches(e, target))
            .collect();
        let dry_run = state.flag(keys::DRY_RUN);
        let steps: Vec<Step> = matched
            .iter()
            .filter_map(|c| {
                let (gcra, _, _) = c.gcra.as_ref()?;
                let token = key_token(&c.matcher.key(e, target));
                let key = if dry_run {
                    self.keys.peek(&c.id, token, c.max_keys)
                } else {
                    self.keys.key(&c.id, token, c.max_keys, self.clock.now_ns())
                };
                Some(Step {
                    policy: c,
                    key,
                    gcra: *gcra,
                })
            })
            .collect();
        if let Some(first) = steps.first() {
            let deny = |c: &Compiled, detail: String| {
                kind::deny(c.reason(Effect::Deny).with_detail(detail))
            };
            let Some(store) = &self.store else {
                return deny(first.policy, "no rate state store".into());
            };
            let admitted = if dry_run {
                self.would_admit(store, &steps).await
            } else {
                self.admit_all(store, &steps).await
            };
            if let Err((i, refusal)) = admitted {
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
                reasons.push(c.reason(Effect::Limit).with_detail(format!("{bps} bit/s")));
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

impl AgentKind for RateLimiter {
    const INLINE: bool = false;
    const TAKES: bool = true;

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
        policies.sort_by(|a, b| a.id.cmp(&b.id));
        policies
            .into_iter()
            .map(|Stored { id, level, policy }| Compiled {
                id,
                level,
                gcra: policy
                    .rate
                    .map(|r| (Gcra::new(r, policy.burst), r, policy.burst)),
                bandwidth: policy.bandwidth.map(|b| b.0),
                max_keys: policy
                    .max_keys
                    .map_or(DEFAULT_MAX_KEYS, |n| n.get() as usize),
                matcher: policy.matcher,
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
            Event::NewConnection(e) => Ok(super::limit_match::hold_target(
                rules.iter().map(|c| &c.matcher),
                state,
                self.new_connection(rules, e, state).await,
            )),
            _ => Ok(State::new()),
        }
    }

    async fn attach(&mut self, ctx: Attach<'_>) -> Result<(), AttachError> {
        self.store = Some(
            ctx.state_bucket(
                bus::store::Store::Rates,
                "policy-bus rate limiter state (GCRA per key)",
                IDLE_EXPIRY,
            )
            .await?,
        );
        Ok(())
    }
}

#[cfg(test)]
#[path = "rate_limit_tests.rs"]
mod tests;
