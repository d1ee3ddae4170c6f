//! The verdict cache (see [`bus::cache`]): answers of pure agent kinds, kept by their inputs and
//! the kind's policy set, so a repeated event costs no call to them.
//!
//! Exactness: every entry is keyed by the fingerprint of the kind's policy set, and this
//! dispatcher computes the current fingerprint from the config bucket, on the same watch that
//! sees every policy change. An answer is stored only if the agent computed it under the set
//! this dispatcher knows now, and looked up only under the set it knows now. So once this
//! dispatcher has seen a policy change, no answer made before it is served again; and an admin
//! command through this dispatcher returns only once it has seen its own write.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, RwLock};

use bus::cache::{CacheHeader, Inputs, VerdictCache};
use bus::config::ConfigKey;
use bus::watch::{Change, Update};
use bus::{State, Value};

/// A kind's policy documents (key → digest) and the set's fingerprint.
type PolicySet = (BTreeMap<String, [u8; 32]>, String);

pub struct Verdicts {
    /// `None` when the cache is off (`--verdict-cache 0`).
    cache: Option<Mutex<VerdictCache>>,
    /// Per kind: each policy key's document digest, and the set's fingerprint.
    policies: RwLock<HashMap<String, PolicySet>>,
    /// Per kind, per event: the inputs the kind's answers depend on, as it last said. Nested,
    /// so a lookup borrows the names it is given instead of building a key.
    inputs: RwLock<HashMap<String, HashMap<String, Inputs>>>,
    /// The bucket revision the fingerprints reflect.
    revision: tokio::sync::watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Verdicts {
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Verdicts {
            cache: (capacity > 0)
                .then(|| Mutex::new(VerdictCache::with_max_bytes(capacity, max_bytes))),
            policies: RwLock::default(),
            inputs: RwLock::default(),
            revision: tokio::sync::watch::Sender::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// Calls `f` with the current fingerprint of a kind's policy set (of the empty set for a
    /// kind with none), under the read lock: nothing is copied per call.
    fn with_fingerprint<R>(&self, kind: &str, f: impl FnOnce(&str) -> R) -> R {
        static EMPTY: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| bus::cache::fingerprint([]));
        let policies = self.policies.read().unwrap_or_else(|e| e.into_inner());
        f(policies.get(kind).map_or(EMPTY.as_str(), |(_, fp)| fp))
    }

    #[cfg(test)]
    fn fingerprint(&self, kind: &str) -> String {
        self.with_fingerprint(kind, str::to_string)
    }

    /// A cached answer of `kind` to this call, if there is one.
    pub fn lookup(
        &self,
        kind: &str,
        event: &str,
        attributes: &Value,
        state: &State,
    ) -> Option<State> {
        let cache = self.cache.as_ref()?;
        let key = {
            let known = self.inputs.read().unwrap_or_else(|e| e.into_inner());
            let inputs = known.get(kind)?.get(event)?;
            self.with_fingerprint(kind, |fp| {
                bus::cache::key(kind, event, fp, inputs, attributes, state)
            })
        };
        lock(cache).get(&key)
    }

    /// Keeps an answer that says it may be cached (`header`), if it was made under the policy
    /// set this dispatcher knows now. `state` is the state the agent was sent.
    pub fn store(
        &self,
        kind: &str,
        event: &str,
        header: &str,
        attributes: &Value,
        state: &State,
        patch: &State,
    ) {
        let Some(cache) = self.cache.as_ref() else {
            return;
        };
        let Some(h) = CacheHeader::parse(header) else {
            tracing::debug!(
                agent = kind,
                header,
                "unreadable Policy-Cache header: not cached"
            );
            return;
        };
        if !self.with_fingerprint(kind, |fp| fp == h.fingerprint) {
            // Made under another policy set than the one known here: an agent behind or ahead
            // of this dispatcher's watch. Used this once, never kept.
            return;
        }
        let key = bus::cache::key(kind, event, &h.fingerprint, &h.inputs, attributes, state);
        {
            let mut known = self.inputs.write().unwrap_or_else(|e| e.into_inner());
            let per_event = known.entry(kind.to_string()).or_default();
            if per_event.get(event) != Some(&h.inputs) {
                per_event.insert(event.to_string(), h.inputs);
            }
        }
        lock(cache).insert(key, patch.clone());
    }

    /// Hits and misses so far, and entries held.
    pub fn counts(&self) -> Option<(u64, u64, usize)> {
        let c = lock(self.cache.as_ref()?);
        Some((c.hits, c.misses, c.len()))
    }

    /// Follows the config bucket's policies: the fingerprints change with every write.
    pub fn apply(&self, update: Update<'_>) {
        let mut policies = self.policies.write().unwrap_or_else(|e| e.into_inner());
        let mut touched = Vec::new();
        let revision = match update {
            Update::Loaded(snap) => {
                policies.clear();
                for (key, value) in &snap.values {
                    if let Some(ConfigKey::Policy { kind, .. }) = ConfigKey::parse(key) {
                        let entry = policies.entry(kind.clone()).or_default();
                        entry.0.insert(key.clone(), bus::cache::digest(value));
                        touched.push(kind);
                    }
                }
                snap.revision
            }
            Update::Changed(changes) => {
                let mut last = 0;
                for c in changes {
                    last = last.max(c.revision());
                    let Some(ConfigKey::Policy { kind, .. }) = ConfigKey::parse(c.key()) else {
                        continue;
                    };
                    let entry = policies.entry(kind.clone()).or_default();
                    match c {
                        Change::Put { key, value, .. } => {
                            entry.0.insert(key.clone(), bus::cache::digest(value));
                        }
                        Change::Delete { key, .. } => {
                            entry.0.remove(key);
                        }
                    }
                    touched.push(kind);
                }
                last
            }
        };
        touched.sort();
        touched.dedup();
        for kind in touched {
            if let Some((docs, fp)) = policies.get_mut(&kind) {
                *fp = bus::cache::fingerprint(docs.iter().map(|(k, d)| (k.as_str(), *d)));
            }
        }
        drop(policies);
        self.revision.send_modify(|r| *r = (*r).max(revision));
    }

    /// The bucket revision this dispatcher's watch has applied.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// Waits (briefly) until the fingerprints reflect bucket revision `revision`.
    pub async fn seen(&self, revision: u64) {
        let mut seen = self.revision.subscribe();
        let _ = tokio::time::timeout(
            bus::config::WRITE_TIMEOUT,
            seen.wait_for(|r| *r >= revision),
        )
        .await;
    }
}

/// Waits until every dispatcher has seen bucket revision `revision` (a policy change this one
/// just stored), so that none serves a verdict of the old policy set once the change is
/// acknowledged. Each dispatcher answers on a plain subscription (see [`confirm`]); the count
/// to wait for comes from `$SRV.PING`. Bounded: a dispatcher that does not confirm within 1 s
/// (stopping, cut off) is logged, and its watch still applies the change moments later.
pub(crate) async fn everywhere(d: &crate::Dispatcher, revision: u64) {
    // The whole wait fits well inside an operator's 5 s command timeout, after the write
    // itself: the change is stored either way, and the dispatchers' watches apply it anyway.
    let confirmed = std::sync::atomic::AtomicUsize::new(0);
    let count = std::sync::atomic::AtomicUsize::new(0);
    let done = tokio::time::timeout(
        CONFIRM_WITHIN,
        confirmed_everywhere(d, revision, &count, &confirmed),
    )
    .await;
    if done.is_err() {
        tracing::warn!(
            revision,
            confirmed = confirmed.into_inner(),
            count = count.into_inner(),
            "not every dispatcher confirmed a policy change within 1 s; their watches apply it when they can"
        );
    }
}

/// How long a policy change waits for the dispatchers to confirm it.
const CONFIRM_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

async fn confirmed_everywhere(
    d: &crate::Dispatcher,
    revision: u64,
    count_out: &std::sync::atomic::AtomicUsize,
    confirmed_out: &std::sync::atomic::AtomicUsize,
) {
    use futures::StreamExt;
    use std::sync::atomic::Ordering::Relaxed;
    d.verdicts.seen(revision).await;
    if !d.verdicts.enabled() {
        return;
    }
    let window = std::time::Duration::from_millis(100);
    let Ok(count) =
        bus::client::count_instances(&d.nats, bus::headers::DISPATCHER_SERVICE, window).await
    else {
        return;
    };
    if count <= 1 {
        return;
    }
    let inbox = d.nats.new_inbox();
    let Ok(mut replies) = d.nats.subscribe(inbox.clone()).await else {
        return;
    };
    let asked = d
        .nats
        .publish_with_reply(
            d.subjects.dispatchers_seen(),
            inbox,
            revision.to_string().into(),
        )
        .await;
    if asked.is_err() {
        return;
    }
    count_out.store(count, Relaxed);
    let mut confirmed = 0;
    while confirmed < count {
        if replies.next().await.is_none() {
            return;
        }
        confirmed += 1;
        confirmed_out.store(confirmed, Relaxed);
    }
}

/// Answers [`everywhere`]'s question for this dispatcher: once its fingerprints reflect the
/// revision asked about.
pub(crate) async fn confirm(
    d: std::sync::Arc<crate::Dispatcher>,
    mut asks: async_nats::Subscriber,
) {
    use futures::StreamExt;
    while let Some(msg) = asks.next().await {
        let (Some(reply), Some(revision)) = (
            msg.reply,
            std::str::from_utf8(&msg.payload)
                .ok()
                .and_then(|s| s.parse::<u64>().ok()),
        ) else {
            continue;
        };
        if !bus::subject::is_inbox(&reply) {
            daemon::service::refuse_reply("dispatcher-seen", &msg.subject, &reply, None);
            continue;
        }
        let d = d.clone();
        tokio::spawn(async move {
            d.verdicts.seen(revision).await;
            let _ = d.nats.publish(reply, bytes::Bytes::new()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus::watch::Snapshot;

    fn put(key: &str, value: &[u8], revision: u64) -> Change {
        Change::Put {
            key: key.into(),
            value: value.to_vec().into(),
            revision,
        }
    }

    #[test]
    fn a_policy_change_makes_every_older_answer_unreachable() {
        let v = Verdicts::new(100, bus::cache::DEFAULT_MAX_BYTES);
        v.apply(Update::Loaded(&Snapshot {
            values: [("pol.acl.a".to_string(), bytes::Bytes::from_static(b"one"))].into(),
            revision: 1,
            ..Default::default()
        }));
        let fp = v.fingerprint("acl");
        let header = CacheHeader {
            fingerprint: fp.clone(),
            inputs: Inputs {
                attrs: vec!["src_service".into()],
                state: vec![],
            },
        }
        .to_header();
        let attrs = Value::Map(vec![("src_service".into(), "web".into())]);
        let mut patch = State::new();
        patch.insert("action", "allow");
        let store = || {
            v.store(
                "acl",
                "new-connection",
                &header,
                &attrs,
                &State::new(),
                &patch,
            )
        };
        let lookup = || v.lookup("acl", "new-connection", &attrs, &State::new());
        store();
        assert_eq!(lookup(), Some(patch.clone()));
        // Another kind's policies do not matter...
        v.apply(Update::Changed(&[put("pol.lb.x", b"lb", 2)]));
        assert!(lookup().is_some());
        // ...the acl's do: the next lookup misses.
        v.apply(Update::Changed(&[put("pol.acl.b", b"two", 3)]));
        assert_ne!(v.fingerprint("acl"), fp);
        assert_eq!(lookup(), None);
        // An answer made under the old set (an agent behind this dispatcher) is not kept.
        store();
        assert_eq!(lookup(), None);
        // Removing the new policy brings back the first set, and its fingerprint.
        v.apply(Update::Changed(&[Change::Delete {
            key: "pol.acl.b".into(),
            revision: 4,
        }]));
        assert_eq!(v.fingerprint("acl"), fp);
        assert_eq!(*v.revision.borrow(), 4);
    }

    #[test]
    fn off_means_nothing_is_kept() {
        let v = Verdicts::new(0, bus::cache::DEFAULT_MAX_BYTES);
        assert!(!v.enabled());
        let header = CacheHeader {
            fingerprint: v.fingerprint("acl"),
            inputs: Inputs {
                attrs: vec![],
                state: vec![],
            },
        }
        .to_header();
        v.store(
            "acl",
            "e",
            &header,
            &Value::Nil,
            &State::new(),
            &State::new(),
        );
        assert_eq!(v.lookup("acl", "e", &Value::Nil, &State::new()), None);
        assert_eq!(v.counts(), None);
    }
}
