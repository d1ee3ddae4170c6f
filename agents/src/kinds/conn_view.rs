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
                .and_then(|h| h.holder.split_once('#'))
                .map(|(token, _)| token.to_string());
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
                slots.insert(
                    n,
                    Held {
                        holder: h,
                        seen: Instant::now(),
                        revision,
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
        self.slots
            .get(policy)?
            .iter()
            .find(|(_, h)| h.holder == holder)
            .map(|(n, h)| (*n, h.revision))
    }

    /// The slots held by exactly `holder`.
    pub(crate) fn held_as(&self, holder: &str) -> Vec<SlotRef> {
        self.held_where(|h| h == holder)
    }

    /// The slots a connection holds, by its token.
    pub(crate) fn held_by(&self, token: &str) -> Vec<SlotRef> {
        let prefix = format!("{token}#");
        self.held_where(|h| h.starts_with(&prefix))
    }

    fn held_where(&self, by: impl Fn(&str) -> bool) -> Vec<SlotRef> {
        self.slots
            .iter()
            .flat_map(|(p, m)| {
                m.iter()
                    .filter(|(_, h)| by(&h.holder))
                    .map(move |(n, h)| SlotRef {
                        key: slot_key(p, *n),
                        holder: h.holder.clone(),
                        revision: h.revision,
                    })
            })
            .collect()
    }
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
