//! What `apply` and `policy-add` read before they plan: stored entries, and the delete
//! markers a key written again must be written at.

use std::collections::BTreeMap;

use bus::config::WRITE_TIMEOUT;
use bus::{ErrorCode, ErrorReply};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::admin::unavailable;
use crate::Dispatcher;

/// Key lookups in flight at once for one request.
pub(super) const LOOKUPS_AT_ONCE: usize = 64;

/// A key's stored value and revision.
pub(super) struct Stored {
    pub(super) value: Bytes,
    pub(super) revision: u64,
}

/// Every stored key under `prefix` with its value and revision.
pub(super) async fn stored(
    d: &Dispatcher,
    prefix: &str,
) -> Result<BTreeMap<String, Stored>, ErrorReply> {
    Ok(crate::admin::entries(d, prefix)
        .await?
        .into_iter()
        .map(|(k, (value, revision))| (k, Stored { value, revision }))
        .collect())
}

/// The given keys' entries: the stored values, and the delete markers' revisions (a key
/// written again must be written at its marker's), read many at once.
pub(super) async fn given(
    d: &Dispatcher,
    keys: impl Iterator<Item = &String>,
) -> Result<(BTreeMap<String, Stored>, BTreeMap<String, u64>), ErrorReply> {
    let reads: Vec<_> = keys
        .cloned()
        .map(|key| async move {
            let entry = tokio::time::timeout(WRITE_TIMEOUT, d.store.entry(&key))
                .await
                .map_err(|_| unavailable("no answer from JetStream in time"))?
                .map_err(unavailable)?;
            Ok::<_, ErrorReply>((key, entry))
        })
        .collect();
    let entries: Vec<_> = futures::stream::iter(reads)
        .buffered(LOOKUPS_AT_ONCE)
        .try_collect()
        .await?;
    let (mut have, mut tombstones) = (BTreeMap::new(), BTreeMap::new());
    for (key, entry) in entries {
        match entry {
            Some(e) if e.operation == async_nats::jetstream::kv::Operation::Put => {
                have.insert(
                    key,
                    Stored {
                        value: e.value,
                        revision: e.revision,
                    },
                );
            }
            Some(e) => {
                tombstones.insert(key, e.revision);
            }
            None => {}
        }
    }
    Ok((have, tombstones))
}

/// The revision a new key must be written at: its delete marker's, if it had one. A key that
/// has a value now was written by someone else since the plan was read.
pub(super) async fn tombstone(d: &Dispatcher, key: &str) -> Result<u64, ErrorReply> {
    let entry = tokio::time::timeout(WRITE_TIMEOUT, d.store.entry(key))
        .await
        .map_err(|_| unavailable("no answer from JetStream in time"))?
        .map_err(unavailable)?;
    match entry {
        None => Ok(0),
        Some(e) if e.operation != async_nats::jetstream::kv::Operation::Put => Ok(e.revision),
        Some(_) => Err(ErrorReply::new(
            ErrorCode::Internal,
            format!(
                "{key} was stored by someone else while this apply was planned; nothing was \
                 stored: apply again"
            ),
        )),
    }
}
