//! The connection limiter's view of the slots: what this instance knows of who holds each
//! one (kept by the bucket watch), and of which connections were released lately. Only a hint:
//! the atomic create decides who gets a slot.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The key a close writes when it found no slot of a connection a limit may apply to
/// (`slot._gone.<connection>`): every instance's watch then records the release, and an
/// admission of the connection still under way gives its slot back. Policy ids never start
/// with `_`, so it is no slot.
pub(crate) const GONE_PREFIX: &str = "slot._gone.";
/// How long a connection's release is remembered: longer than the longest agent call
/// (`MAX_TIMEOUT_MS`) plus a KV request, so no copy of its admission can still be under way.
pub(crate) const RELEASED_FOR: Duration = Duration::from_secs(65);

/// A slot as this instance knows it: who holds it (`<connection>#<nonce>`, empty when only
/// a failed create told us it is taken), since when this instance has seen it held, and at
/// which revision (0 when unknown).
#[derive(Debug, Clone)]
pub(crate) struct Held {
    holder: String,
    seen: Instant,
    revision: u64,
}

/// A slot and its holder, as an admission took it or the view saw it: enough to free it with
/// one delete that expects `revision` (no read first), or, when the revision is unknown (0),
/// after reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotRef {
    pub(crate) key: String,
    pub(crate) holder: String,
    pub(crate) revision: u64,
}

/// What this instance knows of the slots. Only a hint: the atomic create decides.
#[derive(Default)]
pub(crate) struct View {
    /// policy id -> slot number -> holder
    slots: HashMap<String, HashMap<u32, Held>>,
    /// connection token -> the slots (policy id, number) its holders hold: a close, an undo and
    /// a hedged copy find a connection's slots without a pass over every slot.
    by_connection: HashMap<String, Vec<(String, u32)>>,
    /// connection token -> the first revision at which one of its slots was freed (closed,
    /// undone, refused), for [`RELEASED_FOR`]: a copy of its admission that creates a slot
    /// after that revision gives it back.
    released: HashMap<String, (u64, Instant)>,
    /// `released` is pruned when it grows past this.
    prune_at: usize,
}

/// What an admission came to.
pub(crate) enum Taken {
    /// The slot number, and the revision that took it (0 when unknown).
    Slot(u32, u64),
    /// Every slot is taken.
    Full,
    /// A slot was taken, but the connection's slots had been freed before (closed, or its
    /// event denied, while this copy of the admission was under way): it was given back.
    Released,
}

impl View {
    /// Forgets the slots (before a reload), keeping what was released.
    pub(crate) fn clear_slots(&mut self) {
        self.slots.clear();
        self.by_connection.clear();
    }

    fn index(&mut self, holder: &str, policy: &str, n: u32, add: bool) {
        if holder.is_empty() {
            return;
        }
        let token = token_of(holder);
        if add {
            self.by_connection
                .entry(token.to_string())
                .or_default()
                .push((policy.to_string(), n));
        } else if let Some(list) = self.by_connection.get_mut(token) {
            list.retain(|(p, m)| !(p == policy && *m == n));
            if list.is_empty() {
                self.by_connection.remove(token);
            }
        }
    }

    /// A change the watch read at `revision`.
    pub(crate) fn apply_at(&mut self, key: &str, holder: Option<String>, revision: u64) {
        if let Some(token) = key.strip_prefix(GONE_PREFIX) {
            if holder.is_some() {
                self.record_release(token, revision);
            }
            return;
        }
        if holder.is_none() {
            // Who held it, before it goes from the view.
            let freed = parse_slot(key)
                .and_then(|(policy, n)| self.slots.get(policy)?.get(&n))
                .map(|h| token_of(&h.holder).to_string());
            if let Some(token) = freed {
                self.record_release(&token, revision);
            }
        }
        self.apply(key, holder, revision);
    }

    fn record_release(&mut self, token: &str, revision: u64) {
        self.released
            .entry(token.to_string())
            .or_insert((revision, Instant::now()));
        if self.released.len() > self.prune_at.max(1024) {
            self.released
                .retain(|_, (_, at)| at.elapsed() < RELEASED_FOR);
            self.prune_at = self.released.len() * 2;
        }
    }

    /// Whether a slot of the connection was freed before `revision`.
    pub(crate) fn released_before(&self, token: &str, revision: u64) -> bool {
        self.released
            .get(token)
            .is_some_and(|(r, at)| *r < revision && at.elapsed() < RELEASED_FOR)
    }

