//! The chain: priority order, state passing, concurrency, timeouts and failure modes, and a
//! third-party agent that knows only the contract.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus::Action;
use e2e::Engine;
use rmpv::Value as V;
use serde_json::json;

use crate::*;

fn strings(v: Option<&V>) -> Vec<String> {
    match v {
        Some(V::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn reason(agent: &str, policy: &str, effect: &str) -> V {
    V::Map(vec![
        (V::from("agent"), V::from(agent)),
        (V::from("policy"), V::from(policy)),
        (V::from("effect"), V::from(effect)),
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn priority_order_state_passing_and_a_kind_the_code_never_heard_of() {
    let mut engine = Engine::new();
    engine.start(&["acl", "lb"]).await;
    let seen = Arc::new(Mutex::new(Vec::<Vec<String>>::new()));
    let log = seen.clone();
    // Narrows to the candidates in "eu", tries to add one the event never offered, and
    // hands the gateway a key of its own.
    foreign_agent(
        &engine.nats.url(),
        "geo",
        "new-connection",
        move |_attrs, state| {
            let offered = strings(state.get("dst_peers"));
            log.lock().unwrap().push(offered.clone());
            async move {
                let mut keep: Vec<V> = offered
                    .iter()
                    .filter(|p| p.ends_with("-eu"))
                    .map(|p| V::from(p.as_str()))
                    .collect();
                keep.push(V::from("smuggled-eu"));
                let mut patch = Map::new();
                patch.insert("dst_peers".into(), V::Array(keep));
                patch.insert("zone".into(), V::from("eu"));
                patch.insert(
                    "reasons".into(),
                    V::Array(vec![reason("geo", "eu-only", "narrow")]),
                );
                Some(patch)
            }
        },
    )
    .await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "geo", 15),
            sub("new-connection", "lb", 20),
        ],
    )
    .await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "not-b", "priority": 1, "action": "deny", "match": {"dst_peer": "b-*"}})),
            doc(json!({"agent": "acl", "id": "rest", "priority": 2, "action": "allow"})),
        ])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    eventually("acl narrows before geo", || async {
        seen.lock().unwrap().clear();
        let d = hook
            .new_connection(&conn("web", "db", &["a-us", "b-eu", "c-eu"]))
            .await
            .map_err(|e| e.to_string())?;
        // acl (10) removed b-eu; geo (15) saw that and kept c-eu; lb (20) could only pick it.
        if seen.lock().unwrap().as_slice() != [vec!["a-us".to_string(), "c-eu".to_string()]] {
            return Err(format!("geo saw {:?}", seen.lock().unwrap()));
        }
        assert_eq!(d.action, Action::Allow);
        assert_eq!(d.target_peer.as_deref(), Some("c-eu"));
        assert_eq!(
            strings(d.extra.get("dst_peers")),
            ["c-eu"],
            "a candidate was added"
        );
        assert_eq!(d.extra.get("zone"), Some(&V::from("eu")));
        let order: Vec<&str> = d.reasons.iter().map(|r| r.agent.as_str()).collect();
        assert_eq!(order, ["acl", "acl", "geo", "lb"]);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn equal_priorities_run_concurrently() {
    let mut engine = Engine::new();
    engine.start(&[]).await;
    // Each agent answers only once both have been asked: run one after the other, the first
    // would wait for the second forever and the chain would time out.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    for kind in ["left", "right"] {
        let barrier = barrier.clone();
        foreign_agent(
            &engine.nats.url(),
            kind,
            "expose-service",
            move |_, state| {
                let barrier = barrier.clone();
                async move {
                    tokio::time::timeout(Duration::from_secs(3), barrier.wait())
                        .await
                        .ok()?;
                    let mut patch = Map::new();
                    patch.insert(
                        "target_peers".into(),
                        state.get("target_peers").cloned().unwrap_or(V::Nil),
                    );
                    Some(patch)
                }
            },
        )
        .await;
    }
    let admin = engine.admin().await;
    let mut subs = vec![
        sub("expose-service", "left", 5),
        sub("expose-service", "right", 5),
    ];
    for s in &mut subs {
        s.timeout_ms = 5000;
    }
    subscribe(&admin, &subs).await;
    let hook = engine.hook().await;
    let d = hook
        .expose_service(&bus::event::ExposeService {
            service: "db".into(),
            peers: vec!["p1".into()],
            service_labels: None,
            peer_labels: None,
        })
        .await
        .expect("decision");
    assert_eq!(d.target_peers, ["p1"]);
    assert!(!d.degraded);
}

#[tokio::test(flavor = "multi_thread")]
async fn timeouts_fail_closed_or_open_and_a_kind_with_no_instance_fails_after_its_timeout() {
    let mut engine = Engine::new();
    engine.start(&["lb"]).await;
    foreign_agent(&engine.nats.url(), "slow", "new-connection", |_, _| async {
        None
    })
    .await;
    let admin = engine.admin().await;
    let mut slow = sub("new-connection", "slow", 10);
    slow.timeout_ms = 100;
    subscribe(&admin, &[slow.clone(), sub("new-connection", "lb", 20)]).await;
    let hook = engine.hook().await;

    let d = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Deny);
    assert_eq!(effects(&d.reasons, "slow"), [pair("agent-timeout", "deny")]);
    assert!(
        effects(&d.reasons, "lb").is_empty(),
        "chain went on after a fail-closed timeout"
    );

    slow.failure = bus::admin::FailureMode::Open;
    subscribe(&admin, &[slow]).await;
    let d = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Allow);
    assert!(d.degraded);
    assert_eq!(
        effects(&d.reasons, "slow"),
        [pair("agent-timeout", "skipped")]
    );
    assert_eq!(d.target_peer.as_deref(), Some("p1"));

    // No live instance at all: asked again until its timeout (one might be reconnecting),
    // then failed as no-responders.
    let mut ghost = sub("new-connection", "ghost", 5);
    ghost.timeout_ms = 300;
    subscribe_forced(&admin, &[ghost]).await;
    let t0 = Instant::now();
    let d = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert!(
        t0.elapsed() >= Duration::from_millis(250) && t0.elapsed() < Duration::from_secs(2),
        "waited {:?} for a kind with no instance",
        t0.elapsed()
    );
    assert_eq!(d.action, Action::Deny);
    assert_eq!(
        effects(&d.reasons, "ghost"),
        [pair("no-responders", "deny")]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_observer_gets_the_event_and_never_delays_it() {
    let mut engine = Engine::new();
    engine.start(&["lb"]).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    foreign_agent(
        &engine.nats.url(),
        "watcher",
        "new-connection",
        move |attrs, _| {
            let _ = tx.send(attrs);
            async { None }
        },
    )
    .await;
    let admin = engine.admin().await;
    let mut watcher = sub("new-connection", "watcher", 1);
    watcher.observe = true;
    watcher.timeout_ms = 5000;
    subscribe(&admin, &[watcher, sub("new-connection", "lb", 20)]).await;
    let t0 = Instant::now();
    let d = engine
        .hook()
        .await
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(d.action, Action::Allow);
    let attrs = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("observer got the event")
        .expect("open");
    let src = attrs
        .as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("src_service")))
        .map(|(_, v)| v.clone());
    assert_eq!(src, Some(V::from("web")));
}

