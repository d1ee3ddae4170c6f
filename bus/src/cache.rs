//! The verdict cache's contract and store. An agent whose answer depends only on some event
//! attributes, some state keys and its policy set says so in its reply's `Policy-Cache` header:
//!
//! ```text
//! Policy-Cache: <policy set fingerprint> attrs=<a,b,...> state=<k,...>
//! ```
//!
//! The fingerprint names the kind's policy set the answer was computed under (see
//! [`fingerprint`]): the dispatcher computes the same from the config bucket, so it can tell
//! an answer made under the policies it knows from one made under older or newer ones. The
//! dispatcher then answers the same inputs from memory while that kind's policies stay the
//! same. An answer without the header is never cached.

use std::collections::HashMap;

use crate::state::{State, Value};

/// What a cacheable answer depended on, besides the event's name and the policy set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// Event attributes, by name; an absent one counts as nil.
    pub attrs: Vec<String>,
    /// State keys (the candidates, say), as the agent received them.
    pub state: Vec<String>,
}

/// What an agent kind declares its answer depended on: static names, so that declaring costs
/// a request nothing but the header itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Declared {
    pub attrs: &'static [&'static str],
    pub state: &'static [&'static str],
}

impl Declared {
    /// The `Policy-Cache` header value for an answer made under policy set `fingerprint`.
    pub fn to_header(&self, fingerprint: &str) -> String {
        render(fingerprint, self.attrs, self.state)
    }
}

fn render<S: AsRef<str>>(fingerprint: &str, attrs: &[S], state: &[S]) -> String {
    let list = |names: &[S]| {
        names
            .iter()
            .map(AsRef::as_ref)
            .collect::<Vec<_>>()
            .join(",")
    };
    format!("{fingerprint} attrs={} state={}", list(attrs), list(state))
}

/// The parsed `Policy-Cache` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheHeader {
    pub fingerprint: String,
    pub inputs: Inputs,
}

impl CacheHeader {
    pub fn to_header(&self) -> String {
        render(&self.fingerprint, &self.inputs.attrs, &self.inputs.state)
    }

    /// `None` for a header that does not parse: the answer is then simply not cached.
    pub fn parse(value: &str) -> Option<CacheHeader> {
        let mut parts = value.split_whitespace();
        let fingerprint = parts.next()?;
        if fingerprint.len() != 32 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let list = |s: &str| -> Vec<String> {
            s.split(',')
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect()
        };
        let (mut attrs, mut state) = (None, None);
        for part in parts {
            if let Some(a) = part.strip_prefix("attrs=") {
                attrs = Some(list(a));
            } else if let Some(s) = part.strip_prefix("state=") {
                state = Some(list(s));
            } else {
                return None;
            }
        }
        Some(CacheHeader {
            fingerprint: fingerprint.to_string(),
            inputs: Inputs {
                attrs: attrs?,
                state: state?,
            },
        })
    }
}

/// A policy document's digest, from which [`fingerprint`] is built.
pub fn digest(value: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, value);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The fingerprint of one kind's policy set: SHA-256 over its keys in order, each with its
/// document's digest, cut to 128 bits, in hex. The same set gives the same fingerprint in any
/// process, whatever order or revision the documents were written in; any change to a document
/// (or one more, or one fewer) gives another.
pub fn fingerprint<'a>(policies: impl IntoIterator<Item = (&'a str, [u8; 32])>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (key, d) in policies {
        ctx.update(&(key.len() as u64).to_be_bytes());
        ctx.update(key.as_bytes());
        ctx.update(&d);
    }
    ctx.finish().as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The cache key of one agent call: the kind, the event, the policy set and the values of the
/// inputs, each as MessagePack. Two calls with the same key get the same answer from a pure
/// kind.
pub fn key(
    kind: &str,
    event: &str,
    fingerprint: &str,
    inputs: &Inputs,
    attributes: &Value,
    state: &State,
) -> Vec<u8> {
    let mut k = Vec::with_capacity(128);
    for s in [kind, event, fingerprint] {
        k.extend_from_slice(s.as_bytes());
        k.push(0);
    }
    let attr = |name: &str| match attributes {
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v),
        _ => None,
    };
    let nil = Value::Nil;
    for name in &inputs.attrs {
        let _ = rmpv::encode::write_value(&mut k, attr(name).unwrap_or(&nil));
    }
    k.push(0xc1); // never valid MessagePack: separates the two lists
    for name in &inputs.state {
        let _ = rmpv::encode::write_value(&mut k, state.get(name).unwrap_or(&nil));
    }
    k
}

