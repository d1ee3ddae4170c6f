//! Decisions that cannot be bent: by an agent's patch, by a hookpoint's payload, by a plain
//! publish, by a broken stored record, or by a typo in an admin command.

use std::sync::Mutex;
use std::time::Duration;

use bus::{Action, ErrorCode};
use e2e::{bin, Engine};
use serde_json::json;

use crate::*;

fn field<'a>(map: &'a Map, key: &str) -> Option<&'a V> {
    map.get(key)
}

fn attr<'a>(attrs: &'a V, key: &str) -> Option<&'a V> {
    attrs
        .as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

fn strs(v: Option<&V>) -> Vec<String> {
    match v {
        Some(V::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_peer_the_acl_removed_is_a_deny_never_a_route() {
    let mut engine = Engine::new();
    engine.start(&["acl"]).await;
    // A custom agent at the ACL's own priority routes every connection to p2.
    foreign_agent(
        &engine.nats.url(),
        "router",
        "new-connection",
        |_, _| async {
            let mut patch = Map::new();
            patch.insert("target_peer".into(), V::from("p2"));
            Some(patch)
        },
    )
    .await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "router", 10),
        ],
    )
    .await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "not-p2", "priority": 1, "action": "deny", "match": {"dst_peer": "p2"}})),
            doc(json!({"agent": "acl", "id": "rest", "priority": 2, "action": "allow"})),
        ])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    eventually("the routed connection is denied", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1", "p2"]))
            .await
            .map_err(|e| e.to_string())?;
        if effects(&d.reasons, "dispatcher") != [pair("invalid-target-peer", "deny")] {
            return Err(format!("{d:?}"));
        }
        assert_eq!(d.action, Action::Deny);
        assert_eq!(d.target_peer, None);
        Ok(())
    })
    .await;
    // Once the ACL keeps p2, the same agent's pick stands.
    admin.policy_remove("acl", "not-p2").await.expect("remove");
    eventually("p2 allowed once the ACL keeps it", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1", "p2"]))
            .await
            .map_err(|e| e.to_string())?;
        (d.action == Action::Allow && d.target_peer.as_deref() == Some("p2"))
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_patch_cannot_set_the_dispatchers_keys_and_agents_see_every_attribute() {
    let mut engine = Engine::new();
    engine.start(&[]).await;
    foreign_agent(
        &engine.nats.url(),
        "forger",
        "new-connection",
        |_, _| async {
            let mut patch = Map::new();
            patch.insert("connection_id".into(), V::from("forged"));
            patch.insert("event_id".into(), V::from("forged"));
            patch.insert("degraded".into(), V::from(true));
            Some(patch)
        },
    )
    .await;
    let seen: Arc<Mutex<Vec<(V, Map)>>> = Arc::default();
    let log = seen.clone();
    foreign_agent(
        &engine.nats.url(),
        "witness",
        "new-connection",
        move |attrs, state| {
            log.lock().unwrap().push((attrs, state));
            async { Some(Map::new()) }
        },
    )
    .await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "forger", 10),
            sub("new-connection", "witness", 20),
        ],
    )
    .await;
    // A hookpoint newer than this engine: an attribute the contract does not know, an empty
    // connection id, and a candidate list with duplicates.
    let payload = rmp_serde::to_vec_named(&json!({
        "src_service": "web", "dst_service": "db", "direction": "outgoing",
        "dst_peers": ["p1", "p1", "p2", "p1"], "connection_id": "",
        "x_future": {"zone": "eu"},
    }))
    .expect("encode");
    let msg = engine
        .hook()
        .await
        .request(
            "new-connection",
            Default::default(),
            bytes::Bytes::from(payload),
        )
        .await
        .expect("decision");
    let d: bus::ConnectionDecision = rmp_serde::from_slice(&msg.payload).expect("decision");
    let id = d.connection_id.clone().expect("connection id");
    assert!(!id.is_empty() && id != "forged", "{d:?}");
    assert_ne!(d.event_id, "forged");
    assert!(!d.degraded, "an agent marked the decision degraded");
    assert_eq!(d.action, Action::Allow);

    let seen = seen.lock().unwrap();
    let (attrs, state) = seen.first().expect("the witness was called");
    assert_eq!(
        attr(attrs, "x_future"),
        Some(&V::Map(vec![(V::from("zone"), V::from("eu"))])),
        "an unknown attribute was dropped: {attrs:?}"
    );
    assert_eq!(attr(attrs, "connection_id"), Some(&V::from(id.as_str())));
    assert_eq!(
        field(state, "connection_id"),
        Some(&V::from(id.as_str())),
        "a patch re-keyed the connection"
    );
    assert_eq!(strs(field(state, "dst_peers")), ["p1", "p2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_published_without_a_reply_subject_is_not_run() {
    let mut engine = Engine::new();
    engine.start(&[]).await;
    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = calls.clone();
    foreign_agent(
        &engine.nats.url(),
        "counter",
        "new-connection",
        move |attrs, _| {
            let src = attr(&attrs, "src_service")
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_string();
            log.lock().unwrap().push(src);
            async { Some(Map::new()) }
        },
    )
    .await;
    let admin = engine.admin().await;
    subscribe(&admin, &[sub("new-connection", "counter", 10)]).await;
    let client = engine.client().await;
    let plain = rmp_serde::to_vec_named(&conn("plain", "db", &["p1"])).expect("encode");
    for _ in 0..5 {
        client
            .publish("policy.event.new-connection", plain.clone().into())
            .await
            .expect("publish");
    }
    client.flush().await.expect("flush");
    let d = engine
        .hook()
        .await
        .new_connection(&conn("asked", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Allow);
    // Give a wrongly run plain event the time to reach the agent, so that this test can fail.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*calls.lock().unwrap(), ["asked"]);
}

async fn config_bucket(engine: &Engine) -> async_nats::jetstream::kv::Store {
    async_nats::jetstream::new(engine.client().await)
        .get_key_value("policy_config")
        .await
        .expect("config bucket")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_subscription_that_does_not_load_fails_its_event_closed() {
    let mut engine = Engine::new();
    engine.start(&["acl"]).await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("expose-service", "acl", 10),
        ],
    )
    .await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "open", "action": "allow"}),
        )])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    eventually_allowed(&hook, "allowed").await;
    // Written around the dispatcher, by another version, say: a field this one does not know.
    let record = rmp_serde::to_vec_named(&json!({"event": "new-connection", "agent": "acl",
        "priority": 10, "timout_ms": 5}))
    .expect("encode");
    config_bucket(&engine)
        .await
        .put("sub.new-connection.acl", record.into())
        .await
        .expect("put");
    eventually("the event fails closed", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        if effects(&d.reasons, "dispatcher") != [pair("sub.new-connection.acl", "deny")] {
            return Err(format!("{d:?}"));
        }
        assert_eq!(d.action, Action::Deny);
        let detail = d.reasons[0].detail.clone().unwrap_or_default();
        assert!(detail.contains("timout_ms"), "{detail}");
        Ok(())
    })
    .await;
    // Other events are decided as before.
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
    // Storing it again through the dispatcher mends it.
    subscribe(&admin, &[sub("new-connection", "acl", 10)]).await;
    let d = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Allow, "{d:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_a_second_rate_policy_denies_spends_nothing_from_the_first() {
    let mut engine = Engine::new();
    engine.start(&["rate-limit"]).await;
    let admin = engine.admin().await;
    subscribe(&admin, &[sub("new-connection", "rate-limit", 40)]).await;
    admin
        .policy_add(vec![
            // One connection an hour per web-* source service, and one an hour to db.
            doc(json!({"agent": "rate-limit", "id": "a-per-source", "match": {"src_service": "web*"}, "rate": "1/h"})),
            doc(json!({"agent": "rate-limit", "id": "b-db", "match": {"dst_service": "db"}, "rate": "1/h"})),
        ])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    // Spends db's one connection (no web-* source, so the first policy does not match).
    eventually("db's budget spent", || async {
        let d = hook
            .new_connection(&conn("batch", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        (d.action == Action::Allow)
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    for _ in 0..3 {
        let d = hook
            .new_connection(&conn("web-1", "db", &["p1"]))
            .await
            .expect("decision");
        assert_eq!(effects(&d.reasons, "rate-limit"), [pair("b-db", "deny")]);
    }
    // web-1's own budget is whole: the denied connections took nothing from it.
    let d = hook
        .new_connection(&conn("web-1", "api", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Allow, "{d:?}");
    let d = hook
        .new_connection(&conn("web-1", "api", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(
        effects(&d.reasons, "rate-limit"),
        [pair("a-per-source", "deny")]
    );
}

async fn admin_error(
    engine: &Engine,
    command: &str,
    args: serde_json::Value,
) -> (ErrorCode, String) {
    let payload = rmp_serde::to_vec_named(&args).expect("encode");
    let r = bus::client::call(
        &engine.client().await,
        format!("policy.admin.{command}"),
        Default::default(),
        payload.into(),
        WAIT,
    )
    .await;
    match r {
        Err(bus::ClientError::Remote(e)) => (e.code, e.message),
        other => panic!("expected an error reply to {command}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_typos_are_refused_with_a_suggestion_unless_forced() {
    let mut engine = Engine::new();
    engine.start(&["acl"]).await;
    let (c, msg) = admin_error(
        &engine,
        "subscribe",
        json!({"event": "new-connection", "agent": "acl", "priority": 1, "timout_ms": 100}),
    )
    .await;
    assert_eq!(c, ErrorCode::BadRequest);
    assert!(msg.contains("timout_ms"), "{msg}");
    let (c, msg) = admin_error(&engine, "policy-list", json!({"agnet": "acl"})).await;
    assert_eq!(c, ErrorCode::BadRequest);
    assert!(msg.contains("agnet"), "{msg}");

    let (c, msg) = admin_error(
        &engine,
        "subscribe",
        json!({"event": "new-connection", "agent": "acll", "priority": 1}),
    )
    .await;
    assert_eq!(c, ErrorCode::NotFound);
    assert!(msg.contains("did you mean `acl`"), "{msg}");
    let (c, msg) = admin_error(
        &engine,
        "subscribe",
        json!({"event": "new-conection", "agent": "acl", "priority": 1}),
    )
    .await;
    assert_eq!(c, ErrorCode::UnknownEvent);
    assert!(msg.contains("did you mean `new-connection`"), "{msg}");
    let admin = engine.admin().await;
    assert!(admin.subscriptions(None).await.expect("list").is_empty());
    // A shipped kind is known, though none of its instances runs yet: its subscription is
    // stored, as an orderly start-up (configuration before agents) needs.
    admin
        .subscribe(&sub("new-connection", "lb", 2))
        .await
        .expect("a shipped kind with no instance yet");
    assert_eq!(admin.subscriptions(None).await.expect("list").len(), 1);
    admin
        .unsubscribe("new-connection", "lb")
        .await
        .expect("unsubscribe");

    // The CLI says the same in one line, and --force stores it.
    let url = engine.nats.url();
    let out = std::process::Command::new(bin("policyctl"))
        .args([
            "--nats-url",
            &url,
            "subscribe",
            "new-connection",
            "acll",
            "--priority",
            "1",
        ])
        .output()
        .expect("policyctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("did you mean `acl`"),
        "{stderr}"
    );
    let out = std::process::Command::new(bin("policyctl"))
        .args([
            "--nats-url",
            &url,
            "subscribe",
            "custom-hook",
            "acl",
            "--priority",
            "1",
            "--force",
        ])
        .output()
        .expect("policyctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let subs = admin.subscriptions(None).await.expect("list");
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].event.as_str(), "custom-hook");

    // A subscriptions file with a typo is refused before anything is stored.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("subscriptions.yaml"),
        "- {event: new-connection, agent: acl, priority: 10, failur: open}\n",
    )
    .expect("write");
    let out = std::process::Command::new(bin("policyctl"))
        .args(["--nats-url", &url, "load"])
        .arg(dir.path())
        .output()
        .expect("policyctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("failur"),
        "{stderr}"
    );
    assert_eq!(admin.subscriptions(None).await.expect("list").len(), 1);

    // Removing a policy by a mistyped id names the closest one, in the operator's words.
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "extra-rule", "action": "allow"}),
        )])
        .await
        .expect("policy");
    let (c, msg) = admin_error(
        &engine,
        "policy-remove",
        json!({"agent": "acl", "id": "extra-rul"}),
    )
    .await;
    assert_eq!(c, ErrorCode::NotFound);
    assert_eq!(
        msg,
        "no policy `acl/extra-rul` is stored (did you mean `acl/extra-rule`?)"
    );
    // An event nobody knows, the same way; no Rust type names.
    let hook = engine.hook().await;
    let err = hook
        .emit("new-conection", &bus::State::new())
        .await
        .expect_err("an unknown event");
    let text = err.to_string();
    assert!(
        text.contains("unknown event `new-conection` (did you mean `new-connection`?)"),
        "{text}"
    );
    assert!(!text.contains("EventName"), "{text}");
}
