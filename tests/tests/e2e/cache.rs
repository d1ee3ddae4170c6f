//! The dispatcher's verdict cache: repeated events are answered without calling the pure
//! agents, policy changes are reflected exactly (never a verdict of an old policy set once the
//! new one is in force), and a cached decision reads exactly as a fresh one.

use std::time::Duration;

use bus::tap::TapRecord;
use bus::Action;
use e2e::Engine;
use futures::StreamExt;
use serde_json::json;

use crate::*;

/// Two dispatchers in front of acl and a consistent-hash lb: both cacheable.
async fn cached_engine(dispatcher_args: &[&str]) -> Engine {
    let mut engine = Engine::new();
    engine.spawn("policy-dispatcher", dispatcher_args);
    engine.spawn("policy-dispatcher", dispatcher_args);
    engine.agent("acl", &[]);
    engine.agent("lb", &[]);
    engine
        .wait_instances(bus::headers::DISPATCHER_SERVICE, 2)
        .await;
    for k in ["acl", "lb"] {
        let kind = bus::Kind::new(k).expect("kind");
        engine
            .wait_instances(&bus::headers::agent_service(&kind), 1)
            .await;
    }
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "lb", 20),
        ],
    )
    .await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "web-db", "action": "allow",
                "match": {"src_service": "web", "dst_service": "db"}})),
            doc(
                json!({"agent": "lb", "id": "db-sticky", "dst_service": "db",
                "scheme": "consistent-hash"}),
            ),
        ])
        .await
        .expect("policy add");
    eventually_allowed(&engine.hook().await, "policies loaded").await;
    engine
}

/// The tap records of `new-connection` from now on.
pub(crate) async fn tap(engine: &Engine) -> async_nats::Subscriber {
    let nats = engine.client().await;
    let sub = nats
        .subscribe(engine.subjects().tap("new-connection"))
        .await
        .expect("tap");
    nats.flush().await.expect("flush");
    sub
}

/// Reads tap records until `n` have come (or a second passes without one).
pub(crate) async fn records(sub: &mut async_nats::Subscriber, n: usize) -> Vec<TapRecord> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
            Ok(Some(msg)) => out.push(bus::codec::decode("tap", &msg.payload).expect("tap record")),
            _ => break,
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_verdicts_follow_every_policy_change_and_read_as_fresh_ones() {
    let engine = cached_engine(&[]).await;
    let (hook, admin) = (engine.hook().await, engine.admin().await);
    let mut taps = tap(&engine).await;
    let ask = || async {
        hook.new_connection(&conn("web", "db", &["p1", "p2", "p3"]))
            .await
            .expect("decision")
    };

    // Repeated events: after the first of each dispatcher, acl and lb are answered from the
    // cache, with the very reasons and peer a fresh answer gave.
    let fresh = ask().await;
    assert_eq!(fresh.action, Action::Allow, "{fresh:?}");
    for _ in 0..30 {
        let again = ask().await;
        assert_eq!(again.action, fresh.action);
        assert_eq!(again.target_peer, fresh.target_peer);
        assert_eq!(again.reasons, fresh.reasons);
    }
    let seen = records(&mut taps, 31).await;
    let cached = |agent: &str| {
        seen.iter()
            .filter(|r| r.agents.iter().any(|a| a.agent == agent && a.cached))
            .count()
    };
    assert!(cached("acl") >= 25, "acl cached {} of 31", cached("acl"));
    assert!(cached("lb") >= 25, "lb cached {} of 31", cached("lb"));

    // Policy changes interleaved with decisions: each change is in force within moments on
    // both dispatchers, and once a decision shows it, none shows the old set again (a stale
    // cached verdict would).
    for round in 0..8 {
        let deny = round % 2 == 0;
        if deny {
            admin
                .policy_add(vec![doc(json!({"agent": "acl", "id": "no-web-db",
                    "priority": -1, "action": "deny",
                    "match": {"src_service": "web", "dst_service": "db"}}))])
                .await
                .expect("add the deny");
        } else {
            admin
                .policy_remove("acl", "no-web-db")
                .await
                .expect("remove the deny");
        }
        let want = if deny { Action::Deny } else { Action::Allow };
        let mut switched = None;
        for i in 0..120 {
            let d = ask().await;
            match (switched, d.action == want) {
                (None, true) => switched = Some(i),
                (None, false) => tokio::time::sleep(Duration::from_millis(10)).await,
                (Some(at), false) => panic!(
                    "round {round}: decision {i} went back to the old policy set after decision {at} showed the new one: {d:?}"
                ),
                (Some(_), true) => {
                    let acl = effects(&d.reasons, "acl");
                    let expected = if deny {
                        pair("no-web-db", "deny")
                    } else {
                        pair("web-db", "allow")
                    };
                    assert!(acl.contains(&expected), "round {round}: {d:?}");
                }
            }
        }
        let at = switched.unwrap_or_else(|| panic!("round {round}: the change never showed"));
        assert!(at < 60, "round {round}: took {at} decisions to show");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_cache_off_every_decision_calls_the_agents() {
    let engine = cached_engine(&["--verdict-cache", "0"]).await;
    let hook = engine.hook().await;
    let mut taps = tap(&engine).await;
    for _ in 0..20 {
        let d = hook
            .new_connection(&conn("web", "db", &["p1", "p2"]))
            .await
            .expect("decision");
        assert_eq!(d.action, Action::Allow, "{d:?}");
    }
    let seen = records(&mut taps, 20).await;
    assert_eq!(seen.len(), 20);
    for r in &seen {
        assert!(
            r.agents.iter().all(|a| !a.cached && a.latency_us > 0),
            "{:?}",
            r.agents
        );
    }
}
