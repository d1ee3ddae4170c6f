//! One request/reply over NATS, and what can go wrong with it, in the caller's words: the
//! transport under the gateway client, the admin client and the hedged agent calls.

use std::time::Duration;

use async_nats::{client::RequestErrorKind, HeaderMap, Message};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::codec::{self, CodecError};
use crate::error::{ErrorReply, InvalidName};

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

pub(crate) fn decode_reply<T: DeserializeOwned>(
    subject: &str,
    msg: &Message,
) -> Result<T, ClientError> {
    codec::decode("reply", &msg.payload).map_err(|source| ClientError::Decode {
        subject: subject.to_string(),
        source,
    })
}
