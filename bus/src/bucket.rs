//! Reading a key-value bucket as it is now, without a consumer.
//!
//! async-nats lists a bucket's keys through an ordered consumer, which JetStream places on one
//! replica of the stream. After a node of a cluster is lost that placement may still pick it:
//! in `e2e cluster::losing_the_node…`, one listing in three timed out for more than 30 s after
//! the stream had its new leader. Here the names come from the stream leader's subject index
//! (a stream info request, answered once a leader is elected) and the values from direct gets,
//! which any replica answers.

use std::collections::BTreeMap;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::error::ConfigError;

fn io(e: impl std::error::Error + Send + Sync + 'static) -> ConfigError {
    ConfigError::Io(Box::new(e))
}

/// A key's current value and the bucket revision that wrote it.
pub type Entries = BTreeMap<String, (Bytes, u64)>;

/// Every key under one of `prefixes` (each ends in `.`; `""` is the whole bucket) that has a
/// message in the stream, in key order. A deleted key is listed too: its last message is the
/// delete marker, which stays (the config bucket has no `max_age`), so [`entries`] spends a
/// direct get on it.
pub async fn names(store: &kv::Store, prefixes: &[&str]) -> Result<Vec<String>, ConfigError> {
    let mut keys = Vec::new();
    for prefix in prefixes {
        let filter = format!("{}{prefix}>", store.prefix);
        let mut subjects = store.stream.info_with_subjects(&filter).await.map_err(io)?;
        while let Some((subject, _)) = subjects.try_next().await.map_err(io)? {
            if let Some(key) = subject.strip_prefix(store.prefix.as_str()) {
                keys.push(key.to_string());
            }
        }
    }
    keys.sort_unstable();
    keys.dedup();
    Ok(keys)
}

/// The current value of every live key under one of `prefixes` (see [`names`]), with
/// `at_once` direct gets in flight.
pub async fn entries(
    store: &kv::Store,
    prefixes: &[&str],
    at_once: usize,
) -> Result<Entries, ConfigError> {
    let keys = names(store, prefixes).await?;
    let mut out = Entries::new();
    let mut gets = futures::stream::iter(keys)
        .map(|k| async move {
            let entry = store.entry(&k).await;
            (k, entry)
        })
        .buffer_unordered(at_once);
    while let Some((key, entry)) = gets.next().await {
        if let Some(e) = entry.map_err(io)? {
            if e.operation == kv::Operation::Put {
                out.insert(key, (e.value, e.revision));
            }
        }
    }
    Ok(out)
}
