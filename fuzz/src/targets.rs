//! The fuzz targets: each runs one wire decoder of the engine on raw bytes and checks what must
//! hold for whatever decodes. A panic (an assertion here, or anything in the engine's code) is
//! a finding.

use agents::kind::{parse_policy, AgentKind};
use agents::kinds::acl::Acl;
use agents::kinds::conn_limit::ConnLimiter;
use agents::kinds::lb::Lb;
use agents::kinds::monitor::metrics::Metrics;
use agents::kinds::rate_limit::RateLimiter;
use base64::Engine as _;
use bus::admin::{PolicyRef, Request};
use bus::event::{Event, EventName};
use bus::limits::Limits;
use bus::merge::{merge, Holds};
use bus::state::keys;
use bus::tap::TapRecord;
use bus::{codec, ErrorReply, State, Value};
use serde_json::json;

pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

pub const TARGETS: [Target; 6] = [
    Target {
        name: "event",
        run: event,
    },
    Target {
        name: "state",
        run: state,
    },
    Target {
        name: "agent-reply",
        run: agent_reply,
    },
    Target {
        name: "admin",
        run: admin,
    },
    Target {
        name: "policy",
        run: policy,
    },
    Target {
        name: "tap",
        run: tap,
    },
];

const EVENTS: [&str; 6] = [
    "new-connection",
    "expose-service",
    "service-list-request",
    "connection-closed",
    "peer-added",
    "custom-hook",
];

/// An event payload under every event name: the bounds, the typed decode, the initial state,
/// and a decoded event re-encodes to itself.
fn event(input: &[u8]) {
    let limits = Limits::default();
    let _ = limits.check_event(input);
    for name in EVENTS {
        let name = EventName::new(name).expect("a valid name");
        let Ok(ev) = Event::decode(&name, input) else {
            continue;
        };
        let initial = ev.initial_state();
        for key in keys::CANDIDATES {
            if let Some(list) = initial.get_strings(key) {
                let mut sorted = list.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(sorted.len(), list.len(), "duplicate candidates offered");
            }
        }
        // Compared as bytes: a NaN attribute is not equal to itself.
        let bytes = ev.encode().expect("a decoded event encodes");
        let again = Event::decode(&name, &bytes).expect("an encoded event decodes");
        assert_eq!(
            again.encode().ok(),
            Some(bytes),
            "event does not round-trip"
        );
        let _ = bus::event::set_attribute(input, keys::CONNECTION_ID, Value::from("c"));
    }
}

