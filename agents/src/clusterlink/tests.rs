//! ClusterLink's objects through the translation and the real ACL: the decisions are
//! ClusterLink's (connectivitypdp's order, the namespace rule, the unknown-client rule).

use std::collections::BTreeMap;

use bus::event::{Event, Labels, NewConnection};
use bus::state::keys;
use bus::{Direction, Value};
use serde_json::{json, Value as Json};

use super::*;
use crate::kind::{parse_policy, AgentKind, Stored};
use crate::kinds::acl::Acl;

fn object(kind: &str, ns: Option<&str>, name: &str, spec: Json) -> Json {
    let mut meta = json!({"name": name});
    if let Some(ns) = ns {
        meta["namespace"] = json!(ns);
    }
    json!({"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec})
}

fn spec(action: &str, from: Json, to: Json) -> Json {
    json!({"action": action, "from": [{"workloadSelector": from}], "to": [{"workloadSelector": to}]})
}

/// The engine documents the objects became, each through the ACL's own decoder.
fn rules(objects: &[Json]) -> crate::kinds::acl::AclRules {
    let acl = Acl::default();
    let stored = objects
        .iter()
        .flat_map(|o| translate(o).expect("translates").policies)
        .map(|v| {
            let p = parse_policy(&acl, &rmp_serde::to_vec_named(&v).unwrap()).expect("valid");
            Stored::site(p.id.clone(), p)
        })
        .collect();
    acl.compile(stored)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A connection as a gateway sends it: ClusterLink's attributes, one candidate peer.
fn decide(
    rules: &crate::kinds::acl::AclRules,
    ns: &str,
    src: Option<Labels>,
    dst: Labels,
    peer: Labels,
) -> (String, Option<String>) {
    let e = NewConnection {
        src_service: "client".into(),
        dst_service: "svc".into(),
        direction: Direction::Outgoing,
        src_peer: None,
        dst_peers: Some(vec!["p1".into()]),
        connection_id: None,
        src_labels: src,
        dst_labels: Some(dst),
        peer_labels: Some(BTreeMap::from([("p1".to_string(), peer)])),
        namespace: Some(ns.into()),
    };
    let ev = Event::NewConnection(e);
    let patch = Acl::default().decide(rules, &ev, &ev.initial_state());
    let action = patch
        .get(keys::ACTION)
        .and_then(Value::as_str)
        .unwrap_or("?");
    let Some(Value::Array(reasons)) = patch.get(keys::REASONS) else {
        panic!("no reasons");
    };
    let field = |r: &Value, k: &str| {
        r.as_map()?
            .iter()
            .find(|(n, _)| n.as_str() == Some(k))?
            .1
            .as_str()
            .map(str::to_owned)
    };
    let decider = reasons
        .iter()
        .find(|r| field(r, "effect").as_deref() == Some(action));
    let by = decider.and_then(|r| field(r, "origin").or_else(|| field(r, "policy")));
    (action.to_string(), by)
}

/// connectivitypdp's four layers on one connection, removed one by one from the top: each
/// removal hands the decision to the next layer, and the last to the default deny.
#[test]
fn the_four_layers_decide_in_clusterlinks_order() {
    let metering = || {
        labels(&[
            ("workloadName", "global-metering-service"),
            ("environment", "prod"),
        ])
    };
    let private_prod = || {
        Some(labels(&[
            ("classification", "private"),
            ("environment", "prod"),
        ]))
    };
    let layers = [
        object(
            "PrivilegedAccessPolicy",
            None,
            "deny-private-to-metering",
            spec(
                "deny",
                json!({"matchLabels": {"classification": "private", "environment": "prod"}}),
                json!({"matchLabels": {"workloadName": "global-metering-service", "environment": "prod"}}),
            ),
        ),
        object(
            "PrivilegedAccessPolicy",
            None,
            "allow-metering",
            spec(
                "allow",
                json!({}),
                json!({"matchLabels": {"workloadName": "global-metering-service", "environment": "prod"}}),
            ),
        ),
        object(
            "AccessPolicy",
            Some("default"),
            "deny-metering",
            spec(
                "deny",
                json!({}),
                json!({"matchLabels": {"workloadName": "global-metering-service"}}),
            ),
        ),
        object(
            "AccessPolicy",
            Some("default"),
            "allow-named",
            spec(
                "allow",
                json!({}),
                json!({"matchExpressions": [{"key": "workloadName", "operator": "Exists"}]}),
            ),
        ),
    ];
    let expected = [
        ("deny", "PrivilegedAccessPolicy deny-private-to-metering"),
        ("allow", "PrivilegedAccessPolicy allow-metering"),
        ("deny", "AccessPolicy default/deny-metering"),
        ("allow", "AccessPolicy default/allow-named"),
        ("deny", "default"),
    ];
    for (top, (action, by)) in expected.iter().enumerate() {
        let r = rules(&layers[top..]);
        let got = decide(&r, "default", private_prod(), metering(), Labels::new());
        assert_eq!(
            got,
            (action.to_string(), Some(by.to_string())),
            "top {top} removed"
        );
    }
    // Not private: the privileged deny does not match, the privileged allow does.
    let r = rules(&layers);
    let public = Some(labels(&[("classification", "public")]));
    assert_eq!(
        decide(&r, "default", public, metering(), Labels::new())
            .1
            .as_deref(),
        Some("PrivilegedAccessPolicy allow-metering")
    );
}

#[test]
fn a_regular_policy_counts_only_in_its_namespace_and_a_privileged_one_everywhere() {
    let allow_all = |kind, ns| object(kind, ns, "allow-all", spec("allow", json!({}), json!({})));
    let src = || Some(labels(&[("client.clusterlink.net/namespace", "x")]));
    let r = rules(&[allow_all("AccessPolicy", Some("team-a"))]);
    assert_eq!(
        decide(&r, "team-a", src(), Labels::new(), Labels::new()).0,
        "allow"
    );
    assert_eq!(
        decide(&r, "team-b", src(), Labels::new(), Labels::new()),
        ("deny".into(), Some("default".into()))
    );
    let r = rules(&[allow_all("PrivilegedAccessPolicy", None)]);
    assert_eq!(
        decide(&r, "team-b", src(), Labels::new(), Labels::new()).0,
        "allow"
    );
}

#[test]
fn an_unknown_client_is_denied_once_some_from_selects_by_attribute() {
    let allow_all = object(
        "PrivilegedAccessPolicy",
        None,
        "allow-all",
        spec("allow", json!({}), json!({})),
    );
    let by_label = object(
        "AccessPolicy",
        Some("default"),
        "deny-tests",
        spec(
            "deny",
            json!({"matchLabels": {"client.clusterlink.net/labels.app": "test"}}),
            json!({}),
        ),
    );
    // Only `{}` in every `from`: a client without attributes is decided like any other.
    let r = rules(std::slice::from_ref(&allow_all));
    assert_eq!(
        decide(&r, "default", None, Labels::new(), Labels::new()).0,
        "allow"
    );
    // A `from` that selects: no attributes, no connection, even under a privileged allow.
    let r = rules(&[allow_all, by_label]);
    let (action, by) = decide(&r, "default", None, Labels::new(), Labels::new());
    assert_eq!(
        (action.as_str(), by.as_deref()),
        ("deny", Some("unknown-client"))
    );
    let (action, _) = decide(
        &r,
        "default",
        Some(Labels::new()),
        Labels::new(),
        Labels::new(),
    );
    assert_eq!(action, "deny", "an empty attribute map is unknown too");
    let known = Some(labels(&[("client.clusterlink.net/labels.app", "web")]));
    assert_eq!(
        decide(&r, "default", known, Labels::new(), Labels::new()).0,
        "allow"
    );
}

#[test]
fn to_sees_the_service_and_the_candidate_peer_and_lists_are_ors() {
    let policy = object(
        "AccessPolicy",
        Some("default"),
        "to-eu-db",
        json!({"action": "allow",
               "from": [{"workloadSelector": {"matchLabels": {"client.clusterlink.net/labels.app": "web"}}},
                        {"workloadSelector": {"matchLabels": {"client.clusterlink.net/labels.app": "batch"}}}],
               "to": [{"workloadSelector": {"matchLabels": {"export.clusterlink.net/name": "db", "peer.clusterlink.net/labels.region": "eu"}}}]}),
    );
    let r = rules(&[policy]);
    let db = || labels(&[("export.clusterlink.net/name", "db")]);
    let eu = || {
        labels(&[
            ("peer.clusterlink.net/name", "p1"),
            ("peer.clusterlink.net/labels.region", "eu"),
        ])
    };
    let client = |app| Some(labels(&[("client.clusterlink.net/labels.app", app)]));
    assert_eq!(decide(&r, "default", client("web"), db(), eu()).0, "allow");
    assert_eq!(
        decide(&r, "default", client("batch"), db(), eu()).0,
        "allow",
        "the second from item"
    );
    assert_eq!(decide(&r, "default", client("ui"), db(), eu()).0, "deny");
    let us = labels(&[("peer.clusterlink.net/labels.region", "us")]);
    assert_eq!(
        decide(&r, "default", client("web"), db(), us).0,
        "deny",
        "the peer's label is read"
    );
}

#[test]
fn invalid_objects_are_refused_naming_the_object_and_the_field() {
    let ap = |spec: Json| object("AccessPolicy", Some("default"), "p", spec);
    let cases = [
        (
            ap(json!({"from": [{"workloadSelector": {}}], "to": [{"workloadSelector": {}}]})),
            "spec.action",
            "missing",
        ),
        (
            ap(json!({"action": "maybe", "from": [], "to": []})),
            "spec.action",
            "not one of allow, deny",
        ),
        (
            ap(json!({"action": "allow", "from": [], "to": [{"workloadSelector": {}}]})),
            "spec.from",
            "empty",
        ),
        (
            ap(json!({"action": "allow", "from": [{"workloadSelector": {}}]})),
            "spec.to",
            "empty",
        ),
        (
            ap(
                json!({"action": "allow", "from": [{"workloadSets": ["a"]}], "to": [{"workloadSelector": {}}]}),
            ),
            "spec.from[0].workloadSets",
            "not supported",
        ),
        (
            ap(json!({"action": "allow", "from": [{}], "to": [{"workloadSelector": {}}]})),
            "spec.from[0]",
            "needs a workloadSelector",
        ),
        (
            ap(
                json!({"action": "allow", "from": [{"workloadSelector": {"matchLabels": {"this is not a key": "x"}}}], "to": [{"workloadSelector": {}}]}),
            ),
            "spec.from[0].workloadSelector",
            "not a label key",
        ),
        (
            ap(json!({"action": "allow", "form": [], "to": []})),
            "spec.form",
            "unknown field `form`",
        ),
        (
            object("AccessPolicy", Some("default"), "", json!({})),
            "metadata.name",
            "missing",
        ),
        (
            object("Export", Some("default"), "e", json!({})),
            "kind",
            "not a kind the engine reads",
        ),
    ];
    for (doc, field, says) in cases {
        let e = translate(&doc).expect_err(field);
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains(says), "{e}");
        if field != "kind" && field != "metadata.name" {
            assert_eq!(e.object, "AccessPolicy default/p");
        }
    }
    let mut old = ap(json!({}));
    old["apiVersion"] = json!("clusterlink.net/v1beta9");
    assert!(is_clusterlink(&old));
    assert_eq!(translate(&old).unwrap_err().field, "apiVersion");
    let older = json!({"apiVersion": "clusterlink/v1alpha1", "kind": "ConnectivityPolicy", "metadata": {"name": "x"}});
    assert!(is_clusterlink(&older));
    let e = translate(&older).unwrap_err();
    assert!(
        e.field == "apiVersion" && e.message.contains("before v0.2"),
        "{e}"
    );
}

#[test]
fn ids_are_distinct_for_distinct_objects_and_the_namespace_defaults_as_kubectls() {
    let id = |kind: &str, ns: Option<&str>, name: &str| {
        let o = object(kind, ns, name, spec("allow", json!({}), json!({})));
        let t = translate(&o).unwrap();
        (policy_id(&t.origin).unwrap(), t.origin.to_string())
    };
    assert_eq!(
        id("AccessPolicy", None, "a"),
        ("cl-ap__default__a".into(), "AccessPolicy default/a".into())
    );
    assert_eq!(
        id("PrivilegedAccessPolicy", Some("ignored"), "a").0,
        "cl-pap__a"
    );
    let distinct = [
        id("AccessPolicy", Some("a"), "b.c"),
        id("AccessPolicy", Some("a"), "b_c"),
        id("AccessPolicy", Some("a"), "b_dc"),
        id("AccessPolicy", Some("a_d"), "c"),
    ];
    for (i, a) in distinct.iter().enumerate() {
        for b in &distinct[i + 1..] {
            assert_ne!(a.0, b.0);
        }
    }
    let long = object(
        "AccessPolicy",
        Some("default"),
        &"x".repeat(200),
        spec("allow", json!({}), json!({})),
    );
    assert!(translate(&long)
        .unwrap_err()
        .message
        .contains("at most 128"));
}
