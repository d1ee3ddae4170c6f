//! The store behind conn-limit's slots, as a small trait: what [`super::conn_slots`] needs of
//! it, so the races are unit-tested against an in-memory store with injected interleavings,
//! and run against JetStream (the layout is `bus::slots`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{DeleteMessageErrorKind, LastRawMessageErrorKind};
use async_nats::jetstream::{self, kv, stream};
use bus::{slots, Subjects};

/// A connection's slot under one policy: the runs holding it, and the write that put them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub runs: Vec<String>,
    pub revision: u64,
}

/// What a conditional write came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Yes,
    /// The slot is no longer at the revision the write expected (absent: 0).
    Conflict,
    /// A new slot, with the policy's slots all taken.
    Full,
}

/// A marker: what happened to a connection that a late copy of its admission must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker<'a> {
    Closed(&'a str),
    Undone(&'a str, &'a str),
}

pub type StoreError = String;

/// The slots of every policy and the markers. Every call is one request to the store; writes
/// are conditional on the revision read, so the store decides every race.
pub trait SlotStore: Send + Sync + 'static {
    /// Makes the policy's slots exist, with `max` of them.
    fn prepare(
        &self,
        policy: &str,
        max: u32,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn get(
        &self,
        policy: &str,
        connection: &str,
    ) -> impl Future<Output = Result<Option<Slot>, StoreError>> + Send;
    /// Writes the slot's runs if its last write is `expected` (0: there is none).
    fn put(
        &self,
        policy: &str,
        connection: &str,
        runs: &[String],
        expected: u64,
    ) -> impl Future<Output = Result<Written, StoreError>> + Send;
    /// Frees the slot if its last write is still `revision`.
    fn remove(
        &self,
        policy: &str,
        connection: &str,
        revision: u64,
    ) -> impl Future<Output = Result<Written, StoreError>> + Send;
    fn mark(&self, marker: Marker<'_>) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Whether the connection was closed, or the run undone, less than
    /// [`slots::MARKER_FOR`] ago: one read.
    fn marked(
        &self,
        connection: &str,
        run: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Slots the policy holds.
    fn in_use(&self, policy: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// Markers' writes of one connection that may lose to another before one lands.
const MARK_ATTEMPTS: usize = 8;

/// The lines of a connection's markers written at `written`, if they still count.
fn live(written: SystemTime, value: &[u8]) -> Option<Vec<String>> {
    (written.elapsed().unwrap_or_default() < slots::MARKER_FOR).then(|| {
        String::from_utf8_lossy(value)
            .lines()
            .map(str::to_string)
            .collect()
    })
}

/// JetStream: a stream per policy whose limits are the limit (see `bus::slots`), and the
/// markers in the conn bucket.
pub struct JetStore {
    js: jetstream::Context,
    /// The API prefix slot writes go under (a store identity's import), or none.
    api: Option<String>,
    subjects: Subjects,
    lease: Duration,
    markers: kv::Store,
    /// Markers' batched reader, where the server has batched gets.
    lasts: Option<bus::lasts::Lasts>,
    /// Whether a batched read failed yet (said once).
    fell_back: AtomicBool,
    /// Streams this process made sure of, with the limit they were made for.
    prepared: Mutex<HashMap<String, u32>>,
}

/// Replicas of a slot stream: one. nats-server 2.12 checks a replicated stream's `max_msgs`
/// before its leader proposes a write, without allowing for a write that replaces its
/// subject's message: a full replicated stream would refuse every renewal and every run added
/// or taken out (and the slots of live connections would lapse with the lease). A stream of
/// one replica is checked by its store, which allows it. The markers stay replicated.
const SLOT_REPLICAS: usize = 1;

/// JetStream's error codes this store tells apart.
const STREAM_NOT_FOUND: u64 = 10059;
/// MSG.DELETE of a sequence no longer there: 10043 inside a block, 10057 ("no message found")
/// below the stream's first sequence (a rewrite of the oldest slot moves it on).
const SEQUENCE_NOT_FOUND: u64 = 10043;
const DELETE_FAILED: u64 = 10057;
const STORE_FAILED: u64 = 10077;
/// On a cluster: another write of the subject is in flight (10164), or the expected
/// sequence cannot be checked yet (10163). Either is a write that lost a race.
const SUBJECT_IN_FLIGHT: [u64; 2] = [10163, 10164];

impl JetStore {
    /// `read_within`: how long a batched read of markers may take before it fails (and the
    /// marker is read by itself).
    pub fn new(
        jet: &bus::store::Jet,
        subjects: &Subjects,
        lease: Duration,
        markers: kv::Store,
        read_within: Duration,
    ) -> Self {
        let lasts = bus::lasts::Lasts::spawn(jet, &markers.stream_name, read_within);
        JetStore {
            lasts,
            fell_back: AtomicBool::new(false),
            js: jet.context(),
            api: jet.api().map(str::to_string),
            subjects: subjects.clone(),
            lease,
            markers,
            prepared: Mutex::new(HashMap::new()),
        }
    }

    /// The streams made sure of. A poisoned lock only means a call panicked holding it: the
    /// map is still whole.
    fn prepared(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.prepared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets a stream that was deleted (or could not be reached): the next admission makes
    /// it again.
    fn forget(&self, policy: &str) {
        self.prepared().remove(policy);
    }

    /// The policy's stream, without a request: one that was never made answers "stream not
    /// found", which every call below takes as nothing held there.
    async fn stream(&self, policy: &str) -> Result<stream::Stream<()>, StoreError> {
        self.js
            .get_stream_no_info(slots::stream(&self.subjects, policy))
            .await
            .map_err(|e| format!("the slots of {policy} cannot be opened: {e}"))
    }
}

/// The JetStream error in an error's sources, if it carries one.
fn jet_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a jetstream::Error> {
    let mut source = Some(e);
    while let Some(e) = source {
        if let Some(j) = e.downcast_ref::<jetstream::Error>() {
            return Some(j);
        }
        source = e.source();
    }
    None
}

/// A read that found nothing: no such message, or no such stream (nothing held there).
fn found_nothing(e: &stream::LastRawMessageError) -> bool {
    match e.kind() {
        LastRawMessageErrorKind::NoMessageFound => true,
        LastRawMessageErrorKind::JetStream(j) => j.error_code().0 == STREAM_NOT_FOUND,
        _ => false,
    }
}

impl SlotStore for JetStore {
    async fn prepare(&self, policy: &str, max: u32) -> Result<(), StoreError> {
        if self.prepared().get(policy) == Some(&max) {
            return Ok(());
        }
        let mut expected = slots::stream_config(&self.subjects, policy, max, self.lease);
        expected.num_replicas = SLOT_REPLICAS;
        expected.consumer_limits = Some(bus::streams::consumer_limits());
        let name = expected.name.clone();
        match self.js.get_stream(&name).await {
            Ok(mut s) => {
                let actual = s
                    .info()
                    .await
                    .map_err(|e| format!("{name}: {e}"))?
                    .config
                    .clone();
                // Its limits follow the policy, and what routes messages is put back: a role
                // that may create it may have created it otherwise first (see
                // `bus::streams::repair`). A mirror takes no writes: admissions fail closed.
                let routes = bus::streams::routing_differs(&actual, &expected);
                let limits = actual.max_messages != expected.max_messages
                    || actual.max_messages_per_subject != 1
                    || actual.discard != stream::DiscardPolicy::New
                    || actual.deny_delete;
                if limits || !routes.is_empty() {
                    tracing::info!(stream = %name, max, ?routes, "putting a policy's slot limits back");
                    let fixed = stream::Config {
                        max_messages: expected.max_messages,
                        max_messages_per_subject: 1,
                        discard: stream::DiscardPolicy::New,
                        deny_delete: false,
                        subjects: expected.subjects.clone(),
                        republish: None,
                        sources: None,
                        subject_transform: None,
                        ..actual
                    };
                    self.js
                        .update_stream(fixed)
                        .await
                        .map_err(|e| format!("{name}: {e}"))?;
                }
            }
            Err(_) => {
                self.js
                    .get_or_create_stream(expected)
                    .await
                    .map_err(|e| format!("the slots of {policy} cannot be created: {e}"))?;
            }
        }
        self.prepared().insert(policy.to_string(), max);
        Ok(())
    }

    async fn get(&self, policy: &str, connection: &str) -> Result<Option<Slot>, StoreError> {
        let s = self.stream(policy).await?;
        let subject = slots::subject(&self.subjects, policy, connection);
        match s.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok(Some(Slot {
                runs: String::from_utf8_lossy(&m.payload)
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect(),
                revision: m.sequence,
            })),
            Err(e) if found_nothing(&e) => {
                if !matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) {
                    self.forget(policy);
                }
                Ok(None)
            }
            Err(e) => Err(format!("could not read {subject}: {e}")),
        }
    }

    async fn put(
        &self,
        policy: &str,
        connection: &str,
        runs: &[String],
        expected: u64,
    ) -> Result<Written, StoreError> {
        let subject = slots::subject(&self.subjects, policy, connection);
        let to = match &self.api {
            Some(api) => format!("{api}.{subject}"),
            None => subject.clone(),
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
        let body = runs.join("\n");
        let ack = self
            .js
            .publish_with_headers(to, headers, body.into())
            .await
            .map_err(|e| format!("could not write {subject}: {e}"))?
            .await;
        match ack {
            Ok(_) => Ok(Written::Yes),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(Written::Conflict),
            Err(e)
                if jet_error(&e).is_some_and(|j| SUBJECT_IN_FLIGHT.contains(&j.error_code().0)) =>
            {
                Ok(Written::Conflict)
            }
            // Deleted under us (or not answering): made again on the next admission.
            Err(e)
                if matches!(
                    e.kind(),
                    PublishErrorKind::StreamNotFound | PublishErrorKind::TimedOut
                ) =>
            {
                self.forget(policy);
                Err(format!("could not write {subject}: {e}"))
            }
            // `discard: new` at `max_msgs`: every slot is taken.
            Err(e)
                if jet_error(&e).is_some_and(|j| {
                    j.error_code().0 == STORE_FAILED
                        && j.to_string().starts_with("maximum messages exceeded")
                }) =>
            {
                Ok(Written::Full)
            }
            Err(e) => Err(format!("could not write {subject}: {e}")),
        }
    }

    async fn remove(
        &self,
        policy: &str,
        connection: &str,
        revision: u64,
    ) -> Result<Written, StoreError> {
        match self.stream(policy).await?.delete_message(revision).await {
            Ok(_) => Ok(Written::Yes),
            // Written again since (or expired): no longer the slot read.
            Err(e)
                if matches!(e.kind(), DeleteMessageErrorKind::JetStream(j)
                    if [SEQUENCE_NOT_FOUND, DELETE_FAILED].contains(&j.error_code().0)) =>
            {
                Ok(Written::Conflict)
            }
            Err(e)
                if matches!(e.kind(), DeleteMessageErrorKind::JetStream(j)
                    if j.error_code().0 == STREAM_NOT_FOUND) =>
            {
                self.forget(policy);
                Ok(Written::Yes)
            }
            Err(e) => Err(format!(
                "could not free {policy}'s slot of {connection}: {e}"
            )),
        }
    }

    async fn mark(&self, marker: Marker<'_>) -> Result<(), StoreError> {
        let (connection, line) = match marker {
            Marker::Closed(c) => (c, slots::CLOSED.to_string()),
            Marker::Undone(c, r) => (c, slots::undone_line(r)),
        };
        let key = slots::gone_key(connection);
        let failed = |e: &dyn std::fmt::Display| format!("could not record {key}: {e}");
        // A close concerns every run: it replaces what was there.
        if line == slots::CLOSED {
            return self
                .markers
                .put(&key, line.into())
                .await
                .map(|_| ())
                .map_err(|e| failed(&e));
        }
        for _ in 0..MARK_ATTEMPTS {
            let entry = self.markers.entry(&key).await.map_err(|e| failed(&e))?;
            let lines = entry
                .as_ref()
                .and_then(|e| live(SystemTime::from(e.created), &e.value))
                .unwrap_or_default();
            if lines.iter().any(|l| *l == line || l == slots::CLOSED) {
                return Ok(());
            }
            let value: bytes::Bytes = lines
                .iter()
                .chain(std::iter::once(&line))
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
                .into();
            let written = match &entry {
                Some(e) => self.markers.update(&key, value, e.revision).await.is_ok(),
                None => self.markers.create(&key, value).await.is_ok(),
            };
            if written {
                return Ok(());
            }
        }
        Err(failed(&"too contended"))
    }

    async fn marked(&self, connection: &str, run: &str) -> Result<bool, StoreError> {
        // A direct get: on one replica (the store's default) it is the leader's answer, so a
        // marker written before this call is seen (on three, any replica answers, and one that
        // is behind may not have it yet). Batched with the other admissions' confirmations
        // where the server can (see `bus::lasts::Lasts`).
        let key = slots::gone_key(connection);
        let batched = match &self.lasts {
            Some(lasts) => {
                let last = lasts.last(format!("{}{key}", self.markers.prefix)).await;
                // Said once: a cluster with a replica before 2.11 refuses a share of the
                // batches for as long as it runs.
                last.inspect_err(|e| {
                    if !self.fell_back.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "markers read key by key instead");
                    }
                })
                .ok()
            }
            None => None,
        };
        let lines = match batched {
            Some(last) => last.and_then(|l| live(l.written, &l.payload)),
            None => self
                .markers
                .entry(&key)
                .await
                .map_err(|e| format!("could not read {key}: {e}"))?
                .and_then(|e| live(SystemTime::from(e.created), &e.value)),
        };
        let undone = slots::undone_line(run);
        Ok(lines.is_some_and(|lines| lines.iter().any(|l| l == slots::CLOSED || *l == undone)))
    }

    async fn in_use(&self, policy: &str) -> Result<u64, StoreError> {
        match self.stream(policy).await?.get_info().await {
            Ok(info) => Ok(info.state.messages),
            Err(e) if jet_error(&e).is_some_and(|j| j.error_code().0 == STREAM_NOT_FOUND) => Ok(0),
            Err(e) => Err(format!("could not count {policy}'s slots: {e}")),
        }
    }
}
