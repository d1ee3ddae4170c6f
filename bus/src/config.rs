//! The configuration bucket: subscriptions and policies in a JetStream key-value store, so
//! that every instance converges on the same set and restarts lose nothing.
//!
//! Keys: `sub.<event>.<kind>` holds a [`crate::admin::Subscription`];
//! `pol.<kind>.<id>` holds a policy document. Values are MessagePack maps.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt, TryStreamExt};

pub use crate::error::ConfigError;
use crate::store::{Jet, Store};
use crate::subject::{Kind, Subjects};

/// How many past values JetStream keeps per key; enough to see what an operator just changed.
const HISTORY: i64 = 5;
/// Bytes the config bucket may hold: thousands of policies with their history. Only the
/// dispatcher writes it, and a full bucket refuses a `policy-add` rather than grow.
const MAX_BYTES: i64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigKey {
    Subscription { event: String, kind: String },
    Policy { kind: String, id: String },
}

impl ConfigKey {
    pub fn subscription(event: &str, kind: &str) -> String {
        format!("sub.{event}.{kind}")
    }
    pub fn policy(kind: &str, id: &str) -> String {
        format!("pol.{kind}.{id}")
    }
    /// The key filter for every subscription.
    pub fn all_subscriptions() -> &'static str {
        "sub.>"
    }
    /// The key filter for one kind's policies.
    pub fn policies_of(kind: &Kind) -> String {
        format!("pol.{kind}.>")
    }

    /// The key of a peer taken out of the candidates by `peer-removed`, until `peer-added`
    /// (`peer.<token>`; the value is the peer's name).
    pub fn removed_peer(name: &str) -> String {
        format!("{PEER_PREFIX}{}", key_token(name))
    }

    /// Whether `key` is a removed peer's.
    pub fn is_removed_peer(key: &str) -> bool {
        key.starts_with(PEER_PREFIX)
    }

    pub fn parse(key: &str) -> Option<ConfigKey> {
        let mut parts = key.splitn(3, '.');
        let (tag, a, b) = (parts.next()?, parts.next()?, parts.next()?);
        match tag {
            "sub" => Some(ConfigKey::Subscription {
                event: a.into(),
                kind: b.into(),
            }),
            "pol" => Some(ConfigKey::Policy {
                kind: a.into(),
                id: b.into(),
            }),
            _ => None,
        }
    }
}

const PEER_PREFIX: &str = "peer.";

/// A KV key token for any string: kept when it is already `[A-Za-z0-9_-]`, otherwise the hex
/// of a fixed 64-bit hash (so every instance maps it the same way).
pub fn key_token(s: &str) -> String {
    if !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return s.to_string();
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("h{h:016x}")
}

fn io(e: impl std::error::Error + Send + Sync + 'static) -> ConfigError {
    ConfigError::Io(Box::new(e))
}

/// Who opens the config bucket: the dispatcher owns it (creates and writes it); every other
/// process only reads it, and waits for a dispatcher to create it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Owner,
    Reader,
}

/// Opens the config bucket; its owner creates it on first use.
pub async fn open(
    client: &async_nats::Client,
    subjects: &Subjects,
    replicas: usize,
    access: Access,
) -> Result<kv::Store, ConfigError> {
    let config = kv::Config {
        bucket: subjects.config_bucket(),
        description: "policy-bus subscriptions and policies".into(),
        history: HISTORY,
        max_bytes: MAX_BYTES,
        num_replicas: replicas.max(1),
        ..Default::default()
    };
    // On a server that can, the owner creates the bucket able to take atomic batches, so
    // `apply` stores a whole configuration in one step (see `crate::batch`).
    // The server's INFO is only known once connected: a flush waits for that.
    if client.server_info().version.is_empty() {
        let _ = client.flush().await;
    }
    let atomic = crate::batch::server_at_least(&client.server_info().version, 2, 12);
    let jet = Jet::reach(client, subjects, Store::Config).await?;
    open_or_create(&jet, config, access == Access::Owner, atomic).await
}