/// Bounded memory for verdicts: two generations of at most `capacity / 2` entries each. New
/// entries go to the young one; when it is full, the old one is dropped and the young one
/// becomes old. A hit in the old generation is moved to the young one. So recently used
/// entries stay, as in an LRU, without a list to maintain on every hit.
#[derive(Debug)]
pub struct VerdictCache {
    young: HashMap<Vec<u8>, State>,
    old: HashMap<Vec<u8>, State>,
    half: usize,
    /// Bytes a generation may hold (keys and answers, as [`entry_bytes`] counts them): a
    /// generation ends at `half` entries or at these bytes, whichever comes first, so the cache
    /// holds at most twice both.
    half_bytes: usize,
    young_bytes: usize,
    pub hits: u64,
    pub misses: u64,
}

/// Bytes the cache may hold by default: answers are small (a reason or two), so the entry
/// bound is reached first unless agents answer large patches.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Roughly what an entry costs in memory: its key, its answer's strings and values, and a
/// fixed overhead per map entry and value. Close enough to bound, cheap enough to count on
/// every store.
pub fn entry_bytes(key: &[u8], patch: &State) -> usize {
    fn value(v: &Value) -> usize {
        16 + match v {
            Value::String(s) => s.as_bytes().len(),
            Value::Binary(b) => b.len(),
            Value::Array(items) => items.iter().map(value).sum(),
            Value::Map(entries) => entries.iter().map(|(k, v)| value(k) + value(v)).sum(),
            Value::Ext(_, b) => b.len(),
            _ => 0,
        }
    }
    64 + key.len()
        + patch
            .0
            .iter()
            .map(|(k, v)| 32 + k.len() + value(v))
            .sum::<usize>()
}

impl VerdictCache {
    pub fn new(capacity: usize) -> Self {
        Self::with_max_bytes(capacity, DEFAULT_MAX_BYTES)
    }

