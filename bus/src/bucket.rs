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
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::error::ConfigError;

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
        let mut subjects = store
            .stream
            .info_with_subjects(&filter)
            .await
            .map_err(ConfigError::io)?;
        while let Some((subject, _)) = subjects.try_next().await.map_err(ConfigError::io)? {
            if let Some(key) = subject.strip_prefix(store.prefix.as_str()) {
                keys.push(key.to_string());
            }
        }
    }
    keys.sort_unstable();
    keys.dedup();
    Ok(keys)
}

/// Which replica answers a value's read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// A direct get, answered by any replica from its own store as it is: cheap, but a
    /// replica that is behind answers with an older value (or none).
    AnyReplica,
    /// A `STREAM.MSG.GET`, answered by the stream's leader: what a watcher that goes on from
    /// the leader's last sequence must load, or a change at or below it could be missed for
    /// good.
    Leader,
}

/// The current value of every live key under one of `prefixes` (see [`names`]), with
/// `at_once` reads in flight.
pub async fn entries(
    store: &kv::Store,
    prefixes: &[&str],
    at_once: usize,
    read: Read,
) -> Result<Entries, ConfigError> {
    let keys = names(store, prefixes).await?;
    let mut out = Entries::new();
    let mut gets = futures::stream::iter(keys)
        .map(|k| async move {
            let entry = match read {
                Read::AnyReplica => store.entry(&k).await.map_err(ConfigError::io).map(|e| {
                    e.filter(|e| e.operation == kv::Operation::Put)
                        .map(|e| (e.value, e.revision))
                }),
                Read::Leader => from_leader(store, &k).await,
            };
            (k, entry)
        })
        .buffer_unordered(at_once);
    while let Some((key, entry)) = gets.next().await {
        if let Some(value) = entry? {
            out.insert(key, value);
        }
    }
    Ok(out)
}

/// A key's value and revision as the stream's leader has it; `None` if deleted or absent.
async fn from_leader(store: &kv::Store, key: &str) -> Result<Option<(Bytes, u64)>, ConfigError> {
    let subject = format!("{}{key}", store.prefix);
    match store.stream.get_last_raw_message_by_subject(&subject).await {
        // A delete or purge marker carries the operation in a header (async-nats' KV layout).
        Ok(m)
            if m.headers
                .get(KV_OPERATION)
                .is_some_and(|op| ["DEL", "PURGE"].contains(&op.as_str())) =>
        {
            Ok(None)
        }
        Ok(m) => Ok(Some((m.payload, m.sequence))),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(ConfigError::io(e)),
    }
}

/// The header of a key-value delete or purge marker (a put carries none).
const KV_OPERATION: &str = "KV-Operation";
