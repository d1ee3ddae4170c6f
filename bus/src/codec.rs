//! MessagePack with named fields: payloads are maps so that any language's plain MessagePack
//! library reads them and new fields can be added without breaking old readers.
//!
//! Every decode of bytes from the network first walks them without recursion ([`check_depth`]):
//! the MessagePack decoders recurse once per nesting level, and their own limit (1024 levels)
//! is safe only as long as a level's stack frame is small. The fuzzer found a payload of 500
//! nested one-element lists (a few kilobytes) overflowing a debug build's 2 MiB thread stack;
//! release builds held at 1000. With the walk, the depth is 32 whatever the build.

use serde::{de::DeserializeOwned, Serialize};

/// Nesting of lists and maps any message of the contract may have. The deepest real one, a
/// tap record carrying an event's per-peer labels, is about 8.
pub const MAX_DEPTH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not valid MessagePack for {what}: {}", plain(source))]
    Decode {
        what: &'static str,
        #[source]
        source: rmp_serde::decode::Error,
    },
    /// Decoded, but a field is missing or has the wrong type: the path names it.
    #[error("bad {what}: field `{path}`: {}", plain(source))]
    Field {
        what: &'static str,
        path: String,
        #[source]
        source: rmp_serde::decode::Error,
    },
    #[error("not valid MessagePack for {what}: {source}")]
    Shape {
        what: &'static str,
        #[source]
        source: ShapeError,
    },
    /// A message of the contract is a map of named fields. MessagePack decoders also fill a
    /// struct from a list, by position; a list is refused here, so that every reader of the
    /// message (dispatcher, agents, any language's plain decoder) sees the same fields.
    #[error("bad {what}: expected a map of named fields, found {found}")]
    NotAMap {
        what: &'static str,
        found: &'static str,
    },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: rmp_serde::encode::Error,
    },
}

/// A decode error in the user's words: serde names the Rust type it wanted (`expected struct
/// NewConnection`), which says nothing to whoever sent the message.
fn plain(e: &rmp_serde::decode::Error) -> String {
    let text = e.to_string();
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find("expected struct ") {
        out.push_str(&rest[..at]);
        out.push_str("expected a map");
        let after = &rest[at + "expected struct ".len()..];
        let name_len = after
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .unwrap_or(after.len());
        rest = &after[name_len..];
    }
    out.push_str(rest);
    out
}

/// What the non-recursive walk found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("lists and maps nested deeper than {limit}")]
    TooDeep { limit: usize },
    #[error("cut short at byte {at}")]
    Truncated { at: usize },
    #[error("reserved byte 0xc1 at byte {at}")]
    Reserved { at: usize },
    /// More bytes after the one value a message is: a message is one value, and a record
    /// that embeds it (the tap) must not carry garbage along.
    #[error("{extra} bytes after the value, from byte {at}")]
    Trailing { at: usize, extra: usize },
}

pub fn encode<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec_named(value).map_err(|source| CodecError::Encode { what, source })
}

pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    check_depth(bytes, MAX_DEPTH).map_err(|source| CodecError::Shape { what, source })?;
    // The plain decode first: tracking the path costs on every field of every message, and is
    // only needed to say where a bad one went wrong.
    if let Ok(v) = rmp_serde::from_slice(bytes) {
        return Ok(v);
    }
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let source = e.into_inner();
        if path == "." || path.is_empty() {
            CodecError::Decode { what, source }
        } else {
            CodecError::Field { what, path, source }
        }
    })
}

/// [`decode`], for the messages of the contract that are maps (events, admin arguments): a
/// list of positional fields, or any other value, is refused with [`CodecError::NotAMap`].
pub fn decode_map<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    let found = match bytes.first() {
        Some(0x80..=0x8f | 0xde | 0xdf) => return decode(what, bytes),
        None => "nothing",
        Some(0x90..=0x9f | 0xdc | 0xdd) => "a list (positional fields)",
        Some(0xa0..=0xbf | 0xd9..=0xdb) => "a string",
        Some(0xc4..=0xc6) => "binary data",
        Some(0xc0) => "nil",
        Some(_) => "a single value",
    };
    Err(CodecError::NotAMap { what, found })
}

