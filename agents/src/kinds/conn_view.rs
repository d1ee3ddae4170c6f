//! The connection limiter's view of the slots: what this instance knows of each block's
//! holders (kept by the bucket watch, and by its own writes), and of which connections were
//! released lately. Only a hint: the compare-and-set of a block decides who gets a slot.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::conn_block::{self, Block};

/// The keys of markers, which no block's key can be (policy ids never start with `_`):
/// `slot._gone.<connection>`, written by a close that found no slot of a connection a limit
/// may apply to, and `slot._gone.<connection>.<run>`, written by an undo of a run whose
/// admission may still be under way somewhere. Every instance's watch records them, and an
/// admission of that connection (or run) written after gives its slot back.
pub(crate) const GONE_PREFIX: &str = "slot._gone.";

/// The marker of a closed connection.
pub(crate) fn gone_key(token: &str) -> String {
    format!("{GONE_PREFIX}{token}")
}

/// The marker of an undone run, `<connection>#<run>`.
pub(crate) fn undone_key(run: &str) -> String {
    let (token, run) = run.split_once('#').unwrap_or((run, ""));
    format!("{GONE_PREFIX}{token}.{run}")
}
/// How long a connection's release is remembered: longer than the longest agent call
/// (`MAX_TIMEOUT_MS`) plus a KV request, so no copy of its admission can still be under way.
pub(crate) const RELEASED_FOR: Duration = Duration::from_secs(65);

/// A block as this instance last saw it, at `revision`.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) block: Block,
    pub(crate) revision: u64,
}

/// A slot a holder holds: the block's key and the holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotRef {
    pub(crate) key: String,
    pub(crate) holder: String,
}

/// What an admission came to.
pub(crate) enum Taken {
    /// A slot in this block.
    Slot(u32),
    /// Another copy of the run holds this slot: shared (one matching policy only).
    Shared(SlotRef),
    /// Every slot is taken.
    Full,
    /// A slot was taken, but the connection's slots had been freed before (closed, or its
    /// event denied, while this copy of the admission was under way): it was given back.
    Released,
}

/// What this instance knows of the slots.
#[derive(Default)]
pub(crate) struct View {
    /// policy id -> block number -> the block
    blocks: HashMap<String, HashMap<u32, Seen>>,
    /// connection token -> the blocks (policy id, number) its holders are in: a close, an undo
    /// and a hedged copy find a connection's slots without a pass over every block.
    by_connection: HashMap<String, Vec<(String, u32)>>,
    /// policy id -> holders in its blocks (past the lease too, until their block is written).
    held: HashMap<String, usize>,
    /// connection token -> the first revision at which one of its slots was freed (closed,
    /// undone, refused), for [`RELEASED_FOR`]: a copy of its admission that takes a slot
    /// after that revision gives it back.
    released: HashMap<String, (u64, Instant)>,
    /// runs (`<connection>#<run>`) whose event was denied in the end, for [`RELEASED_FOR`]:
    /// an admission of theirs that takes a slot, whenever, gives it back.
    undone: HashMap<String, Instant>,
    /// `released` and `undone` are pruned when they grow past this.
    prune_at: usize,
    /// Holders the watch saw admitted after their connection was released or their run
    /// undone: the writer gives them back itself, but it may have died first (see
    /// [`View::take_late`]).
    late: Vec<SlotRef>,
}

impl View {
    /// The keys of the blocks the view has: after a reload, those the bucket no longer has
    /// are applied as deletes, so releases made while the watch was away are recorded.
    pub(crate) fn block_keys(&self) -> Vec<String> {
        self.blocks
            .iter()
            .flat_map(|(p, m)| m.keys().map(move |b| slot_key(p, *b)))
            .collect()
    }

    /// Takes the holders seen admitted after a release of their connection or an undo of
    /// their run (see `late`).
    pub(crate) fn take_late(&mut self) -> Vec<SlotRef> {
        std::mem::take(&mut self.late)
    }

