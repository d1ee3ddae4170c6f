//! ACL rules by label selectors, through the whole pipeline with the verdict cache on: labels
//! decide, and a cached answer is never reused for an event with other labels.

use std::collections::BTreeMap;

use bus::event::{ExposeService, ServiceListRequest};
use bus::Action;
use e2e::Engine;
use serde_json::json;

use crate::*;

#[tokio::test(flavor = "multi_thread")]
async fn label_selectors_decide_connections_exposes_and_lists() {
    let mut engine = Engine::new();
    engine.start(&["acl", "lb"]).await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "lb", 20),
            sub("expose-service", "acl", 10),
            sub("service-list-request", "acl", 10),
        ],
    )
    .await;
    admin
        .policy_add(vec![
            doc(
                json!({"agent": "acl", "id": "quarantine", "priority": 0, "action": "deny",
                "match": {"src_labels": {"matchLabels": {"quarantine": "true"}}}}),
            ),
            doc(
                json!({"agent": "acl", "id": "frontend-to-db", "priority": 100, "action": "allow",
                "match": {"src_labels": {"matchExpressions": [
                              {"key": "tier", "operator": "In", "values": ["frontend"]}]},
                          "dst_labels": {"matchLabels": {"app": "db"}},
                          "dst_peer_labels": {"matchLabels": {"region": "eu"}}}}),
            ),
            doc(
                json!({"agent": "acl", "id": "public-to-partners", "priority": 100,
                "action": "allow",
                "match": {"service_labels": {"matchLabels": {"exposure": "public"}},
                          "peer_labels": {"matchExpressions": [
                              {"key": "partner", "operator": "Exists"}]}}}),
            ),
        ])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    let connection = |src: &[(&str, &str)]| {
        let mut c = conn("web", "orders-db", &["p-eu", "p-us"]);
        c.src_labels = Some(labels(src));
        c.dst_labels = Some(labels(&[("app", "db")]));
        c.peer_labels = Some(BTreeMap::from([
            ("p-eu".to_string(), labels(&[("region", "eu")])),
            ("p-us".to_string(), labels(&[("region", "us")])),
        ]));
        c
    };
    eventually("frontends reach db in the eu only", || async {
        let d = hook
            .new_connection(&connection(&[("tier", "frontend")]))
            .await
            .map_err(|e| e.to_string())?;
        (d.action == Action::Allow && d.target_peer.as_deref() == Some("p-eu"))
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    // The same names twice more, with other labels: the cache keys on the labels too.
    let mut taps = crate::cache::tap(&engine).await;
    for _ in 0..2 {
        let q = hook
            .new_connection(&connection(&[("tier", "frontend"), ("quarantine", "true")]))
            .await
            .expect("decision");
        assert_eq!(q.action, Action::Deny, "{q:?}");
        assert_eq!(effects(&q.reasons, "acl"), [pair("quarantine", "deny")]);
        let backend = hook
            .new_connection(&connection(&[("tier", "backend")]))
            .await
            .expect("decision");
        assert_eq!(backend.action, Action::Deny, "{backend:?}");
        let frontend = hook
            .new_connection(&connection(&[("tier", "frontend")]))
            .await
            .expect("decision");
        assert_eq!(frontend.action, Action::Allow, "{frontend:?}");
    }
    // The second round asks what the first did: acl answers it from the cache, and the
    // answers above are still each label set's own.
    let seen = crate::cache::records(&mut taps, 6).await;
    assert_eq!(seen.len(), 6, "{seen:?}");
    let cached = seen
        .iter()
        .filter(|r| r.agents.iter().any(|a| a.agent == "acl" && a.cached))
        .count();
    assert!(
        cached >= 3,
        "acl answered {cached} of 6 from the cache: {seen:?}"
    );
    let expose = hook
        .expose_service(&ExposeService {
            service: "shop".into(),
            peers: vec!["partner-a".into(), "stranger".into()],
            service_labels: Some(labels(&[("exposure", "public")])),
            peer_labels: Some(BTreeMap::from([(
                "partner-a".to_string(),
                labels(&[("partner", "yes")]),
            )])),
        })
        .await
        .expect("expose decision");
    assert_eq!(expose.target_peers, ["partner-a"], "{expose:?}");
    let list = hook
        .list_services(&ServiceListRequest {
            src_peer: "partner-a".into(),
            services: vec!["shop".into(), "ledger".into()],
            src_peer_labels: Some(labels(&[("partner", "yes")])),
            service_labels: Some(BTreeMap::from([
                ("shop".to_string(), labels(&[("exposure", "public")])),
                ("ledger".to_string(), labels(&[("exposure", "internal")])),
            ])),
        })
        .await
        .expect("list decision");
    assert_eq!(list.services, ["shop"], "{list:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_clusterlink_tiers_example_decides_in_clusterlinks_order() {
    let mut engine = Engine::new();
    engine.start(&["acl"]).await;
    let admin = engine.admin().await;
    subscribe(&admin, &[sub("new-connection", "acl", 10)]).await;
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/clusterlink/by-hand/tiers.yaml"
    );
    let out = engine
        .command("policyctl", &["policy", "add", "-f", example])
        .output()
        .expect("policyctl policy add");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hook = engine.hook().await;
    let decide = |src: &'static [(&str, &str)], dst: &'static [(&str, &str)], region: &str| {
        let mut c = conn("client", "server", &["peer"]);
        c.src_labels = Some(labels(src));
        c.dst_labels = Some(labels(dst));
        c.peer_labels = Some(BTreeMap::from([(
            "peer".to_string(),
            labels(&[("region", region)]),
        )]));
        let hook = hook.clone();
        async move { hook.new_connection(&c).await.expect("decision") }
    };
    // Each tier in turn: the first that matches decides.
    type Pairs = &'static [(&'static str, &'static str)];
    let cases: [(Pairs, Pairs, &str, &str, &str); 5] = [
        (
            &[("team", "ops"), ("quarantine", "true")],
            &[],
            "eu",
            "deny",
            "privileged-deny-quarantined",
        ),
        (
            &[("team", "ops")],
            &[("pci", "true")],
            "us",
            "allow",
            "privileged-allow-ops",
        ),
        (
            &[("tier", "frontend")],
            &[("pci", "true")],
            "us",
            "deny",
            "regular-deny-pci-outside-eu",
        ),
        (
            &[("tier", "frontend")],
            &[("pci", "true")],
            "eu",
            "allow",
            "regular-allow-frontend",
        ),
        (&[("tier", "batch")], &[], "eu", "deny", "default"),
    ];
    for (src, dst, region, action, policy) in cases {
        let d = decide(src, dst, region).await;
        assert_eq!(
            (d.action.as_str(), effects(&d.reasons, "acl")),
            (action, vec![pair(policy, action)]),
            "{src:?} -> {dst:?} via {region}: {d:?}"
        );
    }
}

/// A selector Kubernetes would refuse (a key with spaces, a prefix in capitals, a value with a
/// space) is refused when it is applied, naming the field and the rule, and nothing of the
/// request is stored: before, it was stored and never matched.
#[tokio::test(flavor = "multi_thread")]
async fn selectors_kubernetes_refuses_are_refused_and_nothing_is_stored() {
    let mut engine = Engine::new();
    engine.start(&["acl"]).await;
    let admin = engine.admin().await;
    let good = doc(
        json!({"agent": "acl", "id": "fine", "priority": 0, "action": "allow",
        "match": {"dst_labels": {"matchLabels": {"app.kubernetes.io/name": "db"}}}}),
    );
    for (selector, says) in [
        (
            json!({"matchLabels": {"this is not a key": "x"}}),
            "\"this is not a key\" is not a label key",
        ),
        (
            json!({"matchExpressions": [{"key": "Example.com/app", "operator": "Exists"}]}),
            "its prefix \"Example.com\" must be a DNS subdomain",
        ),
        (
            json!({"matchLabels": {"app": "not a value"}}),
            "\"not a value\" is not a label value",
        ),
    ] {
        let bad = doc(
            json!({"agent": "acl", "id": "bad", "priority": 0, "action": "deny",
            "match": {"src_labels": selector}}),
        );
        let err = admin
            .policy_add(vec![good.clone(), bad])
            .await
            .expect_err("refused");
        let said = err.to_string();
        assert!(said.contains(says) && said.contains("src_labels"), "{said}");
    }
    let stored = admin.policy_list(None).await.expect("list");
    assert!(stored.is_empty(), "nothing stored: {stored:?}");
    admin
        .policy_add(vec![good])
        .await
        .expect("a valid selector");
}
