//! The NATS services API ("micro" v1: `$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`), served here
//! rather than by async-nats's `service` module for two reasons: its endpoints cannot be
//! *drained* (stopping one unsubscribes at once and drops the requests the server had already
//! sent, so a rolling restart lost decisions), and it counts a reply that carries an error
//! header as a success, so `nats micro stats` never showed an error.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use async_nats::{HeaderMap, Message, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

const PREFIX: &str = "$SRV";
const VERBS: [&str; 3] = ["PING", "INFO", "STATS"];

/// One endpoint to serve: a subject in a queue group.
#[derive(Debug, Clone)]
pub struct EndpointSpec {
    pub name: &'static str,
    pub subject: String,
    pub queue_group: String,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    errors: AtomicU64,
    processing_ns: AtomicU64,
    last_error: Mutex<String>,
}

impl Stats {
    fn done(&self, took: std::time::Duration, error: Option<String>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.processing_ns.fetch_add(
            took.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
        if let Some(e) = error {
            self.errors.fetch_add(1, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
        }
    }
}

/// A request taken from an endpoint. Answer it with [`Request::respond`] (or count it as
/// refused with [`Request::refused`]) so the endpoint's statistics stay true.
pub struct Request {
    pub message: Message,
    client: async_nats::Client,
    stats: Arc<Stats>,
    received: Instant,
}

impl Request {
    /// Sends the reply, if the request asked for one. A reply with the services error header
    /// counts as an error, with that header as the endpoint's `last_error`.
    pub async fn respond(
        self,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<(), async_nats::PublishError> {
        let error = headers
            .get(bus::headers::NATS_SERVICE_ERROR_CODE)
            .map(|code| {
                let text = headers
                    .get(bus::headers::NATS_SERVICE_ERROR)
                    .map(|v| v.as_str())
                    .unwrap_or("");
                format!("{}:{text}", code.as_str())
            });
        self.stats.done(self.received.elapsed(), error);
        let sent = match &self.message.reply {
            Some(reply) => {
                self.client
                    .publish_with_headers(reply.clone(), headers, body)
                    .await
            }
            None => Ok(()),
        };
        if let Err(e) = &sent {
            // Said here, where the event id is at hand for free: the caller gave its request up.
            let id = bus::headers::event_id(self.message.headers.as_ref());
            tracing::warn!(event.id = id.unwrap_or("-"), subject = %self.message.subject, error = %e, "could not send a reply");
        }
        sent
    }

    /// Counts a request that gets no reply (it asked for none) as an error.
    pub fn refused(self, why: &str) {
        self.stats
            .done(self.received.elapsed(), Some(format!("400:{why}")));
    }

    /// Drops a request that is not to be worked on (a copy of one in progress, one past its
    /// deadline): counted, and answered with an empty reply marked `Policy-Dropped`, which the
    /// sender ignores. Without a reply the sender's client would keep the request's entry
    /// for as long as it is connected: memory that only grows under load and faults.
    pub async fn dropped(self, why: &'static str) {
        self.stats.done(self.received.elapsed(), None);
        if let Some(reply) = &self.message.reply {
            let mut h = HeaderMap::new();
            h.insert(bus::headers::name(bus::headers::POLICY_DROPPED), why);
            let _ = self
                .client
                .publish_with_headers(reply.clone(), h, Bytes::new())
                .await;
        }
    }
}

/// What a refused reply subject is counted as (the endpoint's `last_error`).
pub const NOT_AN_INBOX: &str = "reply subject is not an inbox";

/// Logs a request refused for its reply subject, which is cut to a printable length: the
/// subject came from whoever sent the request.
pub fn refuse_reply(endpoint: &str, subject: &str, reply: &str, headers: Option<&HeaderMap>) {
    let shown: String = reply.chars().take(bus::subject::MAX_REPLY_LEN).collect();
    tracing::warn!(
        endpoint,
        %subject,
        reply = %shown,
        event.id = bus::headers::event_id(headers).unwrap_or("-"),
        "request refused: {NOT_AN_INBOX}, so it gets no answer (a client must ask from an inbox; see docs/security.md)"
    );
}

/// A subscription serving one endpoint.
pub struct Endpoint {
    pub name: &'static str,
    subscriber: Subscriber,
    client: async_nats::Client,
    stats: Arc<Stats>,
}

impl Endpoint {
    /// The next request; `None` once the endpoint is drained (or the client closed).
    ///
    /// A request whose reply subject is not an inbox is refused here, counted as an error and
    /// logged, and never answered (see [`bus::subject::is_inbox`]): the caller never sees it.
    pub async fn next(&mut self) -> Option<Request> {
        loop {
            let message = self.subscriber.next().await?;
            let received = Instant::now();
            if let Some(reply) = &message.reply {
                if !bus::subject::is_inbox(reply) {
                    refuse_reply(self.name, &message.subject, reply, message.headers.as_ref());
                    self.stats
                        .done(received.elapsed(), Some(format!("400:{NOT_AN_INBOX}")));
                    continue;
                }
            }
            return Some(Request {
                message,
                client: self.client.clone(),
                stats: self.stats.clone(),
                received,
            });
        }
    }

    /// Stops taking new requests without losing any the server has already sent: the server
    /// is told to stop routing here, and [`Self::next`] goes on returning what was on its way
    /// until `None`.
    pub async fn drain(&mut self) -> Result<(), async_nats::UnsubscribeError> {
        self.subscriber.drain().await
    }
}

/// A service's metadata, read each time the services API is asked, so that it can say what
/// changes while the instance runs (a wasm host's module version).
pub type Metadata = Arc<dyn Fn() -> BTreeMap<String, String> + Send + Sync>;

struct Info {
    name: String,
    id: String,
    version: String,
    description: String,
    started: String,
    endpoints: Vec<(EndpointSpec, Arc<Stats>)>,
    metadata: Option<Metadata>,
}

/// Answers the services API's verbs for one service instance until dropped.
pub struct Service {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Serialize)]
struct EndpointInfo<'a> {
    name: &'a str,
    subject: &'a str,
    queue_group: &'a str,
    metadata: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct EndpointStats<'a> {
    name: &'a str,
    subject: &'a str,
    queue_group: &'a str,
    num_requests: u64,
    num_errors: u64,
    last_error: String,
    processing_time: u64,
    average_processing_time: u64,
}

impl Info {
    fn answer(&self, verb: &str) -> serde_json::Value {
        let base = serde_json::json!({
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "metadata": self.metadata.as_ref().map(|m| m()).unwrap_or_default(),
        });
        let mut v = base;
        match verb {
            "PING" => v["type"] = "io.nats.micro.v1.ping_response".into(),
            "INFO" => {
                v["type"] = "io.nats.micro.v1.info_response".into();
                v["description"] = self.description.clone().into();
                let endpoints: Vec<EndpointInfo> = self
                    .endpoints
                    .iter()
                    .map(|(e, _)| EndpointInfo {
                        name: e.name,
                        subject: &e.subject,
                        queue_group: &e.queue_group,
                        metadata: BTreeMap::new(),
                    })
                    .collect();
                v["endpoints"] = serde_json::to_value(endpoints).unwrap_or_default();
            }
            _ => {
                v["type"] = "io.nats.micro.v1.stats_response".into();
                v["started"] = self.started.clone().into();
                let endpoints: Vec<EndpointStats> = self
                    .endpoints
                    .iter()
                    .map(|(e, s)| {
                        let requests = s.requests.load(Ordering::Relaxed);
                        let processing = s.processing_ns.load(Ordering::Relaxed);
                        EndpointStats {
                            name: e.name,
                            subject: &e.subject,
                            queue_group: &e.queue_group,
                            num_requests: requests,
                            num_errors: s.errors.load(Ordering::Relaxed),
                            last_error: s
                                .last_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .clone(),
                            processing_time: processing,
                            average_processing_time: processing.checked_div(requests).unwrap_or(0),
                        }
                    })
                    .collect();
                v["endpoints"] = serde_json::to_value(endpoints).unwrap_or_default();
            }
        }
        v
    }
}

impl Service {
    /// Registers service `name` and subscribes its endpoints (each in its queue group).
    pub async fn start(
        client: &async_nats::Client,
        name: &str,
        description: &str,
        version: &str,
        specs: Vec<EndpointSpec>,
    ) -> Result<(Service, Vec<Endpoint>), async_nats::SubscribeError> {
        Self::start_with(client, name, description, version, specs, None).await
    }