    pub(crate) fn apply(&mut self, key: &str, holder: Option<String>, revision: u64) {
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
                let added = (!h.is_empty()).then(|| h.clone());
                let old = slots.insert(
                    n,
                    Held {
                        holder: h,
                        seen: Instant::now(),
                        revision,
                    },
                );
                if let Some(old) = old {
                    self.index(&old.holder, policy, n, false);
                }
                if let Some(h) = added {
                    self.index(&h, policy, n, true);
                }
            }
            None => {
                let old = self.slots.get_mut(policy).and_then(|m| m.remove(&n));
                if let Some(old) = old {
                    self.index(&old.holder, policy, n, false);
                }
            }
        }
    }

    /// A failed create: the slot is held (by whom the watch will say), seen held from now on so
    /// it is not probed again before a lease.
    pub(crate) fn mark_taken(&mut self, key: &str) {
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
                revision: 0,
            });
        held.seen = Instant::now();
    }

    /// A slot below `max` that looks free, starting from `start` so instances spread out.
    pub(crate) fn free_slot(
        &self,
        policy: &str,
        max: u32,
        start: u32,
        tried: &[u32],
    ) -> Option<u32> {
        let taken = self.slots.get(policy);
        (0..max)
            .map(|i| (start + i) % max)
            .find(|n| !tried.contains(n) && !taken.is_some_and(|t| t.contains_key(n)))
    }

    /// The slot held longest, if it has been held past the lease (JetStream may have dropped
    /// it: the watch does not report expiries).
    pub(crate) fn expired_slot(&self, policy: &str, max: u32, lease: Duration) -> Option<u32> {
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
    pub(crate) fn slot_of(&self, policy: &str, holder: &str) -> Option<(u32, u64)> {
        self.by_connection
            .get(token_of(holder))?
            .iter()
            .filter(|(p, _)| p == policy)
            .find_map(|(p, n)| {
                let h = self.slots.get(p)?.get(n)?;
                (h.holder == holder).then_some((*n, h.revision))
            })
    }

    /// The slots held by exactly `holder`.
    pub(crate) fn held_as(&self, holder: &str) -> Vec<SlotRef> {
        let mut held = self.held_by(token_of(holder));
        held.retain(|s| s.holder == holder);
        held
    }

    /// The slots a connection holds, by its token.
    pub(crate) fn held_by(&self, token: &str) -> Vec<SlotRef> {
        let Some(list) = self.by_connection.get(token) else {
            return Vec::new();
        };
        list.iter()
            .filter_map(|(p, n)| {
                let h = self.slots.get(p)?.get(n)?;
                Some(SlotRef {
                    key: slot_key(p, *n),
                    holder: h.holder.clone(),
                    revision: h.revision,
                })
            })
            .collect()
    }
}

/// The connection token of a holder `<connection>#<run>`.
fn token_of(holder: &str) -> &str {
    holder.split_once('#').map_or(holder, |(t, _)| t)
}

pub(crate) fn slot_key(policy: &str, n: u32) -> String {
    format!("slot.{policy}.{n}")
}

fn parse_slot(key: &str) -> Option<(&str, u32)> {
    let rest = key.strip_prefix("slot.")?;
    let (policy, n) = rest.rsplit_once('.')?;
    if policy.starts_with('_') {
        return None;
    }
    Some((policy, n.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_index_follows_takes_handovers_and_frees() {
        let mut v = View::default();
        v.apply_at("slot.p.1", Some("c1#r1".into()), 10);
        v.apply_at("slot.q.7", Some("c1#r1".into()), 11);
        v.apply_at("slot.p.2", Some("c2#r9".into()), 12);
        let keys = |v: &View, t: &str| {
            let mut k: Vec<String> = v.held_by(t).into_iter().map(|s| s.key).collect();
            k.sort();
            k
        };
        assert_eq!(keys(&v, "c1"), ["slot.p.1", "slot.q.7"]);
        assert_eq!(v.slot_of("q", "c1#r1"), Some((7, 11)));
        assert_eq!(v.slot_of("q", "c1#r2"), None, "another run of c1");
        // After a lease, slot p.1 belongs to another connection.
        v.apply_at("slot.p.1", Some("c3#r1".into()), 13);
        assert_eq!(keys(&v, "c1"), ["slot.q.7"]);
        assert_eq!(v.held_as("c3#r1")[0].revision, 13);
        v.apply_at("slot.q.7", None, 14);
        assert!(v.held_by("c1").is_empty());
        assert!(v.released_before("c1", 15), "the free is remembered");
        // A failed create (holder unknown) is in no connection's list.
        v.mark_taken("slot.p.3");
        assert_eq!(v.in_use("p"), 3);
        assert_eq!(keys(&v, "c2"), ["slot.p.2"]);
    }
}
