//! A block of connection slots: one key of the slot bucket holding up to [`BLOCK`] holders.
//!
//! A policy's `max_connections` slots are cut into blocks (`slot.<policy>.<b>`, block `b`
//! holding slots `16b .. 16b+15` below the limit). Admitting connections is one
//! compare-and-set of a block that adds their holders, so an instance admits every
//! connection waiting for the same block in one write; a block never holds more than its
//! capacity, so the count never passes the limit, exactly as with a key per slot.
//!
//! The value is one line per holder, `<connection>#<run> <since, ms since the epoch>`. The
//! bucket's `max_age` would not expire one holder of a block written again since, so each
//! holder carries when it was admitted (or last renewed), and a holder older than the lease
//! is free: the next write of its block drops it. A line without a time (written by hand, or
//! by an older version) counts as fresh, and goes with the key's `max_age`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Holders per block.
pub const BLOCK: u32 = 16;

/// Wall-clock milliseconds: admission times are compared across instances' hosts.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Blocks of a policy with `max` slots.
pub fn blocks(max: u32) -> u32 {
    max.div_ceil(BLOCK)
}

/// Slots of block `b` under a limit of `max`: 16, fewer in the last block, 0 above the limit.
pub fn capacity(max: u32, b: u32) -> u32 {
    max.saturating_sub(b.saturating_mul(BLOCK)).min(BLOCK)
}

/// A holder of a slot and when it was admitted or last renewed (0: unknown, never expires
/// here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub holder: String,
    pub since_ms: u64,
}

/// The holders of a block as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Block {
    pub holders: Vec<Holder>,
}

/// Holders a block's value may list before the rest is not read: a block takes at most
/// [`BLOCK`], a few more while hedged copies share it. A value with more (not written by
/// conn-limit) is read as this many holders that never expire: the block is full, and the
/// limiter denies rather than count what it does not read.
pub const MAX_HOLDERS: usize = 4 * BLOCK as usize;
/// Bytes of one holder read: conn-limit's own are about 50.
pub const MAX_HOLDER_BYTES: usize = 256;

impl Block {
    pub fn decode(value: &[u8]) -> Block {
        let text = String::from_utf8_lossy(value);
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let read: Vec<&str> = lines.by_ref().take(MAX_HOLDERS).collect();
        if lines.next().is_some() {
            return Block {
                holders: (0..MAX_HOLDERS)
                    .map(|i| Holder {
                        holder: format!("_overfull.{i}"),
                        since_ms: 0,
                    })
                    .collect(),
            };
        }
        let holders = read
            .into_iter()
            .map(|line| {
                let mut end = line.len().min(MAX_HOLDER_BYTES);
                while !line.is_char_boundary(end) {
                    end -= 1;
                }
                &line[..end]
            })
            .map(|line| match line.rsplit_once(' ') {
                Some((holder, since)) if since.parse::<u64>().is_ok() => Holder {
                    holder: holder.trim().to_string(),
                    since_ms: since.parse().unwrap_or(0),
                },
                _ => Holder {
                    holder: line.trim().to_string(),
                    since_ms: 0,
                },
            })
            .collect();
        Block { holders }
    }

    pub fn encode(&self) -> bytes::Bytes {
        let mut out = String::with_capacity(self.holders.len() * 48);
        for h in &self.holders {
            out.push_str(&h.holder);
            out.push(' ');
            out.push_str(&h.since_ms.to_string());
            out.push('\n');
        }
        out.into()
    }

    pub fn holds(&self, holder: &str) -> bool {
        self.holders.iter().any(|h| h.holder == holder)
    }

    fn live(h: &Holder, now_ms: u64, lease_ms: u64) -> bool {
        h.since_ms == 0 || now_ms.saturating_sub(h.since_ms) < lease_ms
    }

    /// Holders not past the lease.
    pub fn live_count(&self, now_ms: u64, lease_ms: u64) -> u32 {
        self.holders
            .iter()
            .filter(|h| Self::live(h, now_ms, lease_ms))
            .count() as u32
    }

    /// Slots left under `capacity`.
    pub fn room(&self, capacity: u32, now_ms: u64, lease_ms: u64) -> u32 {
        capacity.saturating_sub(self.live_count(now_ms, lease_ms))
    }

    /// The block with `new` holders added at `now_ms`, holders past the lease dropped.
    pub fn with(&self, new: &[&str], now_ms: u64, lease_ms: u64) -> Block {
        let mut holders: Vec<Holder> = self
            .holders
            .iter()
            .filter(|h| Self::live(h, now_ms, lease_ms))
            .cloned()
            .collect();
        holders.extend(new.iter().map(|h| Holder {
            holder: h.to_string(),
            since_ms: now_ms,
        }));
        Block { holders }
    }

    /// The block without `holder` (and without holders past the lease).
    pub fn without(&self, holder: &str, now_ms: u64, lease_ms: u64) -> Block {
        Block {
            holders: self
                .holders
                .iter()
                .filter(|h| h.holder != holder && Self::live(h, now_ms, lease_ms))
                .cloned()
                .collect(),
        }
    }

    /// The block with `holder`'s time set to `now_ms`.
    pub fn renewed(&self, holder: &str, now_ms: u64) -> Block {
        let mut b = self.clone();
        for h in &mut b.holders {
            if h.holder == holder {
                h.since_ms = now_ms;
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_value_with_more_holders_than_a_block_takes_reads_as_full() {
        let many: String = (0..1000).map(|i| format!("c{i}#r {i}\n")).collect();
        let b = Block::decode(many.as_bytes());
        assert_eq!(b.holders.len(), MAX_HOLDERS);
        assert_eq!(b.room(BLOCK, u64::MAX, 1), 0, "full, never expiring");
        let long = format!("{} 5\n", "x".repeat(10_000));
        assert!(Block::decode(long.as_bytes()).holders[0].holder.len() <= MAX_HOLDER_BYTES);
    }

    use super::*;

    #[test]
    fn blocks_cut_the_limit_into_sixteens() {
        assert_eq!((blocks(1), capacity(1, 0)), (1, 1));
        assert_eq!(blocks(40), 3);
        assert_eq!(
            (capacity(40, 0), capacity(40, 1), capacity(40, 2)),
            (16, 16, 8)
        );
        assert_eq!(capacity(40, 3), 0, "above the limit");
        assert_eq!((0..blocks(40)).map(|b| capacity(40, b)).sum::<u32>(), 40);
    }

    #[test]
    fn a_block_round_trips_and_reads_a_bare_holder_as_fresh() {
        let b = Block::default().with(&["c1#r1", "c2#r1"], 1_000, 60_000);
        assert_eq!(Block::decode(&b.encode()), b);
        let bare = Block::decode(b"gw-1#elsewhere");
        assert_eq!(bare.holders[0].holder, "gw-1#elsewhere");
        assert_eq!(bare.live_count(u64::MAX, 1), 1);
    }

    #[test]
    fn holders_past_the_lease_leave_room_and_go_with_the_next_write() {
        let lease = 1_000;
        let b = Block::default()
            .with(&["old#1"], 100, lease)
            .with(&["new#1"], 900, lease);
        assert_eq!(b.room(2, 950, lease), 0);
        assert_eq!(b.room(2, 1_100, lease), 1, "old#1 is past the lease");
        let next = b.with(&["c#1"], 1_100, lease);
        assert!(!next.holds("old#1") && next.holds("new#1") && next.holds("c#1"));
        let renewed = b.renewed("old#1", 999);
        assert_eq!(renewed.room(2, 1_500, lease), 0);
        assert!(!b.without("new#1", 950, lease).holds("new#1"));
    }
}