/// Merge rules 6 to 8: a rogue agent after the limiters cannot move the connection to a peer
/// they did not admit it for, rewrite conn-limit's record of what it took, or speak for
/// conn-limit to spare it its undo. Each attempt is refused whole (the rogue fails, closed: a
/// deny), and no slot leaks or moves.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_after_the_limiters_cannot_walk_around_them() {
    let mut engine = Engine::new();
    engine.start(&["acl", "lb", "conn-limit"]).await;
    let mode = Arc::new(Mutex::new(String::from("record")));
    let recorded = Arc::new(Mutex::new(None::<V>));
    let (m, r) = (mode.clone(), recorded.clone());
    foreign_agent(&engine.url(), "rogue", "new-connection", move |_, state| {
        let (m, r) = (m.clone(), r.clone());
        async move {
            let mode = m.lock().expect("mode").clone();
            let mut patch = Map::new();
            match mode.as_str() {
                "record" => {
                    if let Some(held) = state.get("conn_limit") {
                        *r.lock().expect("record") = Some(held.clone());
                    }
                }
                "move" => {
                    patch.insert("target_peer".into(), V::from("p2"));
                }
                "forge" => {
                    patch.insert("action".into(), V::from("deny"));
                    patch.insert(
                        "reasons".into(),
                        V::Array(vec![reason("conn-limit", "p2-max", "deny")]),
                    );
                }
                _ => {
                    let victim = r.lock().expect("record").clone().expect("recorded");
                    patch.insert("conn_limit".into(), victim);
                    patch.insert("action".into(), V::from("deny"));
                }
            }
            Some(patch)
        }
    })
    .await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "lb", 20),
            sub("new-connection", "conn-limit", 30),
            sub("connection-closed", "conn-limit", 10),
        ],
    )
    .await;
    subscribe_forced(&admin, &[sub("new-connection", "rogue", 50)]).await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "open", "action": "allow"})),
            doc(json!({"agent": "lb", "id": "db", "dst_service": "db", "scheme": "static", "peer": "p1"})),
            doc(json!({"agent": "lb", "id": "cache", "dst_service": "cache", "scheme": "static", "peer": "p2"})),
            doc(json!({"agent": "conn-limit", "id": "p2-max", "match": {"target_peer": "p2"}, "max_connections": 2})),
        ])
        .await
        .expect("policies");
    let hook = engine.hook().await;
    let set = |m: &str| *mode.lock().expect("mode") = m.to_string();
    let rogue_error = |d: &bus::ConnectionDecision| {
        d.reasons
            .iter()
            .find(|r| r.agent == "rogue")
            .and_then(|r| r.detail.clone())
            .unwrap_or_default()
    };
    let held = || async { slots::slots_held(&engine).await.len() };

    // One connection to p2, admitted; the rogue keeps what conn-limit recorded of it.
    let first = {
        eventually("a connection to p2 is admitted", || async {
            let d = hook
                .new_connection(&conn("web", "cache", &["p1", "p2"]))
                .await
                .map_err(|e| e.to_string())?;
            (d.action == Action::Allow)
                .then_some(())
                .ok_or(format!("{d:?}"))
        })
        .await;
        recorded
            .lock()
            .expect("record")
            .clone()
            .expect("conn-limit's record")
    };
    assert_eq!(held().await, 1);

    // Moving a connection conn-limit admitted for p1 (no p2 slot taken) onto p2.
    set("move");
    let d = hook
        .new_connection(&conn("web", "db", &["p1", "p2"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Deny, "{d:?}");
    assert_ne!(d.target_peer.as_deref(), Some("p2"), "{d:?}");
    assert!(rogue_error(&d).contains("target_peer"), "{d:?}");
    assert_eq!(held().await, 1, "a refused move took or freed a slot");

    // Speaking for conn-limit: a forged conn-limit deny would spare it its undo, leaking the
    // slot it just took.
    set("forge");
    let d = hook
        .new_connection(&conn("web", "cache", &["p2"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Deny, "{d:?}");
    assert!(
        d.reasons
            .iter()
            .filter(|r| r.agent == "conn-limit")
            .all(|r| r.effect == bus::Effect::Allow),
        "a reason spoke for conn-limit: {d:?}"
    );
    eventually("the denied connection's slot is given back", || async {
        let n = held().await;
        (n == 1).then_some(()).ok_or(format!("{n} held"))
    })
    .await;

    // Rewriting conn-limit's record to the first connection's: the undo would give back the
    // wrong slot (or none).
    set("rekey");
    let d = hook
        .new_connection(&conn("web", "cache", &["p2"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Deny, "{d:?}");
    assert!(rogue_error(&d).contains("conn_limit"), "{d:?}");
    eventually("only the first connection's slot is held", || async {
        let now = slots::slots_held(&engine).await;
        let holder = bus::state::field_str(&first, "holder")
            .unwrap_or_default()
            .to_string();
        (now.len() == 1 && now[0].contains(&holder))
            .then_some(())
            .ok_or(format!("{now:?}, first holder {holder}"))
    })
    .await;

    // Nothing leaked: the second slot is free for the next connection.
    set("record");
    let d = hook
        .new_connection(&conn("web", "cache", &["p2"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Allow, "{d:?}");
}
