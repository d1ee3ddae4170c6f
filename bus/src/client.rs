//! The typed async client of gateway hookpoints, [`Client`] (operators have
//! [`crate::AdminClient`]).

use std::time::Duration;

use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use crate::codec;
use crate::decision::{ClosedDecision, ConnectionDecision, ExposeDecision, ListDecision};
use crate::event::{self, ConnectionClosed, ExposeService, NewConnection, ServiceListRequest};
use crate::state::{State, Value};
use crate::subject::Subjects;

// What the transport and the services API discovery hold, still reachable here.
pub use crate::discovery::{any_instance, count_instances};
use crate::transport::decode_reply;
pub use crate::transport::{call, reconnect_delay, ClientError, DEFAULT_TIMEOUT};

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
    use crate::error::ErrorReply;

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