    /// A block or marker as read at `revision` (a load, a read): `None` is a delete. A
    /// change older than what the view has of the block is ignored.
    pub(crate) fn apply_at(&mut self, key: &str, value: Option<&[u8]>, revision: u64) {
        self.apply(key, value, revision);
    }

    /// A change the watch brings, in order: a holder it adds after its connection was
    /// released, or its run undone, is noticed as late (see [`View::take_late`]). Only here:
    /// a load or a read jumps revisions, and a holder it finds may have been added long
    /// before the release it is compared with.
    pub(crate) fn apply_change(&mut self, key: &str, value: Option<&[u8]>, revision: u64) {
        for holder in self.apply(key, value, revision) {
            if self.released_before(token_of(&holder), revision) || self.is_undone(&holder) {
                self.late.push(SlotRef {
                    key: key.to_string(),
                    holder,
                });
            }
        }
    }

    /// Applies a block or marker; returns the holders it added.
    fn apply(&mut self, key: &str, value: Option<&[u8]>, revision: u64) -> Vec<String> {
        if let Some(marker) = key.strip_prefix(GONE_PREFIX) {
            if value.is_some() {
                match marker.split_once('.') {
                    Some((token, run)) => self.mark_undone(&format!("{token}#{run}")),
                    None => self.record_release(marker, revision),
                }
            }
            return Vec::new();
        }
        let Some((policy, b)) = parse_slot(key) else {
            return Vec::new();
        };
        let known = self
            .blocks
            .get(policy)
            .and_then(|m| m.get(&b))
            .map(|s| s.revision);
        if known.is_some_and(|k| k >= revision) {
            return Vec::new();
        }
        let seen = value.map(|v| Seen {
            block: Block::decode(v),
            revision,
        });
        self.set(policy, b, seen, revision)
    }

    /// A block this instance wrote at `revision` itself.
    /// Ignored if the view already has the block at this revision or later (the watch can
    /// bring a newer change before the writer's task runs again).
    pub(crate) fn wrote(&mut self, key: &str, block: Option<Block>, revision: u64) {
        let Some((policy, b)) = parse_slot(key) else {
            return;
        };
        if self.block(key).is_some_and(|s| s.revision >= revision) {
            return;
        }
        let seen = block.map(|block| Seen { block, revision });
        self.set(policy, b, seen, revision);
    }

    /// A block found absent from the bucket (dropped with the lease, its holders all past it):
    /// forgotten without recording releases.
    pub(crate) fn forget(&mut self, key: &str) {
        let Some((policy, b)) = parse_slot(key) else {
            return;
        };
        let Some(old) = self.blocks.get_mut(policy).and_then(|m| m.remove(&b)) else {
            return;
        };
        for h in &old.block.holders {
            self.unindex(&h.holder, policy, b);
        }
        if let Some(count) = self.held.get_mut(policy) {
            *count = count.saturating_sub(old.block.holders.len());
        }
    }

    /// Holders of the policy not past the lease: a pass over its blocks, for when the count
    /// says the limit is reached.
    pub(crate) fn live_in_use(&self, policy: &str, now_ms: u64, lease_ms: u64) -> usize {
        self.blocks.get(policy).map_or(0, |m| {
            m.values()
                .map(|s| s.block.live_count(now_ms, lease_ms) as usize)
                .sum()
        })
    }

