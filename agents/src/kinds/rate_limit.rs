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
}

pub struct Compiled {
    id: String,
    matcher: LimitMatch,
    gcra: Option<(Gcra, Rate, u32)>,
    bandwidth: Option<u64>,
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
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter {
            store: None,
            clock: Box::new(SystemClock),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            cache: Mutex::new(HashMap::new()),
        }
    }
}

enum Admit {
    Yes,
    No,
    Unavailable(String),
}

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

    /// One GCRA step on the shared entry, by compare-and-set. A deny read from a stale cache
    /// is still right: the TAT only moves forward, so the stored one is at least as late.
    async fn admit(&self, store: &kv::Store, key: &str, gcra: &Gcra) -> Admit {
        let stripe = key.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        }) % STRIPES;
        let _turn = self.stripes[stripe].lock().await;
        for _ in 0..ATTEMPTS {
            let (tat, revision) = match self.cached(key) {
                Some(c) => c,
                None => match Self::read(store, key).await {
                    Ok(c) => c,
                    Err(e) => return Admit::Unavailable(e),
                },
            };
            let Ok(new_tat) = gcra.check(tat, self.clock.now_ns()) else {
                return Admit::No;
            };
            let value = bytes::Bytes::copy_from_slice(&new_tat.to_be_bytes());
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
                    self.remember(key, Some((Some(new_tat), rev)));
                    return Admit::Yes;
                }
                // Another instance moved the entry on: read it again and retry.
                Err(true) => self.remember(key, None),
                Err(false) => {
                    self.remember(key, None);
                    return Admit::Unavailable(format!("cannot write {key}"));
                }
            }
        }
        Admit::Unavailable(format!("{key} too contended"))
    }

    async fn new_connection(&self, rules: &[Compiled], e: &NewConnection, state: &State) -> State {
        let target = state.get_str(keys::TARGET_PEER);
        let mut reasons = Vec::new();
        let mut cap: Option<u64> = None;
        for c in rules.iter().filter(|c| c.matcher.matches(e, target)) {
            if let Some((gcra, rate, burst)) = &c.gcra {
                let Some(store) = &self.store else {
                    return kind::deny(
                        Reason::new(NAME, &c.id, Effect::Deny).with_detail("no rate state store"),
                    );
                };
                let key = format!("{}.{}", c.id, key_token(&c.matcher.key(e, target)));
                match self.admit(store, &key, gcra).await {
                    Admit::Yes => {}
                    Admit::No => {
                        let detail = format!("over {rate} (burst {burst})");
                        return kind::deny(
                            Reason::new(NAME, &c.id, Effect::Deny).with_detail(detail),
                        );
                    }
                    Admit::Unavailable(why) => {
                        let detail = format!("rate state unavailable, failing closed: {why}");
                        return kind::deny(
                            Reason::new(NAME, &c.id, Effect::Deny).with_detail(detail),
                        );
                    }
                }
            }
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

impl AgentKind for RateLimiter {
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
                matcher: p.matcher,
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
            _ => State::new(),
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