/// Walks the first MessagePack value in `bytes` with an explicit stack, checking that lists
/// and maps nest at most `max_depth` deep and that every length fits in the bytes. Linear in
/// the input whatever it claims (a list of four billion items in ten bytes ends at byte ten).
pub fn check_depth(bytes: &[u8], max_depth: usize) -> Result<(), ShapeError> {
    // Values still to read at each open level; the bottom entry is the one top-level value.
    let mut pending: Vec<u64> = vec![1];
    let mut pos = 0usize;
    let need = |pos: usize, n: usize| -> Result<usize, ShapeError> {
        pos.checked_add(n)
            .filter(|end| *end <= bytes.len())
            .ok_or(ShapeError::Truncated { at: bytes.len() })
    };
    let uint = |pos: usize, n: usize| -> Result<u64, ShapeError> {
        let end = need(pos, n)?;
        Ok(bytes[pos..end]
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    };
    while let Some(top) = pending.last_mut() {
        if *top == 0 {
            pending.pop();
            continue;
        }
        *top -= 1;
        let marker = *bytes.get(pos).ok_or(ShapeError::Truncated { at: pos })?;
        pos += 1;
        // (bytes to skip, items of a container opened here)
        let (skip, open): (usize, Option<u64>) = match marker {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => (0, None),
            0x80..=0x8f => (0, Some(2 * u64::from(marker & 0x0f))),
            0x90..=0x9f => (0, Some(u64::from(marker & 0x0f))),
            0xa0..=0xbf => (usize::from(marker & 0x1f), None),
            0xc1 => return Err(ShapeError::Reserved { at: pos - 1 }),
            0xc4 | 0xd9 => (1 + uint(pos, 1)? as usize, None),
            0xc5 | 0xda => (2 + uint(pos, 2)? as usize, None),
            0xc6 | 0xdb => (4 + uint(pos, 4)? as usize, None),
            0xc7 => (2 + uint(pos, 1)? as usize, None),
            0xc8 => (3 + uint(pos, 2)? as usize, None),
            0xc9 => (5 + uint(pos, 4)? as usize, None),
            0xca | 0xce | 0xd2 => (4, None),
            0xcb | 0xcf | 0xd3 => (8, None),
            0xcc | 0xd0 => (1, None),
            0xcd | 0xd1 => (2, None),
            0xd4 => (2, None),
            0xd5 => (3, None),
            0xd6 => (5, None),
            0xd7 => (9, None),
            0xd8 => (17, None),
            0xdc => (2, Some(uint(pos, 2)?)),
            0xdd => (4, Some(uint(pos, 4)?)),
            0xde => (2, Some(2 * uint(pos, 2)?)),
            0xdf => (4, Some(2 * uint(pos, 4)?)),
        };
        pos = need(pos, skip)?;
        if let Some(items) = open {
            if pending.len() > max_depth {
                return Err(ShapeError::TooDeep { limit: max_depth });
            }
            pending.push(items);
        }
    }
    if pos != bytes.len() {
        return Err(ShapeError::Trailing {
            at: pos,
            extra: bytes.len() - pos,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Value;

    #[test]
    fn nesting_is_bounded_without_recursion() {
        let nested = |depth: usize| {
            let mut v = [0x81u8, 0xa1, b'k'].repeat(depth);
            v.push(0xc0);
            v
        };
        assert_eq!(check_depth(&nested(32), 32), Ok(()));
        assert_eq!(
            check_depth(&nested(33), 32),
            Err(ShapeError::TooDeep { limit: 32 })
        );
        // A million levels is an error, not a crash.
        let err = decode::<Value>("t", &[0x91u8].repeat(1_000_000)).unwrap_err();
        assert!(err.to_string().contains("deeper than 32"), "{err}");
    }

    #[test]
    fn contract_messages_are_maps_never_positional_lists() {
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Two {
            a: String,
            b: u32,
        }
        let named = encode(
            "t",
            &Two {
                a: "x".into(),
                b: 1,
            },
        )
        .unwrap();
        assert_eq!(
            decode_map::<Two>("t", &named).unwrap(),
            Two {
                a: "x".into(),
                b: 1
            }
        );
        // The same fields by position: the plain decoder takes them, the contract does not.
        let positional = rmp_serde::to_vec(&("x", 1u32)).unwrap();
        assert!(decode::<Two>("t", &positional).is_ok());
        let err = decode_map::<Two>("t", &positional).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad t: expected a map of named fields, found a list (positional fields)"
        );
        for (bytes, found) in [
            (vec![], "nothing"),
            (vec![0xc0], "nil"),
            (vec![0xa1, b'x'], "a string"),
            (vec![0x05], "a single value"),
        ] {
            assert!(
                decode_map::<Two>("t", &bytes)
                    .unwrap_err()
                    .to_string()
                    .ends_with(found),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn a_message_is_one_value_and_nothing_after_it() {
        assert_eq!(check_depth(&[0x90], 32), Ok(()));
        assert_eq!(
            check_depth(&[0x90, 0xc0, 0xc0], 32),
            Err(ShapeError::Trailing { at: 1, extra: 2 })
        );
        let err = decode::<Value>("event", &[0x80, 0x01]).unwrap_err();
        assert!(err.to_string().contains("1 bytes after the value"), "{err}");
    }

    #[test]
    fn lengths_that_lie_are_truncations() {
        let mut v = vec![0xddu8];
        v.extend_from_slice(&u32::MAX.to_be_bytes());
        v.push(0xc0);
        assert_eq!(check_depth(&v, 32), Err(ShapeError::Truncated { at: 6 }));
        assert_eq!(
            check_depth(&[0xdb, 0xff, 0xff, 0xff, 0xff, b'a'], 32),
            Err(ShapeError::Truncated { at: 6 })
        );
        assert_eq!(
            check_depth(&[0xc1], 32),
            Err(ShapeError::Reserved { at: 0 })
        );
        assert_eq!(check_depth(&[], 32), Err(ShapeError::Truncated { at: 0 }));
    }

    #[test]
    fn every_valid_message_passes() {
        let v = Value::Map(vec![
            (
                Value::from("a"),
                Value::Array(vec![Value::from(1), Value::from(-300), Value::from(1.5)]),
            ),
            (Value::from("b"), Value::Binary(vec![0; 300])),
            (Value::from("c"), Value::Ext(3, vec![1, 2, 3, 4])),
            (Value::from("d"), Value::from("x".repeat(70_000))),
            (Value::from("e"), Value::from(u64::MAX)),
            (
                Value::from("f"),
                Value::Array((0..70_000).map(Value::from).collect()),
            ),
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &v).unwrap();
        assert_eq!(check_depth(&bytes, 2), Ok(()));
        assert_eq!(decode::<Value>("t", &bytes).unwrap(), v);
    }

    #[test]
    fn decode_errors_name_no_rust_type() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct NewConnection {
            src_service: String,
        }
        let bytes = encode("s", &"a string").unwrap();
        let err = decode::<NewConnection>("new-connection event", &bytes).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("NewConnection"), "{text}");
        assert!(text.contains("expected a map"), "{text}");
    }
}