    /// Puts the block, indexing and counting its holders: returns the holders it added.
    fn set(&mut self, policy: &str, b: u32, seen: Option<Seen>, revision: u64) -> Vec<String> {
        let blocks = self.blocks.entry(policy.to_string()).or_default();
        let old = match &seen {
            Some(s) => blocks.insert(b, s.clone()),
            None => blocks.remove(&b),
        };
        let old_holders = old.map(|s| s.block.holders).unwrap_or_default();
        let new_holders = seen.map(|s| s.block.holders).unwrap_or_default();
        for h in &old_holders {
            if !new_holders.iter().any(|n| n.holder == h.holder) {
                self.unindex(&h.holder, policy, b);
                let token = token_of(&h.holder).to_string();
                self.record_release(&token, revision);
            }
        }
        let mut added = Vec::new();
        for h in &new_holders {
            if !old_holders.iter().any(|o| o.holder == h.holder) {
                self.by_connection
                    .entry(token_of(&h.holder).to_string())
                    .or_default()
                    .push((policy.to_string(), b));
                added.push(h.holder.clone());
            }
        }
        let count = self.held.entry(policy.to_string()).or_default();
        *count = (*count + new_holders.len()).saturating_sub(old_holders.len());
        added
    }

    fn unindex(&mut self, holder: &str, policy: &str, b: u32) {
        let token = token_of(holder);
        if let Some(list) = self.by_connection.get_mut(token) {
            if let Some(i) = list.iter().position(|(p, m)| p == policy && *m == b) {
                list.swap_remove(i);
            }
            if list.is_empty() {
                self.by_connection.remove(token);
            }
        }
    }

    fn record_release(&mut self, token: &str, revision: u64) {
        let now = Instant::now();
        let entry = self
            .released
            .entry(token.to_string())
            .or_insert((revision, now));
        // An expired entry not pruned yet is a release of another use of the id.
        if entry.1.elapsed() >= RELEASED_FOR {
            *entry = (revision, now);
        }
        self.prune();
    }

    /// Records that a run's event was denied in the end: any admission of it, under way or
    /// to come, gives its slot back.
    pub(crate) fn mark_undone(&mut self, run: &str) {
        let at = self
            .undone
            .entry(run.to_string())
            .or_insert_with(Instant::now);
        if at.elapsed() >= RELEASED_FOR {
            *at = Instant::now();
        }
        self.prune();
    }

    /// Whether the run of `holder` (`<connection>#<run>[/<copy>]`) was undone.
    pub(crate) fn is_undone(&self, holder: &str) -> bool {
        self.undone
            .get(run_of(holder))
            .is_some_and(|at| at.elapsed() < RELEASED_FOR)
    }

    fn prune(&mut self) {
        if self.released.len() + self.undone.len() > self.prune_at.max(1024) {
            self.released
                .retain(|_, (_, at)| at.elapsed() < RELEASED_FOR);
            self.undone.retain(|_, at| at.elapsed() < RELEASED_FOR);
            self.prune_at = (self.released.len() + self.undone.len()) * 2;
        }
    }

    /// Whether a slot of the connection was freed before `revision`.
    pub(crate) fn released_before(&self, token: &str, revision: u64) -> bool {
        self.released
            .get(token)
            .is_some_and(|(r, at)| *r < revision && at.elapsed() < RELEASED_FOR)
    }

    /// The block under `key`, as last seen.
    pub(crate) fn block(&self, key: &str) -> Option<&Seen> {
        let (policy, b) = parse_slot(key)?;
        self.blocks.get(policy)?.get(&b)
    }

    /// A block of the policy with room under `max`, looking from `start` on (so instances
    /// spread out) and skipping `tried`: its number and its room.
    pub(crate) fn with_room(
        &self,
        policy: &str,
        max: u32,
        start: u32,
        now_ms: u64,
        lease_ms: u64,
        tried: &[u32],
    ) -> Option<(u32, u32)> {
        let n = conn_block::blocks(max);
        let known = self.blocks.get(policy);
        (0..n)
            .map(|i| (start.wrapping_add(i)) % n)
            .filter(|b| !tried.contains(b))
            .find_map(|b| {
                let cap = conn_block::capacity(max, b);
                let room = known
                    .and_then(|m| m.get(&b))
                    .map_or(cap, |s| s.block.room(cap, now_ms, lease_ms));
                (room > 0).then_some((b, room))
            })
    }

    /// Holders of the policy this instance knows, above the limit too (after the limit was
    /// lowered they still count).
    pub(crate) fn in_use(&self, policy: &str) -> usize {
        self.held.get(policy).copied().unwrap_or(0)
    }