    pub fn with_max_bytes(capacity: usize, max_bytes: usize) -> Self {
        VerdictCache {
            young: HashMap::new(),
            old: HashMap::new(),
            half: (capacity / 2).max(1),
            half_bytes: (max_bytes / 2).max(1),
            young_bytes: 0,
            hits: 0,
            misses: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&mut self, key: &[u8]) -> Option<State> {
        if let Some(v) = self.young.get(key) {
            self.hits += 1;
            return Some(v.clone());
        }
        match self.old.remove_entry(key) {
            Some((k, v)) => {
                self.hits += 1;
                self.insert(k, v.clone());
                Some(v)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    pub fn insert(&mut self, key: Vec<u8>, patch: State) {
        let size = entry_bytes(&key, &patch);
        if size > self.half_bytes {
            // Larger than a generation may hold: never kept.
            return;
        }
        let replaced = self.young.get(&key).map(|old| entry_bytes(&key, old));
        if replaced.is_none()
            && (self.young.len() >= self.half || self.young_bytes + size > self.half_bytes)
        {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
        self.young.insert(key, patch);
        self.young_bytes = self.young_bytes - replaced.unwrap_or(0) + size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_holds_at_most_its_bytes_whatever_the_answers_weigh() {
        let answer = |n: usize| {
            let mut p = State::new();
            p.insert("note", "x".repeat(n).as_str());
            p
        };
        let max = 64 * 1024;
        let mut c = VerdictCache::with_max_bytes(1_000_000, max);
        for i in 0..1_000u32 {
            c.insert(i.to_be_bytes().to_vec(), answer(1_000));
        }
        let held: usize = c
            .young
            .iter()
            .chain(c.old.iter())
            .map(|(k, v)| entry_bytes(k, v))
            .sum();
        assert!(held <= max, "{held} bytes held, bound {max}");
        assert!(c.len() > 10, "it still caches: {}", c.len());
        // An answer larger than half the bound is never kept.
        c.insert(b"big".to_vec(), answer(max));
        assert!(c.get(b"big").is_none());
    }

    #[test]
    fn the_header_round_trips_and_anything_else_is_not_cacheable() {
        let h = CacheHeader {
            fingerprint: "0123456789abcdef0123456789abcdef".into(),
            inputs: Inputs {
                attrs: vec!["src_service".into(), "dst_service".into()],
                state: vec!["dst_peers".into()],
            },
        };
        assert_eq!(CacheHeader::parse(&h.to_header()), Some(h.clone()));
        let declared = Declared {
            attrs: &["src_service", "dst_service"],
            state: &["dst_peers"],
        };
        assert_eq!(declared.to_header(&h.fingerprint), h.to_header());
        let none = CacheHeader::parse("0123456789abcdef0123456789abcdef attrs= state=").unwrap();
        assert!(none.inputs.attrs.is_empty() && none.inputs.state.is_empty());
        for bad in [
            "",
            "short attrs=a state=b",
            "0123456789abcdef0123456789abcdef attrs=a",
            "0123456789abcdef0123456789abcdef attrs=a state=b more",
        ] {
            assert_eq!(CacheHeader::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_policy_set_has_one_fingerprint_and_any_change_gives_another() {
        let (a, b) = (digest(b"doc a"), digest(b"doc b"));
        let one = fingerprint([("pol.acl.a", a), ("pol.acl.b", b)]);
        assert_eq!(one, fingerprint([("pol.acl.a", a), ("pol.acl.b", b)]));
        assert_eq!(one.len(), 32);
        assert_ne!(one, fingerprint([("pol.acl.a", a)]));
        assert_ne!(one, fingerprint([("pol.acl.a", a), ("pol.acl.b", a)]));
        assert_ne!(one, fingerprint([("pol.acl.a", a), ("pol.acl.c", b)]));
        assert_ne!(fingerprint([]), one);
    }

    #[test]
    fn keys_differ_by_any_input_and_ignore_the_rest() {
        let inputs = Inputs {
            attrs: vec!["src_service".into()],
            state: vec!["dst_peers".into()],
        };
        let attrs = |src: &str, other: &str| {
            Value::Map(vec![
                ("src_service".into(), src.into()),
                ("connection_id".into(), other.into()),
            ])
        };
        let mut state = State::new();
        state.set_strings("dst_peers", &["p1"]);
        state.insert("run_id", "r1");
        let k = |a: &Value, s: &State, fp: &str| key("acl", "new-connection", fp, &inputs, a, s);
        let base = k(&attrs("web", "c1"), &state, "f1");
        // Attributes and state keys that are not inputs do not matter...
        let mut other_run = state.clone();
        other_run.insert("run_id", "r2");
        assert_eq!(base, k(&attrs("web", "c2"), &other_run, "f1"));
        // ...every input and the policy set do.
        assert_ne!(base, k(&attrs("api", "c1"), &state, "f1"));
        let mut fewer = state.clone();
        fewer.set_strings("dst_peers", &["p1", "p2"]);
        assert_ne!(base, k(&attrs("web", "c1"), &fewer, "f1"));
        assert_ne!(base, k(&attrs("web", "c1"), &state, "f2"));
    }

    #[test]
    fn the_cache_keeps_at_most_its_capacity_and_recent_entries() {
        let mut c = VerdictCache::new(4);
        let patch = State::new();
        for i in 0..100u8 {
            c.insert(vec![i], patch.clone());
            assert!(c.len() <= 4, "{}", c.len());
        }
        // A hit moves an entry back to the young generation, so it outlives newer ones.
        c.insert(vec![200], patch.clone());
        c.insert(vec![201], patch.clone());
        assert!(c.get(&[200]).is_some());
        c.insert(vec![202], patch.clone());
        c.insert(vec![203], patch.clone());
        assert!(c.get(&[200]).is_some());
        // 201, added with it but never used again, is gone; so are the first ones.
        assert!(c.get(&[201]).is_none());
        assert!(c.get(&[0]).is_none());
        assert_eq!((c.hits, c.misses), (2, 2));
    }
}
