//! End-to-end tests: a real nats-server, the real `policy-dispatcher` and `policy-agent`
//! binaries, and the typed clients of the `bus` crate.

mod chain;
mod decisions;
mod robustness;

use std::future::Future;
use std::time::{Duration, Instant};

use bus::admin::{FailureMode, Subscription};
use bus::event::{Direction, NewConnection};
use bus::{AdminClient, EventName, Value};
use e2e::WAIT;

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

pub fn conn(src: &str, dst: &str, peers: &[&str]) -> NewConnection {
    NewConnection {
        src_service: src.into(),
        dst_service: dst.into(),
        direction: Direction::Outgoing,
        src_peer: Some("local".into()),
        dst_peers: Some(peers.iter().map(|p| p.to_string()).collect()),
        connection_id: None,
    }
}

/// Retries `check` until it passes or [`WAIT`] runs out: agents apply stored policies a few
/// milliseconds after `policy add` returns.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
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
