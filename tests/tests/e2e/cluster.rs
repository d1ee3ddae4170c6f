//! The engine on a 3-node JetStream cluster: losing a node under load, the one that leads the
//! config bucket and serves half of the engine, makes no wrong decision and loses no policy.

use std::time::Duration;

use bus::Action;
use e2e::Engine;
use serde_json::json;

use crate::*;

/// The node (by index) that leads the config bucket's stream, once one does (within `within`).
async fn config_leader(engine: &Engine, within: Duration) -> usize {
    let js = async_nats::jetstream::new(engine.client().await);
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Ok(mut stream) = js.get_stream("KV_policy_config").await {
            if let Ok(info) = stream.info().await {
                if let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone()) {
                    if let Some(i) = leader.strip_prefix("node-").and_then(|n| n.parse().ok()) {
                        return i;
                    }
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the config stream has no leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn losing_the_node_that_leads_the_config_and_serves_half_the_engine_makes_no_wrong_decision()
{
    let mut engine = Engine::on_cluster(e2e::start_cluster(3));
    // The first dispatcher creates the config bucket with three replicas.
    e2e::wait_for_jetstream(&engine.nats.url(), 3).await;
    engine.spawn_on(0, "policy-dispatcher", &["--kv-replicas", "3"]);
    engine.wait_instances("policy-dispatcher", 1).await;
    let leader = config_leader(&engine, WAIT).await;
    let (other, gateways) = ((leader + 1) % 3, (leader + 2) % 3);
    // Half the engine on the leader's node, half on another; the gateways on the third.
    for node in [leader, other] {
        engine.spawn_on(node, "policy-dispatcher", &[]);
        engine.spawn_on(node, "policy-agent", &["acl"]);
        engine.spawn_on(node, "policy-agent", &["lb"]);
    }
    engine.wait_instances("policy-dispatcher", 3).await;
    engine.wait_instances("policy-agent-acl", 2).await;
    engine.wait_instances("policy-agent-lb", 2).await;
    let admin = engine.admin().await;
    let mut subs = [
        sub("new-connection", "acl", 10),
        sub("new-connection", "lb", 20),
    ];
    for s in &mut subs {
        s.timeout_ms = bus::admin::DEFAULT_TIMEOUT_MS;
    }
    subscribe(&admin, &subs).await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "open", "action": "allow"}),
        )])
        .await
        .expect("policy add");
    eventually_allowed(&engine.hook().await, "allow-all loaded").await;
    let before = admin.policy_list(None).await.expect("list");

    let gateway_url = engine.node(gateways).url();
    let (tally, stop, workers) = crate::faults::load_at(&engine, &gateway_url, 8);
    tokio::time::sleep(Duration::from_millis(800)).await;
    // kill -9 of the node: its clients (a dispatcher, an acl, an lb) go to the others.
    engine.node(leader).stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.send_replace(true);
    for w in workers {
        let _ = w.await;
    }
    {
        let t = tally.lock().unwrap();
        println!("node {leader} of 3 lost under load: {}", t.summary());
        assert!(
            t.wrong.is_empty(),
            "wrong decisions: {:?}",
            &t.wrong[..t.wrong.len().min(3)]
        );
        assert_eq!(t.count(crate::faults::Kind::Timeout), 0, "{}", t.summary());
        assert_eq!(t.count(crate::faults::Kind::Error), 0, "{}", t.summary());
    }

    // Nothing stored was lost, and the configuration can still be read and changed as soon as
    // JetStream has elected a new leader for the bucket's stream (a few seconds).
    let recovery = Duration::from_secs(30);
    let new_leader = config_leader(&engine, recovery).await;
    assert_ne!(new_leader, leader, "the lost node cannot lead");
    // Every listing answers from then on, not one in so many: a listing that needed a consumer
    // placed on a replica could land on the lost node and time out (one in three did).
    let admin = engine.admin().await;
    for i in 0..10 {
        let now = admin
            .policy_list(None)
            .await
            .unwrap_or_else(|e| panic!("listing {i} after the new leader: {e}"));
        assert_eq!(now, before, "listing {i} after the new leader");
    }
    eventually_within("a policy can be added once a new leader is elected", recovery, || async {
        admin
            .policy_add(vec![doc(
                json!({"agent": "acl", "id": "no-db", "priority": -1, "action": "deny", "match": {"dst_service": "db"}}),
            )])
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;
    let hook = engine.hook().await;
    eventually_within(
        "the new policy applies on the surviving nodes",
        recovery,
        || async {
            let d = hook
                .new_connection(&conn("web", "db", &["p1"]))
                .await
                .map_err(|e| e.to_string())?;
            (d.action == Action::Deny && effects(&d.reasons, "acl") == [pair("no-db", "deny")])
                .then_some(())
                .ok_or(format!("{d:?}"))
        },
    )
    .await;
}
