//! Load balancer: picks `target_peer` among the (already narrowed) `dst_peers`.
//!
//! One policy per `dst_service` (`*` is a catch-all; with several for one service the lowest
//! id wins). No policy means `random`. No candidate left means deny, with a reason; an event
//! that offered no `dst_peers` at all gets no pick (the gateway chooses).
//! - `random`: uniform.
//! - `round-robin`: a counter per policy, per agent instance (instances do not coordinate),
//!   moved once per run: a hedged copy of a call picks what the run's first call picked.
//! - `weighted`: random in proportion to `weights`; candidates without a weight get none, and
//!   when no candidate has one the pick falls back to random (said in the reason).
//! - `static`: `peer`, or another candidate when that peer is not one (said in the reason).
//! - `consistent-hash`: rendezvous hashing of `hash_on` (`src_service` or `src_peer`) over the
//!   candidates: the same key picks the same peer on every instance, and removing a peer only
//!   moves the keys that were on it.
//!
//! With `sources` (an ordered list of peers, what a ClusterLink Import becomes), the pick is
//! ClusterLink's own (`loadbalancer.go`, see `pick_source`): a source the ACL denied or
//! `peer-removed` took away fails over to another. Only sources are picked; none left is a
//! deny.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bus::event::{Event, NewConnection};
use bus::state::keys;
use bus::{Effect, Reason, State};
use rand::Rng;
use serde::Deserialize;

use crate::kind::{self, AgentKind, Stored};
use bus::origin::Origin;

pub const NAME: &str = "lb";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    Random,
    RoundRobin,
    Weighted,
    Static,
    ConsistentHash,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    #[default]
    SrcService,
    SrcPeer,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbPolicy {
    pub agent: String,
    pub id: String,
    pub dst_service: String,
    pub scheme: Scheme,
    #[serde(default)]
    pub weights: BTreeMap<String, u32>,
    #[serde(default)]
    pub peer: Option<String>,
    #[serde(default)]
    pub hash_on: HashOn,
    /// Ordered peers to pick among, ClusterLink's way (see the module's doc).
    #[serde(default)]
    pub sources: Vec<String>,
    /// The object this policy was made from (see `bus::origin`).
    #[serde(default)]
    pub origin: Option<Origin>,
}

struct Compiled {
    id: String,
    /// Said in the pick's reason when the fleet's (see `bus::fleet`).
    level: bus::fleet::Level,
    policy: LbPolicy,
    turn: Turn,
}

/// Round-robin's position, moved once per run of an event. The dispatcher sends a slow call
/// again (a hedged copy, with the same run id), and the instance that answers both must not
/// move on twice, or the next connection would skip a peer. Instances do not coordinate, so a
/// copy answered by another instance moves that instance's own position, as any call would.
#[derive(Default)]
struct Turn {
    next: AtomicUsize,
    /// The position each of the policy's last runs on this instance started at, by a hash of
    /// its id. A copy that arrives after this many other runs (half a second at 8 000
    /// decisions/s) moves on as a new run would.
    recent: Mutex<(HashMap<u64, usize>, VecDeque<u64>)>,
}

impl Turn {
    const REMEMBERED: usize = 4096;