    /// [`Self::start`], with metadata read at each answer.
    pub async fn start_with(
        client: &async_nats::Client,
        name: &str,
        description: &str,
        version: &str,
        specs: Vec<EndpointSpec>,
        metadata: Option<Metadata>,
    ) -> Result<(Service, Vec<Endpoint>), async_nats::SubscribeError> {
        let id = nuid::next().to_string();
        let mut endpoints = Vec::with_capacity(specs.len());
        let mut served = Vec::with_capacity(specs.len());
        for spec in specs {
            let subscriber = client
                .queue_subscribe(spec.subject.clone(), spec.queue_group.clone())
                .await?;
            let stats = Arc::new(Stats::default());
            endpoints.push(Endpoint {
                name: spec.name,
                subscriber,
                client: client.clone(),
                stats: stats.clone(),
            });
            served.push((spec, stats));
        }
        let mut verbs = Vec::new();
        for verb in VERBS {
            for subject in [
                format!("{PREFIX}.{verb}"),
                format!("{PREFIX}.{verb}.{name}"),
                format!("{PREFIX}.{verb}.{name}.{id}"),
            ] {
                let sub = client.subscribe(subject).await?;
                verbs.push(sub.map(move |m| (verb, m)));
            }
        }
        let info = Info {
            name: name.to_string(),
            id,
            version: version.to_string(),
            description: description.to_string(),
            started: humantime::format_rfc3339_nanos(SystemTime::now()).to_string(),
            endpoints: served,
            metadata,
        };
        let answering = client.clone();
        let task = tokio::spawn(async move {
            let mut verbs = futures::stream::select_all(verbs);
            while let Some((verb, msg)) = verbs.next().await {
                let Some(reply) = msg.reply else { continue };
                if !bus::subject::is_inbox(&reply) {
                    refuse_reply(verb, &msg.subject, &reply, msg.headers.as_ref());
                    continue;
                }
                let body = info.answer(verb).to_string();
                if let Err(e) = answering.publish(reply, body.into()).await {
                    tracing::debug!(error = %e, verb, "could not answer the services API");
                }
            }
        });
        Ok((Service { task }, endpoints))
    }
}
