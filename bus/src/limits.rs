//! Bounds on what arrives from the network, checked before anything is decoded into types or
//! handed to an agent: a hookpoint (or anyone who can publish an event) must not be able to
//! make the engine allocate, recurse or fan out without limit.

use std::fmt::Write as _;

use crate::state::Value;

/// The bounds of an event payload. Defaults fit ClusterLink's events with room to spare:
/// 10 000 candidates of 20 characters are ~220 KB of payload, and the state header that
/// carries them to each agent is a third larger again, under NATS's default 1 MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of the whole payload.
    pub max_event_bytes: usize,
    /// Items of any list and entries of any map (candidate lists, label maps).
    pub max_candidates: usize,
    /// Bytes of any string, keys included (service, peer and label names).
    pub max_string_bytes: usize,
    /// Nesting of lists and maps (labels per peer are three deep).
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_bytes: 256 * 1024,
            max_candidates: 10_000,
            max_string_bytes: 1024,
            max_depth: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("payload is {bytes} bytes; the limit is {limit}")]
    TooLarge { bytes: usize, limit: usize },
    #[error("`{path}` has {count} items; the limit is {limit}")]
    TooMany {
        path: String,
        count: usize,
        limit: usize,
    },
    #[error("`{path}` is a string of {bytes} bytes; the limit is {limit}")]
    TooLong {
        path: String,
        bytes: usize,
        limit: usize,
    },
    #[error("`{path}` nests lists and maps deeper than {limit}")]
    TooDeep { path: String, limit: usize },
}

impl Limits {
    /// Checks an event payload's size, then every list, map and string in it. A payload that
    /// is not MessagePack passes here: decoding it says what is wrong with it.
    pub fn check_event(&self, payload: &[u8]) -> Result<(), LimitError> {
        self.decode_event(payload).map(drop)
    }

    /// [`Self::check_event`], returning the payload decoded as a value when it is one (a
    /// payload that is not MessagePack passes here, for the typed decode to name its error),
    /// so that the caller need not decode it again.
    pub fn decode_event(&self, payload: &[u8]) -> Result<Option<Value>, LimitError> {
        if payload.len() > self.max_event_bytes {
            return Err(LimitError::TooLarge {
                bytes: payload.len(),
                limit: self.max_event_bytes,
            });
        }
        // Depth first, without recursion: the decode below recurses once per level. One level
        // of slack lets the walk below name the path of a payload just one level too deep.
        if let Err(crate::codec::ShapeError::TooDeep { .. }) =
            crate::codec::check_depth(payload, self.max_depth + 1)
        {
            return Err(LimitError::TooDeep {
                path: "(payload)".into(),
                limit: self.max_depth,
            });
        }
        match crate::codec::decode::<Value>("event", payload) {
            Ok(value) => {
                self.check_value(&value, &mut String::new(), 0)?;
                Ok(Some(value))
            }
            Err(_) => Ok(None),
        }
    }

    pub fn check_value(
        &self,
        value: &Value,
        path: &mut String,
        depth: usize,
    ) -> Result<(), LimitError> {
        let here = |path: &String| {
            if path.is_empty() {
                "(payload)".to_string()
            } else {
                path.clone()
            }
        };
        match value {
            Value::String(s) => {
                let bytes = s.as_bytes().len();
                if bytes > self.max_string_bytes {
                    return Err(LimitError::TooLong {
                        path: here(path),
                        bytes,
                        limit: self.max_string_bytes,
                    });
                }
            }
            Value::Binary(b) if b.len() > self.max_string_bytes => {
                return Err(LimitError::TooLong {
                    path: here(path),
                    bytes: b.len(),
                    limit: self.max_string_bytes,
                });
            }
            Value::Array(items) => {
                self.container(path, items.len(), depth)?;
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    let _ = write!(path, "[{i}]");
                    self.check_value(item, path, depth + 1)?;
                    path.truncate(len);
                }
            }
            Value::Map(entries) => {
                self.container(path, entries.len(), depth)?;
                for (k, v) in entries {
                    self.check_value(k, path, depth + 1)?;
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    match k.as_str() {
                        Some(name) => path.push_str(name),
                        None => path.push('?'),
                    }
                    self.check_value(v, path, depth + 1)?;
                    path.truncate(len);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn container(&self, path: &str, count: usize, depth: usize) -> Result<(), LimitError> {
        let shown = || {
            if path.is_empty() {
                "(payload)".to_string()
            } else {
                path.to_string()
            }
        };
        if depth >= self.max_depth {
            return Err(LimitError::TooDeep {
                path: shown(),
                limit: self.max_depth,
            });
        }
        if count > self.max_candidates {
            return Err(LimitError::TooMany {
                path: shown(),
                count,
                limit: self.max_candidates,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    fn encode(v: &Value) -> Vec<u8> {
        codec::encode("t", v).unwrap()
    }

    fn map(entries: Vec<(&str, Value)>) -> Value {
        Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (Value::from(k), v))
                .collect(),
        )
    }

    #[test]
    fn every_bound_names_what_broke_it() {
        let l = Limits {
            max_event_bytes: 10_000,
            max_candidates: 3,
            max_string_bytes: 10,
            max_depth: 3,
        };
        let peers = |n: usize| Value::Array((0..n).map(|i| Value::from(format!("p{i}"))).collect());
        assert_eq!(
            l.check_event(&encode(&map(vec![("dst_peers", peers(3))]))),
            Ok(())
        );
        assert_eq!(
            l.check_event(&encode(&map(vec![("dst_peers", peers(4))]))),
            Err(LimitError::TooMany {
                path: "dst_peers".into(),
                count: 4,
                limit: 3
            })
        );
        let long = map(vec![(
            "dst_peers",
            Value::Array(vec![Value::from("p"), Value::from("12345678901")]),
        )]);
        assert_eq!(
            l.check_event(&encode(&long)),
            Err(LimitError::TooLong {
                path: "dst_peers[1]".into(),
                bytes: 11,
                limit: 10
            })
        );
        let deep = map(vec![("a", map(vec![("b", map(vec![("c", map(vec![]))]))]))]);
        assert!(matches!(
            l.check_event(&encode(&deep)),
            Err(LimitError::TooDeep { path, .. }) if path == "a.b.c"
        ));
        let big = vec![0xc4u8; 10_001];
        assert!(matches!(
            l.check_event(&big),
            Err(LimitError::TooLarge { .. })
        ));
        // Not MessagePack: left to the decoder to explain.
        assert_eq!(l.check_event(b"\xc1"), Ok(()));
    }

    #[test]
    fn ten_thousand_candidates_fit_the_defaults() {
        let peers: Vec<Value> = (0..10_000)
            .map(|i| Value::from(format!("peer-{i:05}.cluster-east")))
            .collect();
        let event = map(vec![
            ("src_service", Value::from("web")),
            ("dst_peers", Value::Array(peers)),
        ]);
        assert_eq!(Limits::default().check_event(&encode(&event)), Ok(()));
    }
}
