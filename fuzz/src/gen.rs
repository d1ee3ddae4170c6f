//! Input generation: byte-level mutations of corpus entries, and arbitrary MessagePack trees
//! whose map keys are the contract's own field names, so that decoders get past "missing
//! field" and meet wrong types, odd values and deep nesting where they matter.

use rand::seq::IndexedRandom;
use rand::Rng;
use rmpv::Value;

/// Field names of the contract's maps (events, state, decisions, admin, policies, tap).
const FIELDS: &[&str] = &[
    "src_service",
    "dst_service",
    "direction",
    "src_peer",
    "dst_peers",
    "connection_id",
    "service",
    "peers",
    "services",
    "target_peer",
    "target_peers",
    "action",
    "rate_limit",
    "bits_per_second",
    "reasons",
    "agent",
    "policy",
    "effect",
    "detail",
    "event_id",
    "degraded",
    "event",
    "priority",
    "timeout_ms",
    "failure",
    "observe",
    "force",
    "policies",
    "id",
    "match",
    "mode",
    "scheme",
    "weights",
    "peer",
    "hash_on",
    "max_connections",
    "rate",
    "burst",
    "bandwidth",
    "max_keys",
    "attributes",
    "decision",
    "total_us",
    "agents",
    "latency_us",
    "outcome",
    "at_ms",
    "conn_limit",
    "holder",
    "slots",
    "labels",
    "src_labels",
    "code",
    "message",
    "ok",
    "stored",
];

/// Strings that mean something somewhere: enum values, patterns, names, edge cases.
const WORDS: &[&str] = &[
    "",
    "*",
    "web*",
    "a*b",
    "allow",
    "deny",
    "incoming",
    "outgoing",
    "open",
    "closed",
    "audit",
    "enforce",
    "random",
    "round-robin",
    "weighted",
    "static",
    "consistent-hash",
    "acl",
    "lb",
    "conn-limit",
    "rate-limit",
    "monitor",
    "new-connection",
    "expose-service",
    "50/s",
    "0/s",
    "5/0s",
    "1/h",
    "10Mbit/s",
    "1e400Gbit/s",
    "-1bit/s",
    "answered",
    "timeout",
    "p1",
    "p2",
    "peer-a",
    "a.b",
    "a b",
    "\u{0}",
    "é",
    "🦀",
    "h0000000000000000",
    "slot.x.0",
    "x#y",
];

fn string<R: Rng>(rng: &mut R) -> Value {
    match rng.random_range(0..10) {
        0 => Value::from("x".repeat(rng.random_range(0..5000))),
        1 => Value::String(rmpv::Utf8String::from(
            // Not UTF-8: rmpv keeps the bytes.
            String::from_utf8_lossy(&[0xff, 0xfe, b'a']).into_owned(),
        )),
        2 => {
            let n = rng.random_range(1..20);
            Value::from(
                (0..n)
                    .map(|_| rng.random_range(b'a'..=b'z') as char)
                    .collect::<String>(),
            )
        }
        _ => Value::from(*WORDS.choose(rng).unwrap_or(&"")),
    }
}

fn scalar<R: Rng>(rng: &mut R) -> Value {
    match rng.random_range(0..12) {
        0 => Value::Nil,
        1 => Value::from(rng.random::<bool>()),
        2 => Value::from(
            *[0i64, -1, 1, i64::MIN, i64::MAX, 255, 65_536]
                .choose(rng)
                .unwrap_or(&0),
        ),
        3 => Value::from(*[u64::MAX, 0, 1 << 40].choose(rng).unwrap_or(&0)),
        4 => Value::from(
            *[0.0f64, -0.0, f64::NAN, f64::INFINITY, 1e300]
                .choose(rng)
                .unwrap_or(&0.0),
        ),
        5 => Value::Binary((0..rng.random_range(0..40)).map(|_| rng.random()).collect()),
        6 => Value::Ext(rng.random(), vec![1, 2, 3]),
        _ => string(rng),
    }
}

/// An arbitrary MessagePack value, at most `depth` deep.
pub fn value<R: Rng>(rng: &mut R, depth: u32) -> Value {
    if depth == 0 || rng.random_range(0..3) == 0 {
        return scalar(rng);
    }
    match rng.random_range(0..3) {
        0 => {
            let n = rng.random_range(0..6);
            Value::Array((0..n).map(|_| value(rng, depth - 1)).collect())
        }
        _ => {
            let n = rng.random_range(0..8);
            Value::Map(
                (0..n)
                    .map(|_| {
                        let key = if rng.random_range(0..8) == 0 {
                            scalar(rng)
                        } else {
                            Value::from(*FIELDS.choose(rng).unwrap_or(&"id"))
                        };
                        (key, value(rng, depth - 1))
                    })
                    .collect(),
            )
        }
    }
}

/// A generated input: a map over the contract's fields, or now and then something
/// pathological at the byte level (deep nesting, a length prefix that lies).
pub fn structured<R: Rng>(rng: &mut R) -> Vec<u8> {
    match rng.random_range(0..20) {
        0 => {
            // Deeply nested one-element arrays (or maps), then a scalar.
            let depth = rng.random_range(10..5000);
            let open: &[u8] = if rng.random() {
                &[0x91]
            } else {
                &[0x81, 0xa1, b'k']
            };
            let mut v: Vec<u8> = open.repeat(depth);
            v.push(0xc0);
            v
        }
        1 => {
            // An array32 or str32 claiming billions of items, with almost nothing after.
            let mut v = vec![*[0xddu8, 0xdf, 0xdb, 0xc6].choose(rng).unwrap_or(&0xdd)];
            v.extend_from_slice(&u32::MAX.to_be_bytes());
            v.extend_from_slice(&[0xa1, b'x']);
            v
        }
        _ => {
            let mut top = Value::Map(Vec::new());
            if let Value::Map(entries) = &mut top {
                for _ in 0..rng.random_range(0..12) {
                    let key = *FIELDS.choose(rng).unwrap_or(&"id");
                    entries.push((Value::from(key), value(rng, 4)));
                }
            }
            let mut out = Vec::new();
            let _ = rmpv::encode::write_value(&mut out, &top);
            out
        }
    }
}

/// A byte-level mutation of `input`, sometimes spliced with `other`.
pub fn mutate<R: Rng>(rng: &mut R, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.random_range(1..5) {
        let len = v.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = *[
                    0x00u8, 0xff, 0x7f, 0x80, 0xc0, 0xc1, 0xc3, 0xd9, 0xdc, 0xde, 0x90, 0x80,
                ]
                .choose(rng)
                .unwrap_or(&0);
            }
            2 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 1 => {
                let a = rng.random_range(0..len);
                let b = rng.random_range(a..=len);
                v.drain(a..b);
            }
            4 if len > 0 => {
                v.truncate(rng.random_range(0..len));
            }
            5 if len > 1 => {
                let a = rng.random_range(0..len);
                let b = rng.random_range(a..=len.min(a + 64));
                let chunk = v[a..b].to_vec();
                let at = rng.random_range(0..=v.len());
                v.splice(at..at, chunk);
            }
            6 if !other.is_empty() => {
                let cut = rng.random_range(0..=v.len());
                let from = rng.random_range(0..other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ => {
                let i = rng.random_range(0..=len);
                v.insert(i, rng.random());
            }
        }
    }
    v
}
