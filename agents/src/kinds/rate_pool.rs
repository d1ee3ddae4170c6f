//! The rate limiter's local pools: tokens an instance took from a key's shared GCRA entry in
//! one write (an *allotment*) and spends without touching the bucket again.
//!
//! Sizing is the whole trick. An allotment covers about [`REFILL_EVERY`] of the demand this
//! instance sees on the key (or as many requests as waited on the last refill), so a busy key
//! costs one write per refill instead of one per admission. It never exceeds
//! [`MAX_ALLOTMENT`] nor [`HELD_FOR`] worth of the policy's rate, and never more than a
//! quarter (rounded up) of the tokens the shared entry still has: near the limit every
//! allotment is one token, and the limiter is as exact as a compare-and-set per admission.
//! Tokens an instance holds but never spends are lost with it, which only makes the limit
//! stricter.
//!
//! The bound over any window `W` becomes `rate × W + burst + 1 + instances × A`, with
//! `A = allotment_cap(gcra)`: GCRA bounds what all instances take from the bucket, and tokens
//! taken before the window and spent in it are at most one allotment per instance.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::rate::Gcra;

/// The demand an allotment should cover.
pub const REFILL_EVERY: Duration = Duration::from_millis(20);
/// The most tokens one allotment holds, whatever the rate.
pub const MAX_ALLOTMENT: u64 = 256;
/// The most of a policy's rate one allotment holds: the budget an idle instance can sit on.
pub const HELD_FOR: Duration = Duration::from_millis(50);
/// How long demand is counted before the estimate is updated.
const DEMAND_WINDOW_NS: u64 = 100_000_000;

/// The largest allotment for a policy: `min(256, rate × 50 ms)`, at least 1.
pub fn allotment_cap(gcra: &Gcra) -> u64 {
    (HELD_FOR.as_nanos() as u64 / gcra.period_ns.max(1)).clamp(1, MAX_ALLOTMENT)
}

/// Tokens the shared entry at `tat` still has at `now`: `Err(ns until one conforms)` when none.
pub fn available(gcra: &Gcra, tat: Option<u64>, now: u64) -> Result<u64, u64> {
    let tat = tat.unwrap_or(now).max(now);
    let ahead = tat - now;
    if ahead > gcra.tau_ns {
        Err(ahead - gcra.tau_ns)
    } else {
        Ok((gcra.tau_ns - ahead) / gcra.period_ns.max(1) + 1)
    }
}

/// Takes up to `want` tokens from the entry at `tat`: `Ok((tokens, new TAT))`, or the wait
/// until one conforms. Each token taken is exactly a GCRA admission at `now`, so the bucket's
/// own bound holds for tokens as it does for connections.
pub fn grant(gcra: &Gcra, tat: Option<u64>, now: u64, want: u64) -> Result<(u64, u64), u64> {
    let free = available(gcra, tat, now)?;
    // Leave most of what is left to the other instances: near the limit, one at a time.
    let n = want
        .clamp(1, allotment_cap(gcra))
        .min(free.div_ceil(4))
        .max(1);
    let start = tat.unwrap_or(now).max(now);
    Ok((n, start.saturating_add(n.saturating_mul(gcra.period_ns))))
}

/// Why a token could not be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Over the policy's rate.
    Over,
    /// The shared state could not be read or written: fail closed.
    Unavailable(String),
}

/// One key's tokens on this instance.
pub struct Pool {
    /// The policy these tokens were taken under: another one (a changed policy) starts afresh.
    pub gcra: Gcra,
    tokens: u64,
    /// Until when the shared entry is known to refuse (its TAT only moves on).
    denied_until_ns: u64,
    refilling: bool,
    /// Requests waiting on the refill under way.
    waiting: u64,
    /// Requests that waited on the last refill: the next one takes enough for them too.
    backlog: u64,
    refilled: Arc<Notify>,
    /// What the last refill came to, for the requests that waited on it.
    last: Option<Refusal>,
    window_start_ns: u64,
    window_count: u64,
    /// Requests per second this instance sees on the key.
    demand: f64,
}

/// What a request should do next with a pool.
pub enum Next {
    /// A token was spent.
    Spent,
    /// The key is over its rate, or the refill just waited on failed.
    Refused(Refusal),
    /// Another request is refilling: wait for it, then look again.
    Wait(Arc<Notify>),
    /// This request refills, taking up to this many tokens.
    Refill(u64),
}

impl Pool {
    pub fn new(gcra: Gcra) -> Self {
        Pool {
            gcra,
            tokens: 0,
            denied_until_ns: 0,
            refilling: false,
            waiting: 0,
            backlog: 0,
            refilled: Arc::new(Notify::new()),
            last: None,
            window_start_ns: 0,
            window_count: 0,
            demand: 0.0,
        }
    }