    /// The slots held by the copies of a run, `<connection>#<run>`.
    pub(crate) fn held_as(&self, run: &str) -> Vec<SlotRef> {
        let mut held = self.held_by(token_of(run));
        held.retain(|s| run_of(&s.holder) == run);
        held
    }

    /// The slots a connection holds, by its token.
    pub(crate) fn held_by(&self, token: &str) -> Vec<SlotRef> {
        let Some(list) = self.by_connection.get(token) else {
            return Vec::new();
        };
        let mut held = Vec::new();
        for (p, b) in list {
            let Some(s) = self.blocks.get(p).and_then(|m| m.get(b)) else {
                continue;
            };
            for h in &s.block.holders {
                let slot = SlotRef {
                    key: slot_key(p, *b),
                    holder: h.holder.clone(),
                };
                if token_of(&h.holder) == token && !held.contains(&slot) {
                    held.push(slot);
                }
            }
        }
        held
    }
}

/// The connection token of a holder `<connection>#<run>/<copy>`.
pub(crate) fn token_of(holder: &str) -> &str {
    holder.split_once('#').map_or(holder, |(t, _)| t)
}

/// The run of a holder, `<connection>#<run>`: what an undo names. Each copy of an admission
/// (a hedge, a late call) holds under its own `/<copy>`, so a refused copy gives back only
/// its own slots, never those another copy's allow is using.
pub(crate) fn run_of(holder: &str) -> &str {
    holder.split_once('/').map_or(holder, |(r, _)| r)
}

pub(crate) fn slot_key(policy: &str, b: u32) -> String {
    format!("slot.{policy}.{b}")
}

