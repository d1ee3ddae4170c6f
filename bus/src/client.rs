//! Typed async clients: [`Client`] for gateway hookpoints, [`AdminClient`] for operators.

use std::time::Duration;

use async_nats::{client::RequestErrorKind, HeaderMap, Message};
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use crate::codec::{self, CodecError};
use crate::decision::{ClosedDecision, ConnectionDecision, ExposeDecision, ListDecision};
use crate::error::{ErrorReply, InvalidName};
use crate::event::{self, ConnectionClosed, ExposeService, NewConnection, ServiceListRequest};
use crate::state::{State, Value};
use crate::subject::Subjects;

pub use crate::admin_client::AdminClient;

/// Long enough for a chain of several agents at their default 250 ms timeouts.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The pause before reconnect attempt `attempts`, for `ConnectOptions::reconnect_delay_callback`:
/// short, capped and jittered, so a server that comes back is used within about half a second
/// however long it was away (async-nats's own back-off grows to seconds), and a fleet of
/// clients does not reconnect in lockstep. Every policy-bus process uses it; a hookpoint should.
pub fn reconnect_delay(attempts: usize) -> Duration {
    let base = 50 * attempts.clamp(1, 8) as u64;
    Duration::from_millis(base + rand::random_range(0..=base / 2))
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "nothing is answering on {subject}: is policy-dispatcher running with the same --prefix?"
    )]
    NoResponders { subject: String },
    #[error("no answer on {subject} within {timeout:?}")]
    Timeout { subject: String, timeout: Duration },
    /// The connection to NATS is down (reconnecting), or dropped while the request waited: a
    /// caller gets this promptly rather than after its timeout, and can apply its own fallback.
    #[error("not connected to NATS (reconnecting): no answer on {subject}")]
    Disconnected { subject: String },
    #[error("request on {subject} failed: {source}")]
    Request {
        subject: String,
        #[source]
        source: async_nats::RequestError,
    },
    /// The copy of a hedged request was dropped by the instance it reached, which is working
    /// on another copy or found it past its deadline: not an answer.
    #[error("{subject}: this copy was dropped ({why}); another copy answers")]
    Dropped { subject: String, why: String },
    /// The engine answered with an error reply (see `ErrorCode`).
    #[error(transparent)]
    Remote(#[from] ErrorReply),
    #[error("reply on {subject}: {source}")]
    Decode {
        subject: String,
        #[source]
        source: CodecError,
    },
    #[error(transparent)]
    Encode(#[from] CodecError),
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
}

impl ClientError {
    /// The error code when the engine itself answered with an error.
    pub fn code(&self) -> Option<crate::ErrorCode> {
        match self {
            ClientError::Remote(e) => Some(e.code),
            _ => None,
        }
    }
}

/// One request/reply. An error reply becomes [`ClientError::Remote`]; "no responders" is
/// reported at once rather than after the timeout.
pub async fn call(
    nats: &async_nats::Client,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    timeout: Duration,
) -> Result<Message, ClientError> {
    request(nats, subject, headers, payload, Some(timeout), true).await
}

/// [`call`], with the timeout and the watch for a dropped connection optional: a hedged call
/// keeps its own deadline and sends another copy when one gets no answer, so it needs
/// neither (each is a timer per request).
pub(crate) async fn request(
    nats: &async_nats::Client,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    timeout: Option<Duration>,
    watch_drop: bool,
) -> Result<Message, ClientError> {
    if nats.connection_state() == async_nats::connection::State::Disconnected {
        return Err(ClientError::Disconnected { subject });
    }
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(payload)
        .timeout(timeout);
    let sent = if watch_drop {
        // A reply cannot come over a connection that dropped: fail then, not at the timeout.
        // The watch starts late, so a request answered in the usual millisecond pays for no
        // polling.
        let dropped = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            loop {
                if nats.connection_state() == async_nats::connection::State::Disconnected {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        };
        tokio::select! {
            sent = nats.send_request(subject.clone(), request) => sent,
            _ = dropped => return Err(ClientError::Disconnected { subject }),
        }
    } else {
        nats.send_request(subject.clone(), request).await
    };
    let msg = match sent {
        Ok(msg) => msg,
        Err(e) => {
            return Err(match e.kind() {
                RequestErrorKind::NoResponders => ClientError::NoResponders { subject },
                RequestErrorKind::TimedOut => ClientError::Timeout {
                    subject,
                    timeout: timeout.unwrap_or_default(),
                },
                _ => ClientError::Request { subject, source: e },
            })
        }
    };
    if let Some(why) = crate::headers::get(msg.headers.as_ref(), crate::headers::POLICY_DROPPED) {
        return Err(ClientError::Dropped {
            subject,
            why: why.to_string(),
        });
    }
    if let Some(err) = ErrorReply::from_message(msg.headers.as_ref(), &msg.payload) {
        return Err(ClientError::Remote(err));
    }
    Ok(msg)
}

/// Counts the live instances of a NATS service (by `$SRV.PING`), waiting `window` for
/// answers. Used to wait for a process to be ready and to check an engine is whole.
pub async fn count_instances(
    nats: &async_nats::Client,
    service: &str,
    window: Duration,
) -> Result<usize, async_nats::Error> {
    ping(nats, service, window, usize::MAX).await
}

/// Whether any instance of a NATS service answers `$SRV.PING` within `window`; returns at the
/// first answer.
pub async fn any_instance(
    nats: &async_nats::Client,
    service: &str,
    window: Duration,
) -> Result<bool, async_nats::Error> {
    Ok(ping(nats, service, window, 1).await? > 0)
}

async fn ping(
    nats: &async_nats::Client,
    service: &str,
    window: Duration,
    enough: usize,
) -> Result<usize, async_nats::Error> {
    use futures::StreamExt;
    let inbox = nats.new_inbox();
    let mut sub = nats.subscribe(inbox.clone()).await?;
    nats.publish_with_reply(Subjects::service_ping(service), inbox, Bytes::new())
        .await?;
    nats.flush().await?;
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
        // With no instance at all the server answers "no responders" (a status, no payload):
        // that is not an instance.
        if msg.status.is_none() && !msg.payload.is_empty() {
            seen += 1;
            if seen >= enough {
                break;
            }
        }
    }
    Ok(seen)
}

/// A `new-connection` payload with a connection id: the hookpoint's own, else a new one, so
/// that a repeated copy of the event is the same connection. A payload that does not decode is
/// left alone, for the dispatcher to refuse.
fn with_connection_id(payload: Bytes) -> Bytes {
    let has_id =
        codec::decode::<std::collections::BTreeMap<String, Value>>("event", &payload).map(|m| {
            match m.get(crate::state::keys::CONNECTION_ID) {
                None | Some(Value::Nil) => false,
                // Anything else but an empty id is the hookpoint's to get right (or be told).
                Some(v) => v.as_str() != Some(""),
            }
        });
    match has_id {
        Ok(false) => event::set_attribute(
            &payload,
            crate::state::keys::CONNECTION_ID,
            event::new_id().into(),
        )
        .map(Bytes::from)
        .unwrap_or(payload),
        _ => payload,
    }
}

pub(crate) fn decode_reply<T: DeserializeOwned>(
    subject: &str,
    msg: &Message,
) -> Result<T, ClientError> {
    codec::decode("reply", &msg.payload).map_err(|source| ClientError::Decode {
        subject: subject.to_string(),
        source,
    })
}

/// The earliest a hookpoint repeats an event that has no answer yet: well past a decision's
/// usual milliseconds, so that only a lost request (a dispatcher killed, or stopping in the
/// instant its subscription ends) is sent again.
const EVENT_HEDGE_FLOOR: Duration = Duration::from_millis(100);
/// Copies of one event a hookpoint sends at most.
const EVENT_MAX_SENDS: u32 = 3;

/// How long the client keeps sending the close of a connection whose decision never arrived.
pub const CANCEL_FOR: Duration = Duration::from_secs(120);
/// The first pause between those closes; it doubles up to [`CANCEL_MAX_PAUSE`].
const CANCEL_PAUSE: Duration = Duration::from_millis(250);
const CANCEL_MAX_PAUSE: Duration = Duration::from_secs(5);

/// Whether a close's error is the engine's last word on it: no agent takes closes (so no slot
/// is held), or the close is malformed. Anything else (a timeout, an agent that could not
/// confirm, the connection lost) may go otherwise next time.
fn close_is_final(e: &ClientError) -> bool {
    use crate::ErrorCode::*;
    matches!(e.code(), Some(NoSubscribers | UnknownEvent | BadRequest))
        || matches!(e, ClientError::Encode(_) | ClientError::InvalidName(_))
}

/// Whether a failed `new-connection` may still have been admitted by the engine: any error
/// once it was sent. Even an error reply the engine made before its chain ran answers only one
/// copy: another copy of the same event (a hedge) may have been decided, and admitted, by
/// another run.
fn may_have_admitted(e: &ClientError) -> bool {
    !matches!(e, ClientError::Encode(_) | ClientError::InvalidName(_))
}

/// A gateway hookpoint's client: asks the engine for decisions. An event with no answer after a
/// while (four times the usual decision time, at least 100 ms) is sent again, up to three times
/// within the timeout, to whichever dispatcher the queue group picks; every copy carries the
/// same event id (and, for `new-connection`, the same connection id), so the engine's stateful
/// agents treat the copies as one event, and a dispatcher skips a copy whose deadline passed.
#[derive(Debug, Clone)]
pub struct Client {
    nats: async_nats::Client,
    subjects: Subjects,
    timeout: Duration,
    latency: std::sync::Arc<crate::hedge::Latency>,
    dry_run: bool,
}

impl Client {
    pub fn new(nats: async_nats::Client, subjects: Subjects) -> Self {
        Client {
            nats,
            subjects,
            timeout: DEFAULT_TIMEOUT,
            latency: std::sync::Arc::new(crate::hedge::Latency::new(
                EVENT_HEDGE_FLOOR,
                EVENT_MAX_SENDS,
            )),
            dry_run: false,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends every event as a dry run (`Policy-Dry-Run: true`): the engine answers what it
    /// would decide and changes nothing (no conn-limit slot, no rate-limit token, no tap).
    pub fn with_dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Sends an event with any attributes and returns the raw reply: for events this version
    /// of the contract has no type for, and for callers that set their own headers (an event
    /// id, a `traceparent`).
    pub async fn request(
        &self,
        event: &str,
        mut headers: HeaderMap,
        mut payload: Bytes,
    ) -> Result<Message, ClientError> {
        event::EventName::new(event)?;
        if headers.get(crate::headers::POLICY_EVENT_ID).is_none() {
            headers.insert(crate::headers::POLICY_EVENT_ID, event::new_id().as_str());
        }
        if self.dry_run {
            headers.insert(crate::headers::POLICY_DRY_RUN, "true");
        }
        if event == event::NEW_CONNECTION {
            payload = with_connection_id(payload);
        }
        crate::hedge::ask(
            &self.nats,
            &self.subjects.event(event),
            headers,
            payload,
            self.timeout,
            &self.latency,
        )
        .await
    }

    /// Sends an event and decodes the decision as `D`.
    pub async fn decide<A: Serialize, D: DeserializeOwned>(
        &self,
        event: &str,
        attributes: &A,
    ) -> Result<D, ClientError> {
        let payload = codec::encode("event attributes", attributes)?;
        let msg = self
            .request(event, HeaderMap::new(), payload.into())
            .await?;
        decode_reply(&self.subjects.event(event), &msg)
    }

    /// Sends an event given as a map and returns the decision as a map.
    pub async fn emit(&self, event: &str, attributes: &State) -> Result<State, ClientError> {
        self.decide(event, attributes).await
    }

    /// Asks whether a connection may open. When no decision comes back (a timeout, the
    /// connection to NATS lost, an error after the chain ran), the engine may still have
    /// admitted it, and a conn-limit slot would then be held until its lease: so the client
    /// sends `connection-closed` for it, in the background, until the engine confirms it
    /// (for up to [`CANCEL_FOR`], through a reconnect). The gateway itself does nothing more:
    /// it treats the connection as refused.
    pub async fn new_connection(
        &self,
        e: &NewConnection,
    ) -> Result<ConnectionDecision, ClientError> {
        let mut e = e.clone();
        let id = match e.connection_id.as_deref() {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => e.connection_id.insert(event::new_id()).clone(),
        };
        let decided = self.decide(event::NEW_CONNECTION, &e).await;
        if let Err(err) = &decided {
            if may_have_admitted(err) {
                self.cancel(ConnectionClosed {
                    connection_id: id,
                    src_service: e.src_service.clone(),
                    dst_service: e.dst_service.clone(),
                    target_peer: None,
                });
            }
        }
        decided
    }

    /// Closes, in the background, a connection whose decision never arrived.
    fn cancel(&self, closed: ConnectionClosed) {
        let client = self.clone();
        tokio::spawn(async move {
            let until = tokio::time::Instant::now() + CANCEL_FOR;
            let mut pause = CANCEL_PAUSE;
            loop {
                match client.connection_closed(&closed).await {
                    Ok(_) => return,
                    // Nothing keeps slots for closes, or the close itself is refused: sending
                    // it again would change nothing, and thousands of cancels after an outage
                    // would flood the engine as it comes back.
                    Err(e) if close_is_final(&e) => {
                        tracing::debug!(connection_id = %closed.connection_id, error = %e, "cancel answered for good");
                        return;
                    }
                    Err(e) if tokio::time::Instant::now() >= until => {
                        tracing::warn!(connection_id = %closed.connection_id, error = %e,
                            "could not cancel a connection whose decision never arrived; a conn-limit slot may be held until its lease");
                        return;
                    }
                    Err(_) => {
                        // Backing off, jittered: after an outage every undecided connection
                        // is closed again, and the engine must not meet them all at once.
                        let jitter = rand::random_range(0..=pause.as_millis() as u64 / 2);
                        tokio::time::sleep(pause + Duration::from_millis(jitter)).await;
                        pause = (pause * 2).min(CANCEL_MAX_PAUSE);
                    }
                }
            }
        });
    }

    pub async fn expose_service(&self, e: &ExposeService) -> Result<ExposeDecision, ClientError> {
        self.decide(event::EXPOSE_SERVICE, e).await
    }

    pub async fn list_services(&self, e: &ServiceListRequest) -> Result<ListDecision, ClientError> {
        self.decide(event::SERVICE_LIST_REQUEST, e).await
    }

    pub async fn connection_closed(
        &self,
        e: &ConnectionClosed,
    ) -> Result<ClosedDecision, ClientError> {
        self.decide(event::CONNECTION_CLOSED, e).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_is_sent_again_unless_the_engine_answered_it_for_good() {
        let remote = |code| ClientError::Remote(ErrorReply::new(code, "x"));
        assert!(close_is_final(&remote(crate::ErrorCode::NoSubscribers)));
        assert!(close_is_final(&remote(crate::ErrorCode::BadRequest)));
        assert!(!close_is_final(&remote(crate::ErrorCode::AgentTimeout)));
        assert!(!close_is_final(&remote(crate::ErrorCode::AgentError)));
        assert!(!close_is_final(&ClientError::Disconnected {
            subject: "s".into()
        }));
        assert!(!close_is_final(&ClientError::Timeout {
            subject: "s".into(),
            timeout: Duration::from_secs(1)
        }));
    }

    #[test]
    fn reconnect_delays_are_short_capped_and_jittered() {
        for attempts in 0..1000 {
            let d = reconnect_delay(attempts);
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(600),
                "{d:?}"
            );
        }
        let late: std::collections::HashSet<Duration> =
            (0..50).map(|_| reconnect_delay(100)).collect();
        assert!(late.len() > 1, "no jitter");
    }
}