    /// Tokens this instance holds for the key.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Counts a new request in the demand estimate.
    pub fn arrived(&mut self, now: u64) {
        self.window_count += 1;
        let span = now.saturating_sub(self.window_start_ns);
        if span >= DEMAND_WINDOW_NS {
            let seen = self.window_count as f64 / (span as f64 / 1e9);
            // A key idle for long starts again from what it sees now.
            self.demand = if self.demand == 0.0 || span > 10 * DEMAND_WINDOW_NS {
                seen
            } else {
                (self.demand + seen) / 2.0
            };
            self.window_start_ns = now;
            self.window_count = 0;
        }
    }

    /// The next step for a request at `now`; `woken` when it waited on a refill.
    pub fn next(&mut self, now: u64, woken: bool) -> Next {
        if self.tokens > 0 {
            self.tokens -= 1;
            return Next::Spent;
        }
        if now < self.denied_until_ns {
            return Next::Refused(Refusal::Over);
        }
        if woken {
            if let Some(refusal) = &self.last {
                return Next::Refused(refusal.clone());
            }
        }
        if self.refilling {
            self.waiting += 1;
            return Next::Wait(self.refilled.clone());
        }
        self.refilling = true;
        let demand = (self.demand * REFILL_EVERY.as_secs_f64()).ceil() as u64;
        Next::Refill(demand.max(self.backlog + 1))
    }

    /// A refill came back: `Ok(tokens)` taken (one of them is the refiller's), or why not.
    pub fn refilled(&mut self, now: u64, outcome: Result<u64, (Refusal, u64)>) {
        self.refilling = false;
        self.backlog = std::mem::take(&mut self.waiting);
        match outcome {
            Ok(n) => {
                self.keep(n.saturating_sub(1));
                self.last = None;
            }
            Err((refusal, wait_ns)) => {
                if refusal == Refusal::Over {
                    self.denied_until_ns = now.saturating_add(wait_ns);
                }
                self.last = Some(refusal);
            }
        }
        self.refilled.notify_waiters();
    }

    /// The refilling request was dropped before its write came back: the requests waiting on it
    /// look again, and one of them refills.
    pub fn abandoned(&mut self) {
        self.refilling = false;
        self.waiting = 0;
        self.last = None;
        self.refilled.notify_waiters();
    }

    /// A token the request took but does not need after all (another policy refused it).
    pub fn give_back(&mut self) {
        self.keep(1);
    }

    /// Adds tokens, never holding more than one allotment: tokens over that (given back while
    /// a refill came in) are dropped, the strict side, so the documented bound holds.
    fn keep(&mut self, n: u64) {
        self.tokens = (self.tokens + n).min(allotment_cap(&self.gcra));
    }

