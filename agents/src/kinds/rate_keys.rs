//! How many distinct keys a rate policy counts apart. Keys are built from attribute values a
//! hookpoint sends (a source service, a peer), so without a bound a stream of made-up names
//! would grow the shared bucket and this instance's memory for ever. Each instance tracks at
//! most `max_keys` keys per policy (idle ones are forgotten after the bucket's expiry); a new
//! key past that shares one `_overflow` budget with every other new key, which can only make
//! the limit stricter for them.

use std::collections::HashMap;
use std::sync::Mutex;

/// The key suffix every untracked key of a full policy shares. `key_token` never yields it
/// (tokens are `[A-Za-z0-9_-]` names without a leading `_`, or `h<hex>`).
pub const OVERFLOW: &str = "_overflow";

/// The keys this instance counts per policy, with when each was last used.
pub struct KeySet {
    idle_ns: u64,
    inner: Mutex<HashMap<String, Tracked>>,
}

#[derive(Default)]
struct Tracked {
    last_used: HashMap<String, u64>,
    /// When idle keys were last swept, so a full set is not swept on every request.
    swept_ns: u64,
}

impl KeySet {
    pub fn new(idle_ns: u64) -> Self {
        KeySet {
            idle_ns,
            inner: Mutex::new(HashMap::new()),
        }
    }

    /// The key [`KeySet::key`] would give, changing nothing: for a dry run, which must not
    /// fill a policy's keys or keep one alive.
    pub fn peek(&self, policy: &str, token: String, max_keys: usize) -> String {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let tracked = inner.get(policy);
        let known = tracked.is_some_and(|t| t.last_used.contains_key(&token));
        let full = tracked.is_some_and(|t| t.last_used.len() >= max_keys);
        if !known && full {
            format!("{policy}.{OVERFLOW}")
        } else {
            format!("{policy}.{token}")
        }
    }

    /// The bucket key for `token` under `policy`: `<policy>.<token>` while the policy tracks
    /// fewer than `max_keys` keys (or already tracks this one), else `<policy>._overflow`.
    pub fn key(&self, policy: &str, token: String, max_keys: usize, now_ns: u64) -> String {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let tracked = inner.entry(policy.to_string()).or_default();
        if let Some(used) = tracked.last_used.get_mut(&token) {
            *used = now_ns;
            return format!("{policy}.{token}");
        }
        // Sweeping idle keys costs a pass over the set: at most once a minute.
        if tracked.last_used.len() >= max_keys
            && now_ns.saturating_sub(tracked.swept_ns) >= 60_000_000_000
        {
            let idle = self.idle_ns;
            tracked
                .last_used
                .retain(|_, used| now_ns.saturating_sub(*used) < idle);
            tracked.swept_ns = now_ns;
        }
        if tracked.last_used.len() >= max_keys {
            return format!("{policy}.{OVERFLOW}");
        }
        tracked.last_used.insert(token.clone(), now_ns);
        format!("{policy}.{token}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000_000_000;

    #[test]
    fn past_the_bound_new_keys_share_the_overflow_until_idle_ones_expire() {
        let set = KeySet::new(24 * HOUR);
        let mut now = 1;
        assert_eq!(set.key("p", "a".into(), 2, now), "p.a");
        assert_eq!(set.key("p", "b".into(), 2, now), "p.b");
        assert_eq!(set.key("p", "c".into(), 2, now), "p._overflow");
        assert_eq!(
            set.key("p", "a".into(), 2, now),
            "p.a",
            "a tracked key keeps its own"
        );
        assert_eq!(
            set.key("q", "c".into(), 2, now),
            "q.c",
            "bounds are per policy"
        );
        // b idles past the expiry while a is used: c gets b's place.
        now += 20 * HOUR;
        set.key("p", "a".into(), 2, now);
        now += 5 * HOUR;
        assert_eq!(set.key("p", "c".into(), 2, now), "p.c");
        assert_eq!(set.key("p", "d".into(), 2, now), "p._overflow");
    }
}
