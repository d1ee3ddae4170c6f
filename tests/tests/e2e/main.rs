//! End-to-end tests: a real nats-server, the real `policy-dispatcher` and `policy-agent`
//! binaries, and the typed clients of the `bus` crate.

mod battery;
mod bucket;
mod cache;
mod chain;
mod cluster;
mod clusterlink;
mod containers;
mod decision_log;
mod decisions;
mod declarative;
mod deputies;
mod docs;
mod dryrun;
mod events;
mod faults;
mod fleet;
mod fleet_faults;
mod fleet_secure;
mod fleet_up;
mod integrity;
mod kubernetes;
mod labels;
mod layout;
mod limits;
mod live;
mod monitor;
mod robustness;
mod security;
mod slots;
mod telemetry;
mod traces;
mod undo;
mod wasm;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use base64::Engine as _;
use futures::StreamExt;
use rmpv::Value as V;
use std::time::{Duration, Instant};

use bus::admin::{FailureMode, Subscription};
use bus::event::{Direction, NewConnection};
use bus::{AdminClient, EventName, Value};
use e2e::WAIT;

/// The shipped examples folder.
pub const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");

/// An engine on the secured bus with every shipped kind, as the examples need (the monitor
/// with its metrics on a port of its own: the default would clash with another test's).
pub async fn every_kind_engine() -> e2e::Engine {
    let mut engine = e2e::Engine::secured();
    let metrics = format!("127.0.0.1:{}", e2e::free_port());
    engine.agent("monitor", &["--metrics-addr", &metrics]);
    engine
        .start(&["acl", "lb", "conn-limit", "rate-limit"])
        .await;
    engine.wait_instances("policy-agent-monitor", 1).await;
    engine
}

/// Runs `policyctl` against the engine (as the role its command needs): exit status, stdout,
/// stderr.
pub fn policyctl(engine: &e2e::Engine, args: &[&str]) -> (Option<i32>, String, String) {
    let out = engine
        .command("policyctl", args)
        .output()
        .expect("policyctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `policyctl test CASES` until it passes, for at most 5 s: the agents load policies a
/// moment after they are stored. The last run's exit status, stdout and stderr.
pub async fn test_cases_pass(engine: &e2e::Engine, cases: &str) -> (Option<i32>, String, String) {
    let mut passed = (None, String::new(), String::new());
    for _ in 0..50 {
        passed = policyctl(engine, &["test", cases]);
        if passed.0 == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    passed
}

/// Labels from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> bus::event::Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A policy document from JSON, as `policyctl` would send one parsed from YAML.
pub fn doc(json: serde_json::Value) -> Value {
    rmpv::ext::to_value(json).expect("json to msgpack value")
}

pub fn sub(event: &str, agent: &str, priority: i32) -> Subscription {
    Subscription {
        event: EventName::new(event).expect("event"),
        agent: agent.into(),
        priority,
        timeout_ms: 1000,
        failure: FailureMode::Closed,
        observe: false,
    }
}

pub async fn subscribe(admin: &AdminClient, subs: &[Subscription]) {
    for s in subs {
        admin.subscribe(s).await.expect("subscribe");
    }
}

/// Subscribes with `force`: for a kind that does not answer `$SRV.PING` (a bare subscriber, or
/// no instance at all) or an event the contract does not name.
pub async fn subscribe_forced(admin: &AdminClient, subs: &[Subscription]) {
    for s in subs {
        admin
            .subscribe_with(&bus::admin::Subscribe::new(s.clone(), true))
            .await
            .expect("subscribe --force");
    }
}

pub fn conn(src: &str, dst: &str, peers: &[&str]) -> NewConnection {
    NewConnection {
        src_service: src.into(),
        dst_service: dst.into(),
        direction: Direction::Outgoing,
        src_peer: Some("local".into()),
        dst_peers: Some(peers.iter().map(|p| p.to_string()).collect()),
        connection_id: None,
        src_labels: None,
        dst_labels: None,
        peer_labels: None,
        namespace: None,
    }
}

/// Retries `check` until it passes or [`WAIT`] runs out: agents apply stored policies a few
/// milliseconds after `policy add` returns.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    eventually_within(what, WAIT, check).await
}

/// [`eventually`], with a bound of its own.
pub async fn eventually_within<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// Waits until `web -> db` over `p1` is allowed: the policies just stored have reached the
/// agents.
pub async fn eventually_allowed(hook: &bus::Client, what: &str) {
    eventually(what, || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        (d.action == bus::Action::Allow)
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
}

/// The `(policy, effect)` pairs of a decision's reasons, for one agent.
pub fn effects(reasons: &[bus::Reason], agent: &str) -> Vec<(String, String)> {
    reasons
        .iter()
        .filter(|r| r.agent == agent)
        .map(|r| (r.policy.clone(), r.effect.to_string()))
        .collect()
}

pub fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

pub type Map = BTreeMap<String, V>;

/// A third-party agent written against the contract (docs/contract.md) only: raw NATS, MessagePack and base64, and
/// the subjects spelled as the contract spells them. `handle` gets the event's attributes and
/// the state, and returns the patch to answer with (`None`: never answer).
pub async fn foreign_agent<F, Fut>(url: &str, kind: &str, event: &str, handle: F)
where
    F: Fn(V, Map) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<Map>> + Send + 'static,
{
    let client = async_nats::connect(url).await.expect("connect");
    let mut sub = client
        .queue_subscribe(format!("policy.agent.{kind}.{event}"), kind.to_string())
        .await
        .expect("subscribe");
    // The services API's ping, as the contract asks of every agent: the dispatcher checks a
    // kind is live before it puts it in a chain.
    let mut pings = client
        .subscribe(format!("$SRV.PING.policy-agent-{kind}"))
        .await
        .expect("subscribe ping");
    client.flush().await.expect("flush");
    let (pinged, name) = (client.clone(), format!("policy-agent-{kind}"));
    tokio::spawn(async move {
        while let Some(msg) = pings.next().await {
            let pong = serde_json::json!({"type": "io.nats.micro.v1.ping_response",
                "name": name, "id": "foreign-1", "version": "0.0.1", "metadata": {}});
            if let Some(reply) = msg.reply {
                let _ = pinged.publish(reply, pong.to_string().into()).await;
            }
        }
    });
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let (client, handle) = (client.clone(), handle.clone());
            tokio::spawn(async move {
                let attrs: V = rmp_serde::from_slice(&msg.payload).expect("attributes are msgpack");
                let header = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Policy-State"))
                    .expect("state header");
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(header.as_str())
                    .expect("base64");
                let state: Map = rmp_serde::from_slice(&raw).expect("state is a msgpack map");
                if let Some(patch) = handle(attrs, state).await {
                    let mut h = async_nats::HeaderMap::new();
                    let encoded = base64::engine::general_purpose::STANDARD
                        .encode(rmp_serde::to_vec_named(&patch).expect("encode"));
                    h.insert("Policy-State", encoded.as_str());
                    if let Some(reply) = msg.reply {
                        client
                            .publish_with_headers(reply, h, bytes::Bytes::new())
                            .await
                            .expect("reply");
                    }
                }
            });
        }
    });
}
