//! The admin commands' replies, shared by `crate::admin` and the modules' commands
//! (`crate::modules`), which the admin commands also ask whether a module is deployed.

use bus::{codec, ErrorCode, ErrorReply};
use bytes::Bytes;
use serde::Serialize;

pub(crate) fn reply<T: Serialize>(value: &T) -> Result<Bytes, ErrorReply> {
    codec::encode("admin reply", value)
        .map(Bytes::from)
        .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))
}

/// An answer the server would refuse never arrives: one over `max_payload` becomes an error
/// that says why.
pub(crate) fn fitting(nats: &async_nats::Client, body: Bytes) -> Result<Bytes, ErrorReply> {
    let max = nats.server_info().max_payload;
    if body.len() <= max {
        return Ok(body);
    }
    Err(ErrorReply::new(
        ErrorCode::BadRequest,
        format!(
            "the answer is {} bytes, over the {max} a NATS message may hold here: ask for less \
             (`policy list KIND`), or raise the server's max_payload",
            body.len()
        ),
    ))
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Internal,
        format!("config bucket unavailable: {e}"),
    )
}
