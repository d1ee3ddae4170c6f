//! Reading the last message of many subjects of one stream in few requests: each read waits
//! for the batch in flight, then every read waiting goes in one batched direct get
//! (`multi_last`, nats-server 2.11 and later). Where a read cost a request per key, as
//! conn-limit's confirmations did (one per admission), this takes most of that load off the
//! server: in the usual case none of the subjects has a message, and the answer is one
//! `404 No Results`.
//!
//! A batch's answer is a chain: each message names the sequence of the one before it
//! (`Nats-Last-Sequence`) and how many are still to come after it (`Nats-Num-Pending`), and the
//! end (`204 EOB`) names the last one; the last message must have said none was to come. A
//! chain with a gap (a message lost on the way, or a batch cut short
//! by the server's byte limit) is an error, never an absence: a caller that reads markers
//! must not take "not found" for an answer it did not get.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::message::StreamMessage;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::store::Jet;

/// The server's own JetStream API.
const JS_API: &str = "$JS.API";
/// Subjects in one request at most: the server's own limit on a batch's answers.
const AT_ONCE: usize = 1024;
/// The headers that chain a batch's answers.
const LAST_SEQUENCE: &str = "Nats-Last-Sequence";
const NUM_PENDING: &str = "Nats-Num-Pending";

/// A subject's last message, as a batched read found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Last {
    pub payload: Bytes,
    /// When the stream stored it.
    pub written: SystemTime,
}

/// Why a batched read has no answer. The caller reads the key by itself instead: a replica
/// from before 2.11 answers `408 Empty Request` (it does not know `multi_last`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LastsError {
    #[error("the batched read was answered {0}")]
    Status(String),
    #[error("the batched read's answer is incomplete: {0}")]
    Incomplete(String),
    #[error("the batched read had no answer within {0:?}")]
    Timeout(Duration),
    #[error("the batched read could not be sent: {0}")]
    Send(String),
    #[error("the batched reader stopped")]
    Stopped,
}

type Answer = Result<Option<Last>, LastsError>;
/// A subject to read, and where its last message goes.
type LastRead = (String, oneshot::Sender<Answer>);

/// The handle of a batched reader; its task ends with the last clone.
#[derive(Clone)]
pub struct Lasts {
    reads: mpsc::UnboundedSender<LastRead>,
}

impl Lasts {
    /// A reader of `stream`'s subjects where `jet` reaches its API, each batch answered
    /// `within` or failed. `None` when the server predates batched gets.
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

    /// `subject`'s last message, `None` if it has none.
    pub async fn last(&self, subject: String) -> Answer {
        let (tx, rx) = oneshot::channel();
        self.reads
            .send((subject, tx))
            .map_err(|_| LastsError::Stopped)?;
        rx.await.map_err(|_| LastsError::Stopped)?
    }
}

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
        // By subject: each is asked once (nats-server, every release so far, can miss a
        // subject of a batch that names another one twice). A reader that gave up is not
        // asked for.
        let mut waiting: HashMap<String, Vec<oneshot::Sender<Answer>>> = HashMap::new();
        let mut next = Some(first);
        while let Some((subject, tx)) = next.take() {
            if !tx.is_closed() {
                waiting.entry(subject).or_default().push(tx);
            }
            if waiting.len() < AT_ONCE {
                next = rx.try_recv().ok();
            }
        }
        if waiting.is_empty() {
            continue;
        }
        batch += 1;
        let reply = format!("{inbox}.{batch}");
        let subjects: Vec<&str> = waiting.keys().map(String::as_str).collect();
        let found = tokio::time::timeout(
            within,
            one_batch(&client, &to, &reply, &subjects, &mut answers),
        )
        .await
        .unwrap_or(Err(LastsError::Timeout(within)));
        for (subject, txs) in waiting {
            let answer = found
                .as_ref()
                .map(|f| f.get(&subject).cloned())
                .map_err(Clone::clone);
            for tx in txs {
                let _ = tx.send(answer.clone());
            }
        }
    }
}

/// A header's value as a number: the last one, which the server set (a stored message's own
/// headers come first).
fn number(m: &async_nats::Message, name: &str) -> Option<u64> {
    m.headers.as_ref()?.get_last(name)?.as_str().parse().ok()
}

/// One batched get of `subjects`: their last messages, by subject.
async fn one_batch(
    client: &async_nats::Client,
    to: &str,
    reply: &str,
    subjects: &[&str],
    answers: &mut async_nats::Subscriber,
) -> Result<HashMap<String, Last>, LastsError> {
    let body = serde_json::json!({ "multi_last": subjects }).to_string();
    client
        .publish_with_reply(to.to_string(), reply.to_string(), body.into())
        .await
        .map_err(|e| LastsError::Send(e.to_string()))?;
    let mut chain = Chain::default();
    while let Some(m) = answers.next().await {
        // An answer to an earlier batch that gave up waiting.
        if m.subject.as_str() != reply {
            continue;
        }
        if let Some(done) = chain.take(m) {
            return done;
        }
    }
    Err(LastsError::Stopped)
}

/// A batch's answer as it arrives.
#[derive(Default)]
struct Chain {
    found: HashMap<String, Last>,
    /// The sequence of the batch's previous message: each names it.
    previous: u64,
    /// How many messages the previous one said were still to come. The end's own count is
    /// not enough: 2.11 counts one short there.
    pending: Option<u64>,
}

impl Chain {
    /// Takes the next message of the answer: `Some` once the answer is complete or broken.
    fn take(
        &mut self,
        m: async_nats::Message,
    ) -> Option<Result<HashMap<String, Last>, LastsError>> {
        let chained = number(&m, LAST_SEQUENCE) == Some(self.previous);
        let pending = number(&m, NUM_PENDING);
        let broken = |why: &str| Some(Err(LastsError::Incomplete(why.into())));
        match m.status.map(|s| s.as_u16()) {
            None if chained && pending.is_some() => match StreamMessage::try_from(m) {
                Ok(m) => {
                    self.previous = m.sequence;
                    self.pending = pending;
                    let last = Last {
                        payload: m.payload,
                        written: SystemTime::from(m.time),
                    };
                    self.found.insert(m.subject.to_string(), last);
                    None
                }
                Err(e) => broken(&e.to_string()),
            },
            None => broken("a message is missing"),
            Some(204) if chained && pending == Some(0) && self.pending == Some(0) => {
                Some(Ok(std::mem::take(&mut self.found)))
            }
            Some(204) => broken("the batch ended early"),
            Some(404)
                if self.found.is_empty() && m.description.as_deref() == Some("No Results") =>
            {
                Some(Ok(HashMap::new()))
            }
            // A 404 with another description is a message that failed to load: an error, not
            // an absence.
            Some(code) => Some(Err(LastsError::Status(format!(
                "{code} {}",
                m.description.unwrap_or_default()
            )))),
        }
    }
}

#[cfg(test)]
#[path = "lasts_tests.rs"]
mod tests;
