//! Imports through the translation and the real LB: ClusterLink's three schemes, its
//! round-robin counter per Import, and its checks.

use std::collections::HashMap;

use bus::event::{Event, NewConnection};
use bus::state::keys;
use bus::{Direction, Value};
use serde_json::{json, Value as Json};

use crate::clusterlink::{translate, API_VERSION};
use crate::kind::{parse_policy, AgentKind, Stored};
use crate::kinds::lb::{Lb, LbRules};

fn import(name: &str, scheme: Option<&str>, peers: &[&str]) -> Json {
    let sources: Vec<Json> = peers
        .iter()
        .map(|p| json!({"peer": p, "exportName": "db", "exportNamespace": "shop"}))
        .collect();
    let mut spec = json!({"port": 5432, "sources": sources});
    if let Some(s) = scheme {
        spec["lbScheme"] = json!(s);
    }
    json!({"apiVersion": API_VERSION, "kind": "Import",
           "metadata": {"name": name, "namespace": "shop"}, "spec": spec})
}

fn rules(objects: &[Json]) -> LbRules {
    let stored = objects
        .iter()
        .flat_map(|o| translate(o).expect("translates").policies)
        .map(|v| {
            let p = parse_policy(&Lb, &rmp_serde::to_vec_named(&v).unwrap()).expect("valid");
            Stored::site(p.id.clone(), p)
        })
        .collect();
    Lb.compile(stored)
}

/// The pick for a connection to `shop/<import>` with these candidates: the peer, or `deny`.
fn pick(rules: &LbRules, import: &str, candidates: &[&str]) -> String {
    let ev = Event::NewConnection(NewConnection {
        src_service: "web".into(),
        dst_service: format!("shop/{import}"),
        direction: Direction::Outgoing,
        src_peer: None,
        dst_peers: Some(candidates.iter().map(|s| s.to_string()).collect()),
        connection_id: None,
        src_labels: None,
        dst_labels: None,
        peer_labels: None,
        namespace: Some("shop".into()),
    });
    let patch = Lb.decide(rules, &ev, &ev.initial_state());
    match patch.get(keys::TARGET_PEER).and_then(Value::as_str) {
        Some(p) => p.to_string(),
        None => patch
            .get(keys::ACTION)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string(),
    }
}

#[test]
fn static_is_ordered_failover_past_denied_and_removed_sources() {
    let r = rules(&[import("db", Some("static"), &["a", "b", "c"])]);
    assert_eq!(pick(&r, "db", &["a", "b", "c"]), "a");
    assert_eq!(
        pick(&r, "db", &["c", "b"]),
        "b",
        "the sources' order, not the candidates'"
    );
    assert_eq!(pick(&r, "db", &["c"]), "c");
    assert_eq!(pick(&r, "db", &["x"]), "deny", "only sources are picked");
}

#[test]
fn round_robin_is_clusterlinks_one_counter_per_import() {
    let r = rules(&[
        import("db", None, &["a", "b", "c"]),
        import("cache", Some("round-robin"), &["a", "b"]),
    ]);
    let all = ["a", "b", "c"];
    // ClusterLink's counter starts at 1: its first pick is the second source.
    let seq: Vec<String> = (0..6).map(|_| pick(&r, "db", &all)).collect();
    assert_eq!(seq, ["b", "c", "a", "b", "c", "a"]);
    // Another Import's picks do not move this one's counter.
    assert_eq!(pick(&r, "cache", &["a", "b"]), "b");
    assert_eq!(pick(&r, "db", &all), "b");
    // With b denied, each attempt counts, as ClusterLink's Select does: c, a, c, a.
    let r = rules(&[import("db", None, &["a", "b", "c"])]);
    let seq: Vec<String> = (0..4).map(|_| pick(&r, "db", &["a", "c"])).collect();
    assert_eq!(seq, ["c", "a", "c", "a"]);
}

#[test]
fn random_draws_again_past_a_denied_source_as_clusterlink_does() {
    let r = rules(&[import("db", Some("random"), &["a", "b", "c"])]);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..3000 {
        *counts.entry(pick(&r, "db", &["a", "c"])).or_default() += 1;
    }
    // b drawn (1/3) is passed, and a new draw skips it: a gets 1/3 + 1/9 = 4/9 (1 333 of
    // 3 000), c gets 1/3 + 2/9 = 5/9 (1 667). One draw walking on would give a 1/3 and c 2/3.
    let (a, c) = (counts["a"], counts["c"]);
    assert_eq!(a + c, 3000, "{counts:?}");
    assert!((1200..1470).contains(&a), "{counts:?}");
}

#[test]
fn round_robin_counts_every_attempt_even_when_no_source_is_left() {
    let r = rules(&[import("db", None, &["a", "b", "c"])]);
    assert_eq!(pick(&r, "db", &["x"]), "deny");
    // Three attempts counted (1, 2, 3): the next pick starts at 4, the second source.
    assert_eq!(pick(&r, "db", &["a", "b", "c"]), "b");
}

#[test]
fn an_import_becomes_one_lb_policy_and_bad_ones_are_refused_by_field() {
    let t = translate(&import("db", None, &["a", "b"])).expect("translates");
    assert_eq!(t.origin.to_string(), "Import shop/db");
    let doc = serde_json::to_value(&t.policies[0]).unwrap();
    assert_eq!(doc["id"], "cl-import__shop__db");
    assert_eq!(doc["dst_service"], "shop/db");
    assert_eq!(doc["scheme"], "round-robin", "ClusterLink's default");
    assert_eq!(doc["sources"], json!(["a", "b"]));
    let with = |f: &dyn Fn(&mut Json)| {
        let mut o = import("db", None, &["a", "b"]);
        f(&mut o);
        translate(&o).expect_err("refused")
    };
    for (e, field, says) in [
        (
            with(&|o| o["spec"]["lbScheme"] = json!("least-loaded")),
            "spec.lbScheme",
            "not one of",
        ),
        (
            with(&|o| o["spec"]["sources"] = json!([])),
            "spec.sources",
            "empty",
        ),
        (
            with(&|o| o["spec"]["sources"][1]["peer"] = json!("a")),
            "spec.sources[1].peer",
            "twice",
        ),
        (
            with(&|o| o["spec"]["sources"][0] = json!({"exportName": "db"})),
            "spec.sources[0].peer",
            "missing",
        ),
        (
            with(&|o| {
                o["spec"].as_object_mut().unwrap().remove("port");
            }),
            "spec.port",
            "missing",
        ),
        (
            with(&|o| o["spec"]["targetPort"] = json!(70000)),
            "spec.targetPort",
            "not a port",
        ),
        (
            with(&|o| o["metadata"]["name"] = json!("x".repeat(64))),
            "metadata.name",
            "at most 63",
        ),
    ] {
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains(says), "{e}");
    }
}
