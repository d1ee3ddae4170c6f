//! ACL rules that select by labels: Kubernetes selectors on the source workload, the
//! destination service, the candidate peers and the asking peer.

use std::collections::BTreeMap;

use bus::event::{ExposeService, Labels, NewConnection, ServiceListRequest};
use bus::Value;
use serde_json::json;

use super::*;
use crate::kind::parse_policy;

fn rules(docs: serde_json::Value) -> AclRules {
    let serde_json::Value::Array(docs) = docs else {
        panic!("a list of policies");
    };
    let acl = Acl::default();
    let policies = docs
        .into_iter()
        .map(|d| {
            let p = parse_policy(&acl, &rmp_serde::to_vec_named(&d).unwrap()).unwrap();
            Stored::site(p.id.clone(), p)
        })
        .collect();
    acl.compile(policies)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn conn(src: &[(&str, &str)], dst: &[(&str, &str)], peers: &[(&str, &[(&str, &str)])]) -> Event {
    Event::NewConnection(NewConnection {
        src_service: "web".into(),
        dst_service: "db".into(),
        direction: Direction::Outgoing,
        src_peer: Some("local".into()),
        dst_peers: Some(peers.iter().map(|(p, _)| p.to_string()).collect()),
        connection_id: None,
        src_labels: (!src.is_empty()).then(|| labels(src)),
        dst_labels: (!dst.is_empty()).then(|| labels(dst)),
        peer_labels: Some(
            peers
                .iter()
                .map(|(p, l)| (p.to_string(), labels(l)))
                .collect(),
        ),
        namespace: None,
    })
}

fn decide(rules: &AclRules, ev: &Event) -> State {
    Acl::default().decide(rules, ev, &ev.initial_state())
}

#[test]
fn selectors_on_workloads_and_peers_decide_and_narrow() {
    let r = rules(json!([
        {"agent": "acl", "id": "eu-only", "priority": 0, "action": "deny",
         "match": {"dst_peer_labels": {"matchExpressions": [
             {"key": "region", "operator": "NotIn", "values": ["eu"]}]}}},
        {"agent": "acl", "id": "frontend-to-db", "priority": 1, "action": "allow",
         "match": {"src_labels": {"matchLabels": {"tier": "frontend"}},
                   "dst_labels": {"matchLabels": {"app": "db"}}}},
    ]));
    let peers: &[(&str, &[(&str, &str)])] = &[
        ("p-eu", &[("region", "eu")]),
        ("p-us", &[("region", "us")]),
        ("p-none", &[]),
    ];
    let allowed = decide(&r, &conn(&[("tier", "frontend")], &[("app", "db")], peers));
    assert_eq!(allowed.get_str(keys::ACTION), Some("allow"));
    assert_eq!(allowed.get_strings(keys::DST_PEERS), Some(vec!["p-eu"]));
    let backend = decide(&r, &conn(&[("tier", "backend")], &[("app", "db")], peers));
    assert_eq!(
        backend.get_str(keys::ACTION),
        Some("deny"),
        "no rule selects backends"
    );
    // A name-only event: a rule that needs a label never matches it.
    let plain = decide(&r, &conn(&[], &[], &[("p-eu", &[])]));
    assert_eq!(plain.get_str(keys::ACTION), Some("deny"));
}

#[test]
fn service_and_peer_labels_filter_expose_and_list() {
    let r = rules(json!([
        {"agent": "acl", "id": "public-to-partners", "action": "allow",
         "match": {"service_labels": {"matchLabels": {"exposure": "public"}},
                   "peer_labels": {"matchExpressions": [{"key": "partner", "operator": "Exists"}]}}},
        // A connection-only selector never counts for these events.
        {"agent": "acl", "id": "conn-only", "action": "allow",
         "match": {"src_labels": {}}},
    ]));
    let expose = Event::ExposeService(ExposeService {
        service: "shop".into(),
        peers: vec!["a".into(), "b".into()],
        service_labels: Some(labels(&[("exposure", "public")])),
        peer_labels: Some(BTreeMap::from([(
            "a".to_string(),
            labels(&[("partner", "yes")]),
        )])),
    });
    assert_eq!(
        decide(&r, &expose).get_strings(keys::TARGET_PEERS),
        Some(vec!["a"])
    );
    let list = Event::ServiceListRequest(ServiceListRequest {
        src_peer: "a".into(),
        services: vec!["shop".into(), "ledger".into()],
        src_peer_labels: Some(labels(&[("partner", "yes")])),
        service_labels: Some(BTreeMap::from([
            ("shop".to_string(), labels(&[("exposure", "public")])),
            ("ledger".to_string(), labels(&[("exposure", "internal")])),
        ])),
    });
    assert_eq!(
        decide(&r, &list).get_strings(keys::SERVICES),
        Some(vec!["shop"])
    );
    // peer_labels is for expose and list only: on a connection, that rule never matches.
    let only_peer = rules(json!([{"agent": "acl", "id": "p", "action": "allow",
        "match": {"peer_labels": {}}}]));
    let c = decide(&only_peer, &conn(&[], &[], &[("p1", &[])]));
    assert_eq!(c.get_str(keys::ACTION), Some("deny"));
}

#[test]
fn tiers_map_to_priorities_and_deny_wins_within_one() {
    // ClusterLink's order: privileged deny, privileged allow, regular deny, regular allow.
    let r = rules(json!([
        {"agent": "acl", "id": "regular-allow-all", "priority": 100, "action": "allow"},
        {"agent": "acl", "id": "regular-deny-db", "priority": 100, "action": "deny",
         "match": {"dst_labels": {"matchLabels": {"app": "db"}}}},
        {"agent": "acl", "id": "privileged-allow-ops", "priority": 0, "action": "allow",
         "match": {"src_labels": {"matchLabels": {"team": "ops"}}}},
        {"agent": "acl", "id": "privileged-deny-quarantined", "priority": 0, "action": "deny",
         "match": {"src_labels": {"matchLabels": {"quarantine": "true"}}}},
    ]));
    let peers: &[(&str, &[(&str, &str)])] = &[("p1", &[])];
    let who = |src: &[(&str, &str)]| {
        let d = decide(&r, &conn(src, &[("app", "db")], peers));
        let first = d.get(keys::REASONS).and_then(|v| match v {
            Value::Array(a) => a.first().cloned(),
            _ => None,
        });
        (
            d.get_str(keys::ACTION).unwrap_or("").to_string(),
            format!("{first:?}"),
        )
    };
    let (action, why) = who(&[("team", "ops"), ("quarantine", "true")]);
    assert!(
        action == "deny" && why.contains("privileged-deny-quarantined"),
        "{why}"
    );
    let (action, why) = who(&[("team", "ops")]);
    assert!(
        action == "allow" && why.contains("privileged-allow-ops"),
        "{why}"
    );
    let (action, why) = who(&[("team", "dev")]);
    assert!(action == "deny" && why.contains("regular-deny-db"), "{why}");
    let other = decide(&r, &conn(&[], &[("app", "web")], peers));
    assert_eq!(other.get_str(keys::ACTION), Some("allow"));
}

#[test]
fn label_indexed_rules_keep_their_order_with_the_rest() {
    // Rules indexed by a required label merge with the name-indexed and open ones in
    // evaluation order: the label rule at priority 1 beats the open allow at priority 2, and
    // loses to the named deny at priority 0.
    let r = rules(json!([
        {"agent": "acl", "id": "open", "priority": 2, "action": "allow"},
        {"agent": "acl", "id": "db-label", "priority": 1, "action": "deny",
         "match": {"dst_labels": {"matchLabels": {"app": "db", "env": "prod"}}}},
        {"agent": "acl", "id": "named", "priority": 0, "action": "allow",
         "match": {"src_service": "web", "dst_service": "db", "dst_peer": "p-named"}},
    ]));
    let prod: &[(&str, &str)] = &[("app", "db"), ("env", "prod")];
    let d = decide(&r, &conn(&[], prod, &[("p-named", &[]), ("p-other", &[])]));
    assert_eq!(d.get_strings(keys::DST_PEERS), Some(vec!["p-named"]));
    let staging = decide(
        &r,
        &conn(
            &[],
            &[("app", "db"), ("env", "staging")],
            &[("p-other", &[])],
        ),
    );
    assert_eq!(
        staging.get_str(keys::ACTION),
        Some("allow"),
        "the label rule needs both labels"
    );
}

#[test]
fn invalid_selectors_and_contradictions_are_refused() {
    let acl = Acl::default();
    for (doc, says) in [
        (
            json!({"agent": "acl", "id": "x", "action": "allow", "match": {"dst_labels":
                {"matchExpressions": [{"key": "a", "operator": "In"}]}}}),
            "match.dst_labels",
        ),
        (
            json!({"agent": "acl", "id": "x", "action": "allow",
                "match": {"peer_labels": {}, "src_labels": {}}}),
            "never matches",
        ),
        (
            json!({"agent": "acl", "id": "x", "action": "allow",
                "match": {"dst_labels": {}, "service_labels": {}}}),
            "duplicate",
        ),
    ] {
        let err = parse_policy(&acl, &rmp_serde::to_vec_named(&doc).unwrap()).expect_err(says);
        assert!(err.contains(says), "{says}: {err}");
    }
}
