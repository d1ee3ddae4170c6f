//! MessagePack with named fields: payloads are maps so that any language's plain MessagePack
//! library reads them and new fields can be added without breaking old readers.

use serde::{de::DeserializeOwned, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not valid MessagePack for {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: rmp_serde::decode::Error,
    },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: rmp_serde::encode::Error,
    },
}

pub fn encode<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec_named(value).map_err(|source| CodecError::Encode { what, source })
}

pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    rmp_serde::from_slice(bytes).map_err(|source| CodecError::Decode { what, source })
}
