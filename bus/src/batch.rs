//! Writing many config keys in one step. On nats-server 2.12 and later the config bucket is
//! created with atomic batch publishing (ADR-50): `apply` sends every change as one batch,
//! each message compared-and-set against the key's revision it planned from, and the server
//! stores all of them or none. A dispatcher that dies halfway through sending leaves nothing
//! behind, which no rollback could promise. On older servers, or a bucket created before the
//! upgrade, the caller writes key by key and rolls back ([`write_each`]).

use async_nats::header::{
    NATS_BATCH_COMMIT, NATS_BATCH_ID, NATS_BATCH_SEQUENCE, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
};
use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Deserialize;

use crate::store::Jet;

/// NATS's key-value protocol: a delete is an empty message with this header.
const KV_OPERATION: &str = "KV-Operation";
const KV_DELETE: &str = "DEL";

/// One key to write, with the revision the writer read it at (0: the key must not exist, or
/// exist only as a delete marker of that revision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub key: String,
    /// `None` deletes the key.
    pub value: Option<Bytes>,
    pub expected_revision: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The server refused the batch: nothing of it was stored.
    #[error("the server stored none of the changes: {0}")]
    Refused(String),
    /// No answer to the commit: the batch may or may not be stored.
    #[error("no answer from JetStream to the commit ({0}): the changes may or may not be stored; `policyctl status` and `policyctl diff` tell")]
    Unknown(String),
}

/// Whether `version` (as `INFO` gives it) is at least `major.minor`.
pub fn server_at_least(version: &str, major: u64, minor: u64) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let v = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    v >= (major, minor)
}

/// Whether the bucket accepts atomic batches.
pub fn atomic(store: &kv::Store) -> bool {
    store.stream.cached_info().config.allow_atomic_publish
}

#[derive(Deserialize)]
struct Ack {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    description: String,
}

/// Publishes `writes` as one atomic batch and returns the bucket revision of its last message.
pub async fn write_atomic(
    jet: &Jet,
    store: &kv::Store,
    writes: &[Write],
) -> Result<u64, BatchError> {
    let Some((commit, rest)) = writes.split_last() else {
        return Err(BatchError::Refused("an empty batch".into()));
    };
    let id = nuid::next().to_string();
    let message = |i: usize, w: &Write| {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_BATCH_ID, id.as_str());
        headers.insert(NATS_BATCH_SEQUENCE, (i + 1).to_string().as_str());
        headers.insert(
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            w.expected_revision.to_string().as_str(),
        );
        if w.value.is_none() {
            headers.insert(KV_OPERATION, KV_DELETE);
        }
        let subject = jet.kv_subject(store, &w.key);
        (subject, headers, w.value.clone().unwrap_or_default())
    };
    let client = jet.client();
    for (i, w) in rest.iter().enumerate() {
        let (subject, headers, payload) = message(i, w);
        client
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| BatchError::Refused(e.to_string()))?;
    }
    let (subject, mut headers, payload) = message(rest.len(), commit);
    headers.insert(NATS_BATCH_COMMIT, "1");
    let reply = client
        .request_with_headers(subject, headers, payload)
        .await
        .map_err(|e| BatchError::Unknown(e.to_string()))?;
    let ack: Ack = serde_json::from_slice(&reply.payload)
        .map_err(|e| BatchError::Unknown(format!("unreadable acknowledgement: {e}")))?;
    match ack.error {
        Some(e) => Err(BatchError::Refused(e.description)),
        None => Ok(ack.seq),
    }
}

/// Writes one key, compared-and-set against `w.expected_revision`, and returns the revision
/// it was stored at (async-nats's KV delete does not say).
pub async fn write_one(jet: &Jet, store: &kv::Store, w: &Write) -> Result<u64, BatchError> {
    let mut headers = HeaderMap::new();
    headers.insert(
        NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        w.expected_revision.to_string().as_str(),
    );
    if w.value.is_none() {
        headers.insert(KV_OPERATION, KV_DELETE);
    }
    let subject = jet.kv_subject(store, &w.key);
    let payload = w.value.clone().unwrap_or_default();
    let ack = jet
        .context()
        .publish_with_headers(subject, headers, payload)
        .await
        .map_err(|e| BatchError::Unknown(e.to_string()))?;
    match ack.await {
        Ok(ack) => Ok(ack.sequence),
        // The server answered: it refused the write (a wrong last sequence, a full bucket).
        Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
            Err(BatchError::Refused(e.to_string()))
        }
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::PublishErrorKind::TimedOut
                    | jetstream::context::PublishErrorKind::BrokenPipe
            ) =>
        {
            Err(BatchError::Unknown(e.to_string()))
        }
        Err(e) => Err(BatchError::Refused(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_compare_by_major_and_minor() {
        assert!(server_at_least("2.12.8", 2, 12));
        assert!(server_at_least("2.13.0-beta", 2, 12));
        assert!(server_at_least("3.0.0", 2, 12));
        assert!(!server_at_least("2.10.26", 2, 12));
        assert!(!server_at_least("", 2, 12));
    }
}
