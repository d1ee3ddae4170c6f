//! Reading a key-value bucket as it is now, without a consumer.
//!
//! async-nats lists a bucket's keys through an ordered consumer, which JetStream places on one
//! replica of the stream. After a node of a cluster is lost that placement may still pick it:
//! in `e2e cluster::losing_the_node…`, one listing in three timed out for more than 30 s after
//! the stream had its new leader. Here the names come from the stream leader's subject index
//! (a stream info request, answered once a leader is elected) and the values from direct gets,
//! which any replica answers.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream::kv;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{mpsc, oneshot};

use crate::error::ConfigError;
use crate::store::Jet;

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

/// Reads the last message of many subjects of one stream in few requests: each read waits
/// for the one in flight, then every read waiting goes in one batched direct get
/// (`multi_last`, nats-server 2.11 and later). Where a read costs a request per key, as
/// conn-limit's confirmations did (one per admission), this takes most of that load off the
/// server: in the usual case none of the subjects has a message, and the answer is one
/// `404 No Results`.
#[derive(Clone)]
pub struct Lasts {
    reads: mpsc::UnboundedSender<LastRead>,
}

/// Why a batched read has no answer. The caller reads the key by itself instead: a replica
/// from before 2.11 answers `408 Empty Request` (it does not know `multi_last`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LastsError {
    #[error("the batched read was answered {0}")]
    Status(String),
    #[error("the batched read had no answer within {0:?}")]
    Timeout(Duration),
    #[error("the batched read could not be sent: {0}")]
    Send(String),
    #[error("the batched reader stopped")]
    Stopped,
}

/// The server's own JetStream API.
const JS_API: &str = "$JS.API";

/// Subjects in one request at most: the server's own limit on a batch's answers.
const LASTS_AT_ONCE: usize = 1024;

impl Lasts {
    /// A reader of `stream`'s subjects where `jet` reaches its API, each batch answered
    /// `within` or failed; its task ends with the last clone. `None` when the server predates
    /// batched gets.
    pub fn spawn(jet: &Jet, stream: &str, within: Duration) -> Option<Lasts> {
        let client = jet.client();
        if !client.is_server_compatible(2, 11, 0) {
            return None;
        }
        let (reads, rx) = mpsc::unbounded_channel();
        let to = format!("{}.DIRECT.GET.{stream}", jet.api().unwrap_or(JS_API));
        tokio::spawn(read_in_batches(client.clone(), to, within, rx));
        Some(Lasts { reads })
    }

    /// The payload of `subject`'s last message, `None` if it has none.
    pub async fn last(&self, subject: String) -> Result<Option<Bytes>, LastsError> {
        let (tx, rx) = oneshot::channel();
        self.reads
            .send((subject, tx))
            .map_err(|_| LastsError::Stopped)?;
        rx.await.map_err(|_| LastsError::Stopped)?
    }
}

/// A subject to read, and where its last message goes.
type LastRead = (String, oneshot::Sender<Result<Option<Bytes>, LastsError>>);
type Waiting = Vec<LastRead>;

async fn read_in_batches(
    client: async_nats::Client,
    to: String,
    within: Duration,
    mut rx: mpsc::UnboundedReceiver<LastRead>,
) {
    let inbox = client.new_inbox();
    let mut answers = match client.subscribe(format!("{inbox}.*")).await {
        Ok(s) => s,
        Err(e) => {
            let e = LastsError::Send(e.to_string());
            while let Some((_, tx)) = rx.recv().await {
                let _ = tx.send(Err(e.clone()));
            }
            return;
        }
    };
    let mut batch: u64 = 0;
    while let Some(first) = rx.recv().await {
        let mut waiting: Waiting = vec![first];
        while waiting.len() < LASTS_AT_ONCE {
            match rx.try_recv() {
                Ok(read) => waiting.push(read),
                Err(_) => break,
            }
        }
        batch += 1;
        let reply = format!("{inbox}.{batch}");
        let found = match tokio::time::timeout(
            within,
            one_batch(&client, &to, &reply, &waiting, &mut answers),
        )
        .await
        {
            Ok(found) => found,
            Err(_) => Err(LastsError::Timeout(within)),
        };
        for (subject, tx) in waiting {
            let _ = tx.send(
                found
                    .as_ref()
                    .map(|f| f.get(&subject).cloned())
                    .map_err(Clone::clone),
            );
        }
    }
}

/// One batched get of every waiting subject: their last messages, by subject.
async fn one_batch(
    client: &async_nats::Client,
    to: &str,
    reply: &str,
    waiting: &Waiting,
    answers: &mut async_nats::Subscriber,
) -> Result<HashMap<String, Bytes>, LastsError> {
    let subjects: Vec<&str> = waiting.iter().map(|(s, _)| s.as_str()).collect();
    let body = serde_json::json!({ "multi_last": subjects }).to_string();
    client
        .publish_with_reply(to.to_string(), reply.to_string(), body.into())
        .await
        .map_err(|e| LastsError::Send(e.to_string()))?;
    let mut found = HashMap::new();
    while let Some(m) = answers.next().await {
        // An answer to an earlier batch that gave up waiting.
        if m.subject.as_str() != reply {
            continue;
        }
        match m.status.map(|s| s.as_u16()) {
            None => {
                let subject = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(async_nats::header::NATS_SUBJECT));
                if let Some(subject) = subject {
                    found.insert(subject.to_string(), m.payload);
                }
            }
            // The end of the batch, or a batch with no message at all (a 404 with another
            // description is a message that failed to load: an error, not an absence).
            Some(204) => return Ok(found),
            Some(404) if m.description.as_deref() == Some("No Results") => return Ok(found),
            Some(code) => {
                return Err(LastsError::Status(format!(
                    "{code} {}",
                    m.description.unwrap_or_default()
                )))
            }
        }
    }
    Err(LastsError::Stopped)
}