/// Opens the config bucket for a long-running process that may start before the server (or
/// its JetStream, or the dispatcher that creates the bucket) is ready: it tries for about a
/// minute, with a warning each time, before it gives up. A server too old for the engine is
/// final at once.
pub async fn open_waiting(
    client: &async_nats::Client,
    subjects: &Subjects,
    replicas: usize,
    access: Access,
) -> Result<kv::Store, ConfigError> {
    let mut attempt = 0;
    loop {
        match open(client, subjects, replicas, access).await {
            Ok(store) => return Ok(store),
            Err(e @ ConfigError::ServerTooOld { .. }) => return Err(e),
            Err(e) if attempt >= 60 => return Err(e),
            Err(e) => {
                attempt += 1;
                // A reader started next to the dispatcher usually just waits for it a moment.
                if access == Access::Reader && attempt <= 5 {
                    tracing::info!(error = %e, attempt, "waiting for policy-dispatcher to create the config bucket");
                } else {
                    tracing::warn!(error = %e, attempt, "config bucket not available yet; retrying");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Opens a bucket, creating it with `config` on first use when `create`. Every owner may race
/// to create it; the loser of the race just opens it. An existing bucket keeps its own
/// settings.
pub async fn open_bucket(
    jet: &Jet,
    config: kv::Config,
    create: bool,
) -> Result<kv::Store, ConfigError> {
    open_or_create(jet, config, create, false).await
}

async fn open_or_create(
    jet: &Jet,
    config: kv::Config,
    create: bool,
    atomic: bool,
) -> Result<kv::Store, ConfigError> {
    let too_old = || {
        let version = jet.client().server_info().version;
        (!server_supported(&version)).then_some(ConfigError::ServerTooOld { version })
    };
    if let Some(e) = too_old() {
        return Err(e);
    }
    let js = jet.context();
    let bucket = config.bucket.clone();
    let missing = match js.get_key_value(&bucket).await {
        // Its owner runs only on a bucket that routes messages as the engine makes it.
        Ok(store) if create => {
            return crate::store::repair(&js, store, &crate::store::kv_stream(config, atomic)).await
        }
        Ok(store) => return Ok(store),
        Err(e) => e,
    };
    let source: Box<dyn std::error::Error + Send + Sync> = if create {
        let created = crate::store::create_bucket(&js, config, atomic)
            .await
            .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) });
        match created {
            Ok(store) => return Ok(store),
            // Another owner may have won the race to create it.
            Err(e) => match js.get_key_value(&bucket).await {
                Ok(store) => return Ok(store),
                Err(_) => e,
            },
        }
    } else {
        format!("{missing} (policy-dispatcher creates it){}", jet.hint()).into()
    };
    Err(too_old().unwrap_or(ConfigError::Open { bucket, source }))
}

/// The engine's JetStream client understands servers from 2.10 on. An empty version means
/// the connection is not up yet; the request that follows will say so itself.
pub fn server_supported(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let v = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    version.is_empty() || v >= (2, 10)
}

/// One change to the watched keys, with the bucket revision it brings the watcher to.
#[derive(Debug, Clone)]
pub enum Change {
    Put {
        key: String,
        value: Bytes,
        revision: u64,
    },
    Delete {
        key: String,
        revision: u64,
    },
}

/// The bucket's stream state as the server has it now. `kv::Store::status` returns the stream
/// info cached when the store was opened (async-nats 0.51), so its sequence never moves.
pub async fn stream_state(
    store: &kv::Store,
) -> Result<async_nats::jetstream::stream::State, ConfigError> {
    Ok(store.stream.get_info().await.map_err(io)?.state)
}

/// Loads the current values under `filter` and returns them with a stream of every later
/// change. The watch starts just after the stream sequence read before loading, so no change
/// falls between the load and the watch (a change may be seen twice; applying it is idempotent).
pub async fn load_and_watch(
    store: &kv::Store,
    filter: &str,
) -> Result<(Snapshot, impl Stream<Item = Result<Change, ConfigError>>), ConfigError> {
    let last = stream_state(store).await?.last_sequence;
    let prefix = filter.trim_end_matches('>');
    let keys: Vec<String> = store
        .keys()
        .await
        .map_err(io)?
        .try_filter(|k| futures::future::ready(k.starts_with(prefix)))
        .try_collect()
        .await
        .map_err(io)?;
    let mut current = Snapshot {
        values: BTreeMap::new(),
        revisions: BTreeMap::new(),
        revision: last,
    };
    let mut gets = futures::stream::iter(keys)
        .map(|k| async move {
            let v = store.entry(&k).await;
            (k, v)
        })
        .buffer_unordered(32);
    while let Some((k, v)) = gets.next().await {
        if let Some(e) = v.map_err(io)? {
            if e.operation == kv::Operation::Put {
                current.revisions.insert(k.clone(), e.revision);
                current.values.insert(k, e.value);
            }
        }
    }
    // The whole bucket is watched, and changes outside `filter` dropped by the caller: so every
    // message of the stream passes here, and a watch that fell behind the stream (its consumer
    // lost with a node, say) shows as such.
    let watch = store.watch_from_revision(">", last + 1).await.map_err(io)?;
    let changes = watch.map(|entry| {
        let entry = entry.map_err(io)?;
        Ok(match entry.operation {
            kv::Operation::Put => Change::Put {
                key: entry.key,
                value: entry.value,
                revision: entry.revision,
            },
            kv::Operation::Delete | kv::Operation::Purge => Change::Delete {
                key: entry.key,
                revision: entry.revision,
            },
        })
    });
    Ok((current, changes))
}

/// How often a watch checks that it keeps up with the bucket. A watch whose consumer was lost
/// (its node died) may stay silent, leaving a process on stale policies: one that has not
/// reached, a check later, the sequence the stream had at a check is reloaded.
const STALL_CHECK: Duration = Duration::from_secs(1);

impl Change {
    pub fn key(&self) -> &str {
        match self {
            Change::Put { key, .. } | Change::Delete { key, .. } => key,
        }
    }
    pub fn revision(&self) -> u64 {
        match self {
            Change::Put { revision, .. } | Change::Delete { revision, .. } => *revision,
        }
    }
}

/// The values under a filter as of a bucket revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub values: BTreeMap<String, Bytes>,
    /// Each key's own revision: a writer that compares-and-sets from what it loaded needs it.
    pub revisions: BTreeMap<String, u64>,
    pub revision: u64,
}

/// What a watcher of the bucket is told.
pub enum Update<'a> {
    /// The whole current set: after the first load, and again after a broken watch was
    /// reopened.
    Loaded(&'a Snapshot),
    /// A batch of changes, in order (the ones already waiting are handed over together, so a
    /// bulk load is not applied key by key).
    Changed(&'a [Change]),
}

impl Snapshot {
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Put {
                key,
                value,
                revision,
            } => {
                self.values.insert(key.clone(), value.clone());
                self.revisions.insert(key.clone(), *revision);
                self.revision = *revision;
            }
            Change::Delete { key, revision } => {
                self.values.remove(key);
                self.revisions.remove(key);
                self.revision = *revision;
            }
        }
    }
}