/// The state, as a map, as a header (the bytes' base64, and the bytes as text).
fn state(input: &[u8]) {
    if let Ok(s) = State::decode(input) {
        let header = s.to_header().expect("a decoded state encodes");
        let back = State::from_header(&header).expect("its header decodes");
        assert_eq!(
            back.encode().ok(),
            s.encode().ok(),
            "state does not round-trip"
        );
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(input);
    let _ = State::from_header(&b64);
    let _ = State::from_header(&String::from_utf8_lossy(input));
}

/// What the dispatcher does with an agent's answer: an error reply, or a patch merged into a
/// state. Whatever the answer, candidates only narrow and the dispatcher's keys stay put.
fn agent_reply(input: &[u8]) {
    // The first byte says how the rest arrives: bit 0, an error header too; bits 1-2, as the
    // payload (0), as base64 in `Policy-State` (2), or as raw text in it (4, 6).
    let (flag, rest) = input.split_first().unwrap_or((&0, &[]));
    let mut headers = async_nats::HeaderMap::new();
    if flag & 1 == 1 {
        let code = String::from_utf8_lossy(&rest[..rest.len().min(16)]).replace(['\r', '\n'], " ");
        headers.insert(bus::headers::POLICY_ERROR, code.as_str());
    }
    let _ = ErrorReply::from_message(Some(&headers), rest);
    let (header, payload): (Option<String>, &[u8]) = match flag & 6 {
        0 => (None, rest),
        2 => (
            Some(base64::engine::general_purpose::STANDARD.encode(rest)),
            &[],
        ),
        _ => (Some(String::from_utf8_lossy(rest).into_owned()), &[]),
    };
    let Ok(patch) = State::from_reply(header.as_deref(), payload, 512 * 1024) else {
        return;
    };
    let mut s = State::new();
    s.set_strings(keys::DST_PEERS, &["a", "b", "c"]);
    s.insert(keys::CONNECTION_ID, "c1");
    s.insert(keys::EVENT_ID, "e1");
    if merge(&mut s, patch, "fuzz", &mut Holds::default()).is_ok() {
        let left = s
            .get_strings(keys::DST_PEERS)
            .expect("candidates stay a list");
        assert!(left.iter().all(|p| ["a", "b", "c"].contains(p)), "{left:?}");
        assert_eq!(s.get_str(keys::CONNECTION_ID), Some("c1"));
        assert_eq!(s.get_str(keys::EVENT_ID), Some("e1"));
        assert_eq!(s.get(keys::DEGRADED), None);
    }
}

/// Admin arguments under every command, a stored subscription record, policy references.
fn admin(input: &[u8]) {
    for command in [
        "subscribe",
        "unsubscribe",
        "subscriptions",
        "policy-add",
        "policy-remove",
        "policy-list",
        "policy-ad",
    ] {
        if let Ok(Request::PolicyAdd(add)) = Request::decode(command, input) {
            for doc in &add.policies {
                let _ = PolicyRef::of(doc);
            }
        }
    }
    let _ = dispatcher::table::check_record("new-connection", "acl", input);
}

fn sample_events() -> Vec<Event> {
    let name = |n: &str| EventName::new(n).expect("a valid name");
    let encode = |v: serde_json::Value| rmp_serde::to_vec_named(&v).expect("encode");
    [
        (
            "new-connection",
            json!({"src_service": "web", "dst_service": "db", "direction": "outgoing",
                   "src_peer": "p0", "dst_peers": ["p1", "p2"], "connection_id": "c1"}),
        ),
        (
            "expose-service",
            json!({"service": "db", "peers": ["p1", "p2"]}),
        ),
        (
            "service-list-request",
            json!({"src_peer": "p1", "services": ["db", "web"]}),
        ),
    ]
    .into_iter()
    .map(|(n, v)| Event::decode(&name(n), &encode(v)).expect("a valid sample"))
    .collect()
}

/// A policy document for every kind; a valid one compiles and decides the sample events.
fn policy(input: &[u8]) {
    fn decide<K: AgentKind>(kind: &K, input: &[u8], events: &[Event]) {
        if let Ok(p) = parse_policy(kind, input) {
            let rules = kind.compile(vec![agents::kind::Stored::site("p", p)]);
            for ev in events {
                let s = ev.initial_state();
                let patch = kind.decide(&rules, ev, &s);
                let mut merged = s.clone();
                let _ = merge(&mut merged, patch, kind.name(), &mut Holds::default());
            }
        }
    }
    let events = sample_events();
    decide(&Acl::default(), input, &events);
    decide(&Lb, input, &events);
    // The limiters' decide needs their buckets: decode and compile only.
    if let Ok(p) = parse_policy(&ConnLimiter::new(std::time::Duration::from_secs(1)), input) {
        let _ = ConnLimiter::new(std::time::Duration::from_secs(1))
            .compile(vec![agents::kind::Stored::site("p", p)]);
    }
    let rate = RateLimiter::default();
    if let Ok(p) = parse_policy(&rate, input) {
        let _ = rate.compile(vec![agents::kind::Stored::site("p", p)]);
    }
}

/// A tap record, as the monitor reads it.
fn tap(input: &[u8]) {
    if let Ok(record) = codec::decode::<TapRecord>("tap record", input) {
        Metrics::new().record(&record);
    }
}

/// Valid messages for each target: the corpus the mutations start from.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let enc = |v: serde_json::Value| rmp_serde::to_vec_named(&v).expect("encode");
    let list: Vec<(&str, serde_json::Value)> = match target {
        "event" => vec![
            (
                "new-connection",
                json!({"src_service": "web", "dst_service": "db", "direction": "outgoing", "src_peer": "local", "dst_peers": ["peer-a", "peer-b", "peer-a"], "connection_id": "", "x_future": {"k": [1, 2]}}),
            ),
            (
                "expose-service",
                json!({"service": "db", "peers": ["peer-a", "partner-x"]}),
            ),
            (
                "service-list-request",
                json!({"src_peer": "partner-x", "services": ["db", "api"]}),
            ),
            (
                "connection-closed",
                json!({"connection_id": "c1", "src_service": "web", "dst_service": "db", "target_peer": "p1"}),
            ),
            (
                "peer-added",
                json!({"peer": "p9", "labels": {"zone": "eu"}}),
            ),
        ],
        "state" => vec![
            (
                "narrow",
                json!({"dst_peers": ["b", "a"], "reasons": [{"agent": "acl", "policy": "r", "effect": "narrow"}]}),
            ),
            (
                "pick",
                json!({"target_peer": "a", "rate_limit": {"bits_per_second": 1000}}),
            ),
            (
                "forge",
                json!({"connection_id": "x", "event_id": "y", "degraded": true, "action": "deny"}),
            ),
            ("custom", json!({"zone": "eu", "action": "allow"})),
        ],
        "admin" => vec![
            (
                "subscribe",
                json!({"event": "new-connection", "agent": "acl", "priority": 10, "timeout_ms": 250, "failure": "open", "observe": false, "force": true}),
            ),
            (
                "unsubscribe",
                json!({"event": "new-connection", "agent": "acl"}),
            ),
            (
                "policy-add",
                json!({"policies": [{"agent": "acl", "id": "r1", "action": "allow"}]}),
            ),
            ("policy-list", json!({"agent": "acl"})),
        ],
        "policy" => vec![
            (
                "acl",
                json!({"agent": "acl", "id": "p", "priority": 5, "action": "deny", "mode": "audit", "match": {"src_service": "web*", "dst_service": "db", "src_peer": "*", "dst_peer": "p1", "direction": "incoming"}}),
            ),
            (
                "lb",
                json!({"agent": "lb", "id": "p", "dst_service": "db", "scheme": "weighted", "weights": {"p1": 3, "p2": 0}}),
            ),
            (
                "lb-hash",
                json!({"agent": "lb", "id": "p", "dst_service": "*", "scheme": "consistent-hash", "hash_on": "src_peer"}),
            ),
            (
                "conn-limit",
                json!({"agent": "conn-limit", "id": "p", "match": {"target_peer": "p1"}, "max_connections": 2}),
            ),
            (
                "rate-limit",
                json!({"agent": "rate-limit", "id": "p", "match": {"src_service": "web*"}, "rate": "5/250ms", "burst": 3, "bandwidth": "2MB/s", "max_keys": 10}),
            ),
        ],
        "tap" => vec![
            (
                "deny",
                json!({"event": "new-connection", "event_id": "e", "attributes": {"dst_service": "db", "src_peer": "p"}, "decision": {"action": "deny", "connection_id": "c1", "conn_limit": {"holder": "c1#n", "slots": ["slot.p.0"]}, "reasons": [{"agent": "acl", "policy": "r", "effect": "deny"}]}, "total_us": 10, "agents": [{"agent": "conn-limit", "priority": 1, "latency_us": 5, "outcome": "timeout"}], "at_ms": 1}),
            ),
            (
                "allow",
                json!({"event": "service-list-request", "event_id": "e", "attributes": {"src_peer": "p"}, "decision": {"services": ["db"]}, "total_us": 10, "agents": [], "at_ms": 1}),
            ),
        ],
        _ => Vec::new(),
    };
    let mut seeds: Vec<(String, Vec<u8>)> = list
        .into_iter()
        .map(|(n, v)| (n.to_string(), enc(v)))
        .collect();
    if target == "agent-reply" {
        // Each state seed as a payload (flag 0) and in the header (flag 2).
        for (name, bytes) in seeds_of_state() {
            for flag in [0u8, 2] {
                let mut v = vec![flag];
                v.extend_from_slice(&bytes);
                seeds.push((format!("{name}-{flag}"), v));
            }
        }
        let mut error = vec![1u8];
        error.extend_from_slice(b"agent-error");
        seeds.push(("error".into(), error));
    }
    seeds
}

fn seeds_of_state() -> Vec<(String, Vec<u8>)> {
    seeds("state")
}
