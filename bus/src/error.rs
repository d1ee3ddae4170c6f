//! Error replies: the `Policy-Error` header plus a `{code, message}` payload, and the NATS
//! services error headers so that `nats micro` and friends count them as errors.

use std::fmt;

use async_nats::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::{codec, headers};

/// A name (prefix, event, kind, policy id) that cannot be used on the wire.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid {what} {name:?}: must be {rule}")]
pub struct InvalidName {
    pub what: &'static str,
    pub name: String,
    pub rule: &'static str,
}

/// The error codes of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    BadRequest,
    UnknownEvent,
    NoSubscribers,
    AgentTimeout,
    AgentError,
    InvalidPolicy,
    NotFound,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownEvent,
        ErrorCode::NoSubscribers,
        ErrorCode::AgentTimeout,
        ErrorCode::AgentError,
        ErrorCode::InvalidPolicy,
        ErrorCode::NotFound,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::UnknownEvent => "unknown-event",
            ErrorCode::NoSubscribers => "no-subscribers",
            ErrorCode::AgentTimeout => "agent-timeout",
            ErrorCode::AgentError => "agent-error",
            ErrorCode::InvalidPolicy => "invalid-policy",
            ErrorCode::NotFound => "not-found",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The NATS services status: 400 for the caller's mistakes, 404 for what does not exist,
    /// 503/504 for a chain that could not run, 500 for our own bugs.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::InvalidPolicy => 400,
            ErrorCode::UnknownEvent | ErrorCode::NotFound => 404,
            ErrorCode::NoSubscribers | ErrorCode::AgentError => 503,
            ErrorCode::AgentTimeout => 504,
            ErrorCode::Internal => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The payload of an error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
        }
    }

    /// Headers and payload of the reply. Encoding a two-field struct cannot fail, but if it
    /// ever did the headers alone still carry the code and message.
    pub fn to_reply(&self, mut headers: HeaderMap) -> (HeaderMap, bytes::Bytes) {
        headers.insert(headers::POLICY_ERROR, self.code.as_str());
        headers.insert(
            headers::NATS_SERVICE_ERROR_CODE,
            self.code.status().to_string().as_str(),
        );
        // Header values must be one printable line.
        let line: String = self
            .message
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        headers.insert(headers::NATS_SERVICE_ERROR, line.as_str());
        let payload = codec::encode("error reply", self).unwrap_or_default();
        (headers, payload.into())
    }

    /// Reads an error reply, if the message is one. Falls back to the headers when the payload
    /// is not a well-formed `{code, message}` (a foreign agent may send only headers).
    pub fn from_message(headers: Option<&HeaderMap>, payload: &[u8]) -> Option<Self> {
        let code = headers::get(headers, headers::POLICY_ERROR)
            .or_else(|| headers::get(headers, headers::NATS_SERVICE_ERROR_CODE).map(|_| ""))?;
        if let Ok(reply) = codec::decode::<ErrorReply>("error reply", payload) {
            return Some(reply);
        }
        let message = headers::get(headers, headers::NATS_SERVICE_ERROR)
            .unwrap_or("no message")
            .to_string();
        let code = ErrorCode::parse(code).unwrap_or(ErrorCode::AgentError);
        Some(ErrorReply { code, message })
    }
}

/// A JetStream store that could not be opened or used: the config bucket, the modules, the
/// decision log, a limiter's bucket. Here, in a module that imports no other store module, so
/// that `store` and `config` can both use it without importing each other.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot open the config bucket {bucket:?} (is JetStream enabled on the server?): {source}"
    )]
    Open {
        bucket: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("nats-server {version} is too old: policy-bus needs 2.10 or later (scripts/install-nats installs a current one)")]
    ServerTooOld { version: String },
    #[error("config bucket: {0}")]
    Io(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ConfigError {
    /// A store request that failed.
    pub fn io(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        ConfigError::Io(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_map_to_statuses() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
            assert!([400, 404, 500, 503, 504].contains(&c.status()));
        }
        assert_eq!(ErrorCode::BadRequest.status(), 400);
        assert_eq!(ErrorCode::AgentTimeout.status(), 504);
    }

    #[test]
    fn error_reply_round_trips_through_headers_and_payload() {
        let e = ErrorReply::new(ErrorCode::UnknownEvent, "no such event\n\"x\"");
        let (h, p) = e.to_reply(HeaderMap::new());
        assert_eq!(
            headers::get(Some(&h), headers::POLICY_ERROR),
            Some("unknown-event")
        );
        assert_eq!(
            headers::get(Some(&h), headers::NATS_SERVICE_ERROR_CODE),
            Some("404")
        );
        assert_eq!(ErrorReply::from_message(Some(&h), &p), Some(e));
        // Headers alone are enough.
        let back = ErrorReply::from_message(Some(&h), b"").unwrap();
        assert_eq!(back.code, ErrorCode::UnknownEvent);
        assert_eq!(back.message, "no such event \"x\"");
        assert_eq!(ErrorReply::from_message(None, &p), None);
    }
}