/// The policy of a block's key.
pub(crate) fn policy_of(key: &str) -> Option<&str> {
    parse_slot(key).map(|(p, _)| p)
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

    fn put(v: &mut View, key: &str, holders: &[&str], revision: u64) {
        let block = Block::default().with(holders, 1, u64::MAX);
        v.apply_at(key, Some(&block.encode()), revision);
    }

    #[test]
    fn the_connection_index_follows_admissions_handovers_and_frees() {
        let mut v = View::default();
        put(&mut v, "slot.p.0", &["c1#r1", "c2#r9"], 10);
        put(&mut v, "slot.q.3", &["c1#r1"], 11);
        let keys = |v: &View, t: &str| {
            let mut k: Vec<String> = v.held_by(t).into_iter().map(|s| s.key).collect();
            k.sort();
            k
        };
        assert_eq!(keys(&v, "c1"), ["slot.p.0", "slot.q.3"]);
        assert_eq!(v.held_as("c1#r1").len(), 2);
        assert!(v.held_as("c1#r2").is_empty(), "another run of c1");
        assert_eq!(v.in_use("p"), 2);
        // c1 leaves block p.0, c3 comes in.
        put(&mut v, "slot.p.0", &["c2#r9", "c3#r1"], 12);
        assert_eq!(keys(&v, "c1"), ["slot.q.3"]);
        assert!(v.released_before("c1", 13), "the free is remembered");
        assert!(!v.released_before("c2", 13));
        assert_eq!(v.held_as("c3#r1")[0].key, "slot.p.0");
        // This instance's own older write, applied after the watch's newer change: ignored.
        v.wrote("slot.p.0", Some(Block::default()), 11);
        assert_eq!(v.held_as("c3#r1")[0].key, "slot.p.0");
        assert_eq!(v.live_in_use("p", 2, u64::MAX), 2);
        // A block found gone is forgotten without a release.
        v.forget("slot.p.0");
        assert!(v.held_by("c3").is_empty() && !v.released_before("c3", 100));
        // A stale change is ignored; a delete frees every holder of the block.
        put(&mut v, "slot.q.3", &[], 5);
        assert_eq!(keys(&v, "c1"), ["slot.q.3"]);
        v.apply_at("slot.q.3", None, 14);
        assert!(v.held_by("c1").is_empty());
        assert_eq!(v.in_use("q"), 0);
        assert_eq!(v.in_use("p"), 0, "p.0 was forgotten");
    }

    #[test]
    fn markers_record_closes_and_undos_and_late_admissions_are_noticed() {
        let mut v = View::default();
        assert_eq!(gone_key("c1"), "slot._gone.c1");
        assert_eq!(undone_key("c2#r7"), "slot._gone.c2.r7");
        v.apply_at(&gone_key("c1"), Some(b""), 5);
        v.apply_at(&undone_key("c2#r7"), Some(b""), 6);
        assert!(v.released_before("c1", 6) && !v.released_before("c1", 5));
        assert!(
            !v.released_before("c2", 100),
            "an undo frees the run, not the connection"
        );
        assert!(v.is_undone("c2#r7/0a1b2c3d") && v.is_undone("c2#r7"));
        assert!(!v.is_undone("c2#r8/0a1b2c3d"), "another run of c2");
        // Copies of the run are one run to an undo, each its own holder to a release.
        let block = Block::default().with(
            &["c2#r7/aa", "c2#r7/bb", "c2#r8/cc", "c1#r1/dd", "c3#r1/ee"],
            1,
            u64::MAX,
        );
        // A load finds them without noticing: it may have jumped past their release.
        let mut loaded = View::default();
        loaded.apply_at(&gone_key("c1"), Some(b""), 5);
        loaded.apply_at("slot.p.0", Some(&block.encode()), 7);
        assert!(loaded.take_late().is_empty());
        v.apply_change("slot.p.0", Some(&block.encode()), 7);
        let mut holders: Vec<String> = v.take_late().into_iter().map(|s| s.holder).collect();
        holders.sort();
        assert_eq!(
            holders,
            ["c1#r1/dd", "c2#r7/aa", "c2#r7/bb"],
            "admitted after their release"
        );
        assert!(v.take_late().is_empty());
        assert_eq!(v.held_as("c2#r7").len(), 2);
        // This instance's own write is checked by its admission, not noticed here.
        v.wrote(
            "slot.p.1",
            Some(Block::default().with(&["c1#r2/ff"], 1, u64::MAX)),
            8,
        );
        assert!(v.take_late().is_empty());
    }

    #[test]
    fn a_reload_records_the_releases_made_while_the_watch_was_away() {
        let mut v = View::default();
        put(&mut v, "slot.p.0", &["c1#r/a", "c2#r/b"], 3);
        put(&mut v, "slot.p.1", &["c3#r/c"], 4);
        let mut keys = v.block_keys();
        keys.sort();
        assert_eq!(keys, ["slot.p.0", "slot.p.1"]);
        // The reload finds p.0 with c2 only and p.1 gone: as the watch does, apply both.
        put(&mut v, "slot.p.0", &["c2#r/b"], 9);
        v.apply_at("slot.p.1", None, 10);
        assert!(v.released_before("c1", 10) && v.released_before("c3", 11));
        assert!(!v.released_before("c2", 11));
        assert_eq!(v.in_use("p"), 1);
    }

    #[test]
    fn room_is_looked_for_from_the_start_block_on() {
        let mut v = View::default();
        let sixteen: Vec<String> = (0..16).map(|i| format!("c{i}#r")).collect();
        let refs: Vec<&str> = sixteen.iter().map(String::as_str).collect();
        put(&mut v, "slot.p.1", &refs, 1);
        // 40 slots: blocks 0, 1 (full) and 2 (8 slots).
        assert_eq!(v.with_room("p", 40, 1, 2, u64::MAX, &[]), Some((2, 8)));
        assert_eq!(v.with_room("p", 40, 1, 2, u64::MAX, &[2]), Some((0, 16)));
        assert_eq!(v.with_room("p", 17, 1, 2, u64::MAX, &[0]), None);
    }
}
