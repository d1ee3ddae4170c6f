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

pub(crate) fn unavailable(e: impl std::fmt::Display) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Internal,
        format!("config bucket unavailable: {e}"),
    )
}
