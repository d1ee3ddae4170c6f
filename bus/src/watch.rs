//! Watching a key-value bucket: the current values under a filter, then every change, kept
//! up through broken watches and lost consumers (the config bucket's watchers use it, and any
//! other bucket's may).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};

use crate::error::ConfigError;

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
    Ok(store
        .stream
        .get_info()
        .await
        .map_err(ConfigError::io)?
        .state)
}

/// Whether a key is under one of the filters (`a.b.>` style prefixes, or `>` for all).
fn under(filters: &[String], key: &str) -> bool {
    filters
        .iter()
        .any(|f| key.starts_with(f.trim_end_matches('>')))
}

/// Loads the current values under `filters` and returns them with a stream of every later
/// change. The watch starts just after the stream sequence read before loading, so no change
/// falls between the load and the watch (a change may be seen twice; applying it is idempotent).
pub async fn load_and_watch(
    store: &kv::Store,
    filters: &[String],
) -> Result<(Snapshot, impl Stream<Item = Result<Change, ConfigError>>), ConfigError> {
    let last = stream_state(store).await?.last_sequence;
    let prefixes: Vec<&str> = filters.iter().map(|f| f.trim_end_matches('>')).collect();
    let mut current = Snapshot {
        values: BTreeMap::new(),
        revisions: BTreeMap::new(),
        revision: last,
    };
    for (key, (value, revision)) in
        crate::bucket::entries(store, &prefixes, 32, crate::bucket::Read::Leader).await?
    {
        current.revisions.insert(key.clone(), revision);
        current.values.insert(key, value);
    }
    // The whole bucket is watched, and changes outside `filters` dropped by the caller: so every
    // message of the stream passes here, and a watch that fell behind the stream (its consumer
    // lost with a node, say) shows as such.
    let watch = store
        .watch_from_revision(">", last + 1)
        .await
        .map_err(ConfigError::io)?;
    let changes = watch.map(|entry| {
        let entry = entry.map_err(ConfigError::io)?;
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

/// Keeps `on` in step with the keys under `filters` for as long as the task runs. A broken
/// watch (the server restarted, the stream was lost) is reopened and everything reloaded, so
/// no change is missed. `ready` fires after the first load.
pub async fn watch(
    store: kv::Store,
    filters: Vec<String>,
    mut on: impl FnMut(Update<'_>),
    mut ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    loop {
        match load_and_watch(&store, &filters).await {
            Ok((snap, changes)) => {
                on(Update::Loaded(&snap));
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
                let mut changes = std::pin::pin!(changes);
                let mut batch = Vec::new();
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
                                tracing::warn!(?filters, seen, behind = ?due, "config watch stalled behind the bucket; reloading");
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
                                if under(&filters, c.key()) {
                                    batch.push(c);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, ?filters, "config watch failed; reloading");
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
            Err(e) => tracing::warn!(error = %e, ?filters, "cannot load config; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// [`watch`] for a watcher that rebuilds from the whole set: `apply` gets the current set
/// after the first load and after every batch of changes.
pub async fn follow(
    store: kv::Store,
    filters: Vec<String>,
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
    watch(store, filters, on, ready).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