/// Keeps `on` in step with the keys under `filter` for as long as the task runs. A broken
/// watch (the server restarted, the stream was lost) is reopened and everything reloaded, so
/// no change is missed. `ready` fires after the first load.
pub async fn watch(
    store: kv::Store,
    filter: String,
    mut on: impl FnMut(Update<'_>),
    mut ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    loop {
        match load_and_watch(&store, &filter).await {
            Ok((snap, changes)) => {
                on(Update::Loaded(&snap));
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
                let mut changes = std::pin::pin!(changes);
                let mut batch = Vec::new();
                let prefix = filter.trim_end_matches('>');
                let mut seen = snap.revision;
                let mut check = tokio::time::interval(STALL_CHECK);
                check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // The stream's last sequence at the previous check: by now the watch must
                // have passed it.
                let mut due: Option<u64> = None;
                'watch: loop {
                    let first = tokio::select! {
                        first = changes.next() => match first {
                            Some(first) => first,
                            None => break 'watch,
                        },
                        _ = check.tick() => {
                            if due.is_some_and(|d| seen < d) {
                                tracing::warn!(%filter, seen, behind = ?due, "config watch stalled behind the bucket; reloading");
                                break 'watch;
                            }
                            due = match tokio::time::timeout(STALL_CHECK, stream_state(&store)).await {
                                Ok(Ok(state)) => Some(state.last_sequence),
                                _ => None,
                            };
                            continue;
                        }
                    };
                    let mut next = Some(first);
                    while let Some(change) = next.take() {
                        match change {
                            Ok(c) => {
                                seen = seen.max(c.revision());
                                if c.key().starts_with(prefix) {
                                    batch.push(c);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, %filter, "config watch failed; reloading");
                                break 'watch;
                            }
                        }
                        next = changes.next().now_or_never().flatten();
                    }
                    if !batch.is_empty() {
                        on(Update::Changed(&batch));
                        batch.clear();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, %filter, "cannot load config; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// [`watch`] for a watcher that rebuilds from the whole set: `apply` gets the current set
/// after the first load and after every batch of changes.
pub async fn follow(
    store: kv::Store,
    filter: String,
    mut apply: impl FnMut(&Snapshot),
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let mut current = Snapshot::default();
    let on = move |update: Update<'_>| {
        match update {
            Update::Loaded(snap) => current = snap.clone(),
            Update::Changed(changes) => changes.iter().for_each(|c| current.apply(c)),
        }
        apply(&current);
    };
    watch(store, filter, on, ready).await
}

/// How long an admin write may take before the caller is told the bucket is unavailable.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert!(!server_supported("2.9.10"));
        assert!(server_supported("2.10.0"));
        assert!(server_supported("2.12.8"));
        assert!(server_supported("3.0.0"));
    }

    #[test]
    fn a_snapshot_follows_puts_and_deletes() {
        let mut snap = Snapshot::default();
        let put = |key: &str, revision| Change::Put {
            key: key.into(),
            value: Bytes::from_static(b"v"),
            revision,
        };
        snap.apply(&put("sub.a.b", 1));
        snap.apply(&put("sub.a.c", 2));
        snap.apply(&Change::Delete {
            key: "sub.a.b".into(),
            revision: 3,
        });
        assert_eq!(snap.values.keys().collect::<Vec<_>>(), ["sub.a.c"]);
        assert_eq!(snap.revision, 3);
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(
            ConfigKey::parse(&ConfigKey::subscription("new-connection", "acl")),
            Some(ConfigKey::Subscription {
                event: "new-connection".into(),
                kind: "acl".into()
            })
        );
        assert_eq!(
            ConfigKey::parse(&ConfigKey::policy("acl", "r-1")),
            Some(ConfigKey::Policy {
                kind: "acl".into(),
                id: "r-1".into()
            })
        );
        assert_eq!(ConfigKey::parse("other.a.b"), None);
        assert_eq!(ConfigKey::parse("sub.a"), None);
    }
}