    /// Whether dropping the pool loses nothing but tokens (which is the strict side).
    pub fn idle(&self) -> bool {
        !self.refilling
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::rate::Rate;

    fn gcra(rate: &str, burst: u32) -> Gcra {
        Gcra::new(Rate::try_from(rate.to_string()).unwrap(), burst)
    }

    #[test]
    fn the_cap_is_fifty_milliseconds_of_the_rate_between_one_and_256() {
        assert_eq!(allotment_cap(&gcra("20/s", 5)), 1);
        assert_eq!(allotment_cap(&gcra("1000/s", 0)), 50);
        assert_eq!(allotment_cap(&gcra("1000000/s", 0)), MAX_ALLOTMENT);
    }

    #[test]
    fn far_from_the_limit_an_allotment_covers_the_demand_near_it_one_token() {
        let g = gcra("1000/s", 999);
        let now = 10_000_000_000;
        // A full budget of 1000: the want, up to the cap.
        assert_eq!(grant(&g, None, now, 30).unwrap().0, 30);
        assert_eq!(grant(&g, None, now, 500).unwrap().0, 50);
        // 8 left: a quarter of them.
        let tat = now + (g.tau_ns - 7 * g.period_ns);
        assert_eq!(available(&g, Some(tat), now), Ok(8));
        assert_eq!(grant(&g, Some(tat), now, 30).unwrap().0, 2);
        // 1 left: one.
        let tat = now + g.tau_ns;
        assert_eq!(grant(&g, Some(tat), now, 30).unwrap().0, 1);
        // None left: how long until one.
        assert_eq!(
            grant(&g, Some(tat + g.period_ns), now, 30),
            Err(g.period_ns)
        );
    }

    /// Instances taking allotments at random moments from one shared entry, each spending its
    /// tokens whenever it likes: over any window, admissions stay within
    /// `rate × W + burst + 1 + instances × cap`.
    #[test]
    fn allotments_spent_late_stay_within_the_documented_bound() {
        let g = gcra("1000/s", 20);
        let cap = allotment_cap(&g);
        let instances = 3u64;
        let mut tat: Option<u64> = None;
        let mut held = vec![0u64; instances as usize];
        let mut admitted: Vec<u64> = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut now = 1_000_000_000u64;
        for _ in 0..200_000 {
            now += rand() % 200_000; // 0–200 µs between arrivals: far over the rate
            let i = (rand() % instances) as usize;
            if held[i] == 0 {
                if let Ok((n, new_tat)) = grant(&g, tat, now, rand() % 300) {
                    tat = Some(new_tat);
                    held[i] = n;
                }
            }
            // Spend now, or sit on the tokens for a while (up to the whole allotment).
            if held[i] > 0 && rand() % 3 != 0 {
                held[i] -= 1;
                admitted.push(now);
            }
        }
        let bound =
            |w_ns: u64| w_ns as f64 / g.period_ns as f64 + 20.0 + 1.0 + (instances * cap) as f64;
        for w_ms in [1u64, 10, 50, 200, 1000] {
            let w = w_ms * 1_000_000;
            let (mut lo, mut worst) = (0usize, 0usize);
            for hi in 0..admitted.len() {
                while admitted[hi] - admitted[lo] >= w {
                    lo += 1;
                }
                worst = worst.max(hi - lo + 1);
            }
            assert!(
                worst as f64 <= bound(w),
                "{worst} admitted within {w_ms} ms, bound {:.0}",
                bound(w)
            );
        }
    }

    #[test]
    fn one_request_refills_while_the_others_wait_and_then_share_its_tokens() {
        let mut p = Pool::new(gcra("1000/s", 100));
        let now = 1;
        p.arrived(now);
        let Next::Refill(want) = p.next(now, false) else {
            panic!("the first request refills")
        };
        assert_eq!(want, 1, "no demand seen yet");
        for _ in 0..3 {
            assert!(matches!(p.next(now, false), Next::Wait(_)));
        }
        // The next refill covers the three that waited too.
        p.refilled(now, Ok(4));
        for _ in 0..3 {
            assert!(matches!(p.next(now, true), Next::Spent));
        }
        // The next refill also covers as many as waited on the last one.
        assert!(matches!(p.next(now, false), Next::Refill(4)));
    }

    #[test]
    fn a_pool_never_holds_more_than_one_allotment() {
        let g = gcra("1000/s", 100);
        let mut p = Pool::new(g);
        assert!(matches!(p.next(0, false), Next::Refill(_)));
        // Requests refused by another policy give their tokens back while the refill runs.
        for _ in 0..200 {
            p.give_back();
        }
        p.refilled(0, Ok(allotment_cap(&g)));
        let mut spent = 0;
        while let Next::Spent = p.next(0, false) {
            spent += 1;
        }
        assert_eq!(spent, allotment_cap(&g));
    }

    #[test]
    fn over_the_rate_the_pool_refuses_locally_until_a_token_conforms() {
        let mut p = Pool::new(gcra("10/s", 0));
        assert!(matches!(p.next(0, false), Next::Refill(_)));
        assert!(matches!(p.next(0, false), Next::Wait(_)));
        p.refilled(0, Err((Refusal::Over, 50_000_000)));
        // The waiter is told, and so is a newcomer before the wait is over; not after it.
        assert!(matches!(p.next(1, true), Next::Refused(Refusal::Over)));
        assert!(matches!(
            p.next(49_999_999, false),
            Next::Refused(Refusal::Over)
        ));
        assert!(matches!(p.next(50_000_000, false), Next::Refill(_)));
    }

    #[test]
    fn a_failed_refill_fails_its_waiters_closed_and_the_next_request_tries_again() {
        let mut p = Pool::new(gcra("10/s", 0));
        assert!(matches!(p.next(0, false), Next::Refill(_)));
        assert!(matches!(p.next(0, false), Next::Wait(_)));
        p.refilled(0, Err((Refusal::Unavailable("down".into()), 0)));
        assert!(matches!(
            p.next(0, true),
            Next::Refused(Refusal::Unavailable(_))
        ));
        assert!(matches!(p.next(0, false), Next::Refill(_)));
    }

    #[test]
    fn demand_sizes_the_next_allotment() {
        let mut p = Pool::new(gcra("1000000/s", 1000));
        // 5000 requests/s for 200 ms.
        for i in 0..1000u64 {
            p.arrived(i * 200_000);
        }
        let Next::Refill(want) = p.next(200_000_000, false) else {
            panic!("refill")
        };
        assert!(
            (90..=110).contains(&want),
            "20 ms of 5000/s is about 100, got {want}"
        );
    }
}