    /// The position this run starts at, and whether it is the run's first call (only a first
    /// call moves on). A dry run reads the next position and moves nothing; a call without a
    /// run id (from a dispatcher that sets none) moves on every time.
    fn start(&self, run: Option<&str>, dry_run: bool) -> (usize, bool) {
        if dry_run {
            return (self.next.load(Ordering::Relaxed), false);
        }
        let Some(run) = run else {
            return (self.next.fetch_add(1, Ordering::Relaxed), true);
        };
        let run = fnv1a(&[run]);
        // A poisoned lock only means another pick panicked mid-way: the map is still whole.
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let (seen, order) = &mut *recent;
        if let Some(start) = seen.get(&run) {
            return (*start, false);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        if order.len() == Self::REMEMBERED {
            if let Some(old) = order.pop_front() {
                seen.remove(&old);
            }
        }
        seen.insert(run, start);
        order.push_back(run);
        (start, true)
    }

    fn skip(&self, by: usize) {
        self.next.fetch_add(by, Ordering::Relaxed);
    }
}

pub struct LbRules {
    by_service: HashMap<String, Compiled>,
    catch_all: Option<Compiled>,
}

#[derive(Default)]
pub struct Lb;

/// FNV-1a with a splitmix64 finish: a fixed hash, so every instance (and every build) maps a
/// key to the same peer; the finish spreads keys that differ in one byte (`p1`, `p2`).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// ClusterLink's pick among `sources` (its `loadbalancer.go`): attempt a source, and on one
/// that is not a candidate attempt again. `static` and `round-robin` go on to the next source in
/// order; round-robin counts every attempt, as ClusterLink's counter does (so its first pick is
/// the second source). `random` draws again on every attempt and moves on past the sources
/// already attempted. `Err` when no source is a candidate.
fn pick_source<'c>(
    c: &Compiled,
    peers: &[&'c str],
    (run, dry_run): (Option<&str>, bool),
) -> Result<(&'c str, Option<String>), String> {
    let sources = &c.policy.sources;
    let n = sources.len();
    let candidate = |i: usize| peers.iter().copied().find(|p| *p == sources[i].as_str());
    // The sources attempted and passed over, for the reason's detail: named only on a failover,
    // so the usual pick allocates nothing.
    let passed = |attempts: &mut dyn Iterator<Item = usize>| {
        let names: Vec<&str> = attempts.map(|i| sources[i].as_str()).collect();
        format!(
            "failed over past {} (denied, removed or not offered)",
            names.join(", ")
        )
    };
    let none = || {
        format!(
            "no source is a candidate: {} all denied, removed or not offered",
            sources.join(", ")
        )
    };
    if c.policy.scheme == Scheme::Random {
        let mut tried: Vec<usize> = Vec::new();
        while tried.len() < n {
            let mut i = rand::rng().random_range(0..n);
            while tried.contains(&i) {
                i = (i + 1) % n;
            }
            if let Some(p) = candidate(i) {
                let detail = (!tried.is_empty()).then(|| passed(&mut tried.iter().copied()));
                return Ok((p, detail));
            }
            tried.push(i);
        }
        return Err(none());
    }
    let (start, first) = match c.policy.scheme {
        Scheme::RoundRobin => {
            let (start, first) = c.turn.start(run, dry_run);
            (start + 1, first)
        }
        _ => (0, false),
    };
    let found = (0..n).find_map(|step| candidate((start + step) % n).map(|p| (step, p)));
    // Every attempt after the first counts too, as ClusterLink's counter does.
    let attempts = found.map_or(n, |(step, _)| step + 1);
    if first && attempts > 1 {
        c.turn.skip(attempts - 1);
    }
    let (step, peer) = found.ok_or_else(none)?;
    let detail = (step > 0).then(|| passed(&mut (0..step).map(|k| (start + k) % n)));
    Ok((peer, detail))
}

/// The peer `c` picks for one call of a run (`run`: its id, `dry_run`: whether a dry run, which
/// answers as the next real pick would without moving round-robin on; see `Turn`).
fn pick<'c>(
    c: &Compiled,
    e: &NewConnection,
    peers: &[&'c str],
    call: (Option<&str>, bool),
) -> Result<(&'c str, Option<String>), String> {
    if !c.policy.sources.is_empty() {
        return pick_source(c, peers, call);
    }
    let random = |peers: &[&'c str]| peers[rand::rng().random_range(0..peers.len())];
    let p = &c.policy;
    Ok(match p.scheme {
        Scheme::Random => (random(peers), None),
        Scheme::RoundRobin => (peers[c.turn.start(call.0, call.1).0 % peers.len()], None),
        Scheme::Weighted => {
            let weight = |peer: &str| u64::from(p.weights.get(peer).copied().unwrap_or(0));
            let total: u64 = peers.iter().map(|x| weight(x)).sum();
            if total == 0 {
                return Ok((
                    random(peers),
                    Some("no candidate has a weight: random".into()),
                ));
            }
            let mut ticket = rand::rng().random_range(0..total);
            for &peer in peers {
                let w = weight(peer);
                if ticket < w {
                    return Ok((peer, None));
                }
                ticket -= w;
            }
            unreachable!("ticket < total")
        }
        Scheme::Static => match p.peer.as_deref() {
            Some(want) if peers.contains(&want) => (
                peers
                    .iter()
                    .copied()
                    .find(|x| *x == want)
                    .unwrap_or(peers[0]),
                None,
            ),
            Some(want) => (
                random(peers),
                Some(format!("static peer {want} is not a candidate: fell back")),
            ),
            None => (random(peers), None),
        },
        Scheme::ConsistentHash => {
            let key = match p.hash_on {
                HashOn::SrcService => e.src_service.as_str(),
                HashOn::SrcPeer => e.src_peer.as_deref().unwrap_or(""),
            };
            let best = peers
                .iter()
                .copied()
                .max_by_key(|peer| (fnv1a(&[key, peer]), *peer));
            (best.unwrap_or(peers[0]), None)
        }
    })
}

impl AgentKind for Lb {
    type Policy = LbPolicy;
    type Rules = LbRules;

    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, p: &LbPolicy) -> Result<(), String> {
        kind::check_identity(NAME, &p.agent, &p.id)?;
        if p.dst_service.is_empty() {
            return Err("field `dst_service`: must name a service or be `*`".into());
        }
        if !p.sources.is_empty() {
            return check_sources(p);
        }
        match p.scheme {
            Scheme::Weighted if p.weights.values().all(|w| *w == 0) => Err(
                "field `weights`: scheme weighted needs at least one peer with a weight above 0"
                    .into(),
            ),
            Scheme::Static if p.peer.as_deref().is_none_or(str::is_empty) => Err(
                "field `peer`: scheme static needs the peer to send to (or `sources`, in order)"
                    .into(),
            ),
            _ => Ok(()),
        }
    }

    fn compile(&self, mut policies: Vec<Stored<LbPolicy>>) -> LbRules {
        // Sorted by level, then id, so that with two policies for one service the fleet's wins,
        // then the lowest id, everywhere.
        policies.sort_by(|a, b| (a.level, &a.id).cmp(&(b.level, &b.id)));
        let mut rules = LbRules {
            by_service: HashMap::new(),
            catch_all: None,
        };
        for Stored { id, level, policy } in policies {
            let c = Compiled {
                id,
                level,
                turn: Turn::default(),
                policy,
            };
            if c.policy.dst_service == "*" {
                rules.catch_all.get_or_insert(c);
            } else if let Some(other) = rules.by_service.get(&c.policy.dst_service) {
                tracing::warn!(service = %c.policy.dst_service, used = %other.id, ignored = %c.id,
                    "two lb policies for one service; the fleet's wins, then the lowest id");
            } else {
                rules.by_service.insert(c.policy.dst_service.clone(), c);
            }
        }
        rules
    }

    /// `static` (to a peer among the candidates) and `consistent-hash` pick the same peer for
    /// the same service, source and candidates; the other schemes pick anew every time.
    fn cache_inputs(
        &self,
        rules: &LbRules,
        event: &Event,
        state: &State,
    ) -> Option<bus::cache::Declared> {
        let Event::NewConnection(e) = event else {
            return None;
        };
        let policy = rules
            .by_service
            .get(&e.dst_service)
            .or(rules.catch_all.as_ref())?;
        let peers = state.get_strings(keys::DST_PEERS).unwrap_or_default();
        let pure = match policy.policy.scheme {
            Scheme::ConsistentHash => true,
            Scheme::Static if !policy.policy.sources.is_empty() => true,
            Scheme::Static => policy
                .policy
                .peer
                .as_deref()
                .is_some_and(|p| peers.contains(&p)),
            Scheme::Random | Scheme::RoundRobin | Scheme::Weighted => false,
        };
        pure.then_some(bus::cache::Declared {
            attrs: &[
                bus::attrs::DST_SERVICE,
                bus::attrs::SRC_SERVICE,
                bus::attrs::SRC_PEER,
            ],
            state: &[keys::DST_PEERS],
        })
    }

    fn decide(&self, rules: &LbRules, event: &Event, state: &State) -> State {
        let Event::NewConnection(e) = event else {
            return State::new();
        };
        let policy = rules
            .by_service
            .get(&e.dst_service)
            .or(rules.catch_all.as_ref());
        let id = policy.map_or("default", |c| c.id.as_str());
        // An event that offered no candidates leaves the choice to the gateway.
        let Some(peers) = state.get_strings(keys::DST_PEERS) else {
            return State::new();
        };
        if peers.is_empty() {
            return kind::deny(
                Reason::new(NAME, id, Effect::Deny).with_detail("no candidate peer left to pick"),
            );
        }
        let picked = match policy {
            Some(c) => pick(
                c,
                e,
                &peers,
                (state.get_str(keys::RUN_ID), state.flag(keys::DRY_RUN)),
            ),
            None => Ok((peers[rand::rng().random_range(0..peers.len())], None)),
        };
        let with_policy = |mut r: Reason| {
            if let Some(c) = policy {
                r = r.with_level(c.level).with_origin(c.policy.origin.as_ref());
            }
            r
        };
        let (target, detail) = match picked {
            Ok(picked) => picked,
            Err(why) => {
                return kind::deny(with_policy(
                    Reason::new(NAME, id, Effect::Deny).with_detail(why),
                ))
            }
        };
        let mut reason = with_policy(Reason::new(NAME, id, Effect::Pick));
        reason.detail = detail;
        let mut patch = State::new();
        patch.insert(keys::TARGET_PEER, target);
        patch.insert(keys::REASONS, kind::reasons([reason]));
        patch
    }
}

/// `sources` take ClusterLink's schemes, and nothing that belongs to another scheme.
fn check_sources(p: &LbPolicy) -> Result<(), String> {
    if !matches!(
        p.scheme,
        Scheme::Random | Scheme::RoundRobin | Scheme::Static
    ) {
        return Err(format!(
            "field `sources`: takes scheme random, round-robin or static, not {:?}",
            p.scheme
        ));
    }
    if p.peer.is_some() || !p.weights.is_empty() {
        return Err(
            "field `sources`: the order is the sources'; leave `peer` and `weights` out".into(),
        );
    }
    for (i, s) in p.sources.iter().enumerate() {
        if s.is_empty() {
            return Err(format!("field `sources[{i}]`: empty"));
        }
        if p.sources[..i].contains(s) {
            return Err(format!("field `sources[{i}]`: {s:?} is listed twice"));
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "lb_tests.rs"]
mod tests;
