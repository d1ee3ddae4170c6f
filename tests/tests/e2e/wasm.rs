//! Agent kinds loaded at run time: WebAssembly modules deployed with `policyctl agent deploy`,
//! served by `policy-agent wasm`, on the secured bus with the wasm host's own role.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus::Action;
use e2e::Engine;

use crate::*;

fn module(name: &str) -> String {
    format!("{EXAMPLES}/wasm/{name}")
}

/// The policy of the geo reason a decision carries: `v1`, `v2`, or why there is none.
fn geo_version(reasons: &[bus::Reason]) -> String {
    reasons
        .iter()
        .find(|r| r.agent == "geo")
        .map(|r| r.policy.clone())
        .unwrap_or_else(|| format!("no geo reason in {reasons:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn modules_deploy_decide_swap_under_load_fail_alone_and_unload() {
    let mut engine = Engine::secured();
    engine.start(&["acl"]).await;
    engine.agent("wasm", &["--fuel", "200000"]);
    engine
        .wait_instances(bus::headers::WASM_HOST_SERVICE, 1)
        .await;
    let run = |args: &[&str]| policyctl(&engine, args);

    // Refused: a shipped kind's name, and a module that imports from the host.
    let (code, _, err) = run(&["agent", "deploy", "acl", &module("allow-v1.wat")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("shipped"), "{err}");
    let importing = std::env::temp_dir().join(format!("importing-{}.wat", std::process::id()));
    std::fs::write(
        &importing,
        r#"(module (import "env" "now" (func)) (memory (export "memory") 1))"#,
    )
    .expect("write");
    let (code, _, err) = run(&["agent", "deploy", "geo", importing.to_str().expect("path")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("imports `env.now`"), "{err}");

    // v1 deploys and decides. `deploy` returns once the host serves it: the commands after
    // it, as docs/wasm.md runs them, need no wait of their own.
    let (code, out, err) = run(&["agent", "deploy", "geo", &module("allow-v1.wat")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("deployed geo") && out.contains("served by 1 of 1 wasm hosts"),
        "{out}"
    );
    let admin = engine.admin().await;
    admin
        .policy_add(vec![doc(
            serde_json::json!({"agent": "acl", "id": "open", "action": "allow"}),
        )])
        .await
        .expect("acl policy");
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "geo", 20),
        ],
    )
    .await;
    let hook = engine.hook().await;
    let d = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(
        (d.action, geo_version(&d.reasons)),
        (Action::Allow, "v1".into())
    );

    // v2 replaces it without a restart, and decides the first event after the deploy.
    let (code, out, err) = run(&["agent", "deploy", "geo", &module("deny-v2.wat")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("served by 1 of 1 wasm hosts"), "{out}");
    let d = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(
        (d.action, geo_version(&d.reasons)),
        (Action::Deny, "v2".into()),
        "{d:?}"
    );

    // Swapping back to v1 under load: every event is decided, by v2 or by v1, none fails.
    let (v1, v2, other) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::new())),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (hook, v1, v2, other, stop) = (
            hook.clone(),
            v1.clone(),
            v2.clone(),
            other.clone(),
            stop.clone(),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match hook.new_connection(&conn("web", "db", &["p1"])).await {
                    Ok(d) => match (d.action, geo_version(&d.reasons).as_str()) {
                        (Action::Allow, "v1") => v1.fetch_add(1, Ordering::Relaxed),
                        (Action::Deny, "v2") => v2.fetch_add(1, Ordering::Relaxed),
                        _ => {
                            other.lock().expect("lock").push(format!("{d:?}"));
                            0
                        }
                    },
                    Err(e) => {
                        other.lock().expect("lock").push(e.to_string());
                        0
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, _, err) = run(&["agent", "deploy", "geo", &module("allow-v1.wat")]);
    assert_eq!(code, Some(0), "{err}");
    eventually("v1 decides again", || async {
        (v1.load(Ordering::Relaxed) >= 20)
            .then_some(())
            .ok_or(format!("{} by v1 so far", v1.load(Ordering::Relaxed)))
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.expect("load task");
    }
    let other = other.lock().expect("lock").clone();
    assert!(
        v2.load(Ordering::Relaxed) > 0,
        "the load ran before the swap"
    );
    assert!(other.is_empty(), "events neither v1's nor v2's: {other:?}");

    // A module that loops forever fails its own kind's decision, and nothing else.
    let (code, _, err) = run(&["agent", "deploy", "spin", &module("spin.wat")]);
    assert_eq!(code, Some(0), "{err}");
    engine.wait_instances("policy-agent-spin", 1).await;
    subscribe(&admin, &[sub("expose-service", "spin", 10)]).await;
    let exposed = hook
        .expose_service(&bus::event::ExposeService {
            service: "db".into(),
            peers: vec!["p1".into()],
            service_labels: None,
            peer_labels: None,
        })
        .await
        .expect("decision");
    assert!(exposed.target_peers.is_empty(), "{exposed:?}");
    let failed = exposed
        .reasons
        .iter()
        .find(|r| r.agent == "spin")
        .expect("spin's reason");
    assert_eq!(failed.policy, bus::decision::failure::ERROR, "{failed:?}");
    assert!(
        failed
            .detail
            .as_deref()
            .unwrap_or_default()
            .contains("ran out of fuel"),
        "{failed:?}"
    );
    let d = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(
        (d.action, geo_version(&d.reasons)),
        (Action::Allow, "v1".into())
    );

    let (code, out, _) = run(&["agent", "list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("geo") && out.contains("spin"), "{out}");

    // Removed, the kind is drained and stopped on every host: its subscription now has no
    // live instance, and fails closed.
    let (code, _, err) = run(&["agent", "remove", "geo"]);
    assert_eq!(code, Some(0), "{err}");
    eventually("geo is unloaded", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        let gone = d
            .reasons
            .iter()
            .any(|r| r.agent == "geo" && r.policy == bus::decision::failure::NO_RESPONDERS);
        (d.action == Action::Deny && gone)
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    let (code, _, err) = run(&["agent", "remove", "geo"]);
    assert_eq!(code, Some(1), "removing it twice: {err}");
    assert!(err.contains("no module is deployed"), "{err}");
    let _ = std::fs::remove_file(importing);
}

/// The wasm host serves only deployed modules: a native kind with a role of its own
/// (`policyctl auth add-agent`) is denied to it by the server (its queue group, its events,
/// its services ping), and a module cannot be deployed under that kind's name.
#[tokio::test(flavor = "multi_thread")]
async fn the_wasm_host_cannot_serve_a_native_kind_nor_take_its_name() {
    let mut engine = Engine::secured();
    engine.start(&["acl"]).await;
    engine.add_agent_role("geo");
    engine.agent("wasm", &[]);
    engine
        .wait_instances(bus::headers::WASM_HOST_SERVICE, 1)
        .await;

    // With the host's own seed, as an attacker holding it would.
    let host = bus::roles::Role::WasmHost;
    let (client, mut errors) = engine.watched_client(&host).await;
    let attempts = [
        ("policy.agent.geo.>", Some("geo")),
        ("policy.agent.geo.new-connection", None),
        ("$SRV.PING.policy-agent-geo", None),
        ("$SRV.INFO.policy-agent-geo.g1", None),
    ];
    for (subject, group) in attempts {
        let _sub = match group {
            Some(g) => client.queue_subscribe(subject, g.into()).await,
            None => client.subscribe(subject).await,
        }
        .expect("subscribe");
        client.flush().await.expect("flush");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, errors.recv()).await {
                Ok(Some(e))
                    if e.contains("Permissions Violation for Subscription")
                        && e.contains(subject) =>
                {
                    break
                }
                Ok(Some(_)) => continue,
                _ => panic!("the server let the wasm host subscribe to {subject}"),
            }
        }
    }

    // A module under geo's name is refused before anything is stored; another name deploys.
    let module = format!("{EXAMPLES}/wasm/allow-v1.wat");
    let (code, _, err) = policyctl(&engine, &["agent", "deploy", "geo", &module]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("native agent kind with a role of its own"),
        "{err}"
    );
    let (code, out, _) = policyctl(&engine, &["agent", "list"]);
    assert_eq!(code, Some(0));
    assert!(!out.contains("geo"), "{out}");
    let (code, _, err) = policyctl(&engine, &["agent", "deploy", "geo2", &module]);
    assert_eq!(code, Some(0), "{err}");
    engine.wait_instances("policy-agent-geo2", 1).await;
}

/// A deployed module's kind is known: with no wasm host running (a restart, a start-up order
/// that brings the hosts last), its subscription is stored without `--force`, and its events
/// are denied until a host serves it. A kind nobody knows is still refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_deployed_modules_kind_is_subscribed_before_a_host_serves_it() {
    let mut engine = Engine::new();
    engine.start(&["acl"]).await;
    engine.agent("wasm", &[]);
    engine
        .wait_instances(bus::headers::WASM_HOST_SERVICE, 1)
        .await;
    let (code, _, err) = policyctl(
        &engine,
        &["agent", "deploy", "geo", &module("allow-v1.wat")],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        engine.take("policy-agent wasm").terminate(),
        "the host stops"
    );
    let admin = engine.admin().await;
    admin
        .subscribe(&sub("new-connection", "geo", 20))
        .await
        .expect("a deployed module's kind, no host yet");
    let err = admin
        .subscribe(&sub("new-connection", "gea", 30))
        .await
        .expect_err("a kind nobody knows");
    assert!(err.to_string().contains("no live instance"), "{err}");
    let subs = admin.subscriptions(None).await.expect("list");
    assert_eq!(subs.len(), 1, "{subs:?}");
}
