use std::collections::BTreeMap;

use bus::event::{ExposeService, NewConnection, ServiceListRequest};
use bus::Value;

use super::*;
use crate::kind::parse_policy;

/// Builds a policy from a tiny YAML-like list of fields through the real decoder.
fn policy(fields: &[(&str, Value)]) -> Result<AclPolicy, String> {
    let map: BTreeMap<String, Value> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    parse_policy(&Acl::default(), &rmp_serde::to_vec_named(&map).unwrap())
}

fn m(pairs: &[(&str, &str)]) -> Value {
    Value::Map(
        pairs
            .iter()
            .map(|(k, v)| (Value::from(*k), Value::from(*v)))
            .collect(),
    )
}

fn rule(id: &str, priority: i32, action: &str, matcher: &[(&str, &str)]) -> Stored<AclPolicy> {
    let p = policy(&[
        ("agent", "acl".into()),
        ("id", id.into()),
        ("priority", priority.into()),
        ("action", action.into()),
        ("match", m(matcher)),
    ])
    .unwrap();
    Stored::site(id, p)
}

fn audit(id: &str, action: &str, matcher: &[(&str, &str)]) -> Stored<AclPolicy> {
    let mut r = rule(id, 0, action, matcher);
    r.policy.mode = Mode::Audit;
    r
}

fn conn(src: &str, dst: &str, peers: &[&str]) -> (Event, State) {
    let e = NewConnection {
        src_service: src.into(),
        dst_service: dst.into(),
        direction: Direction::Outgoing,
        src_peer: Some("local".into()),
        dst_peers: Some(peers.iter().map(|s| s.to_string()).collect()),
        connection_id: None,
        src_labels: None,
        dst_labels: None,
        peer_labels: None,
        namespace: None,
    };
    let ev = Event::NewConnection(e);
    let st = ev.initial_state();
    (ev, st)
}

fn effects(patch: &State) -> Vec<(String, String)> {
    let Some(Value::Array(rs)) = patch.get(keys::REASONS) else {
        return vec![];
    };
    rs.iter()
        .map(|r| {
            let get = |k: &str| {
                r.as_map()
                    .unwrap()
                    .iter()
                    .find(|(kk, _)| kk.as_str() == Some(k))
                    .unwrap()
                    .1
                    .as_str()
                    .unwrap()
                    .to_string()
            };
            (get("policy"), get("effect"))
        })
        .collect()
}

#[test]
fn first_matching_rule_by_priority_decides_and_deny_wins_ties() {
    let acl = Acl::default();
    let rules = acl.compile(vec![
        rule("allow-web", 10, "allow", &[("src_service", "web*")]),
        rule("deny-db", 10, "deny", &[("dst_service", "db")]),
        rule("allow-all", 20, "allow", &[]),
    ]);
    let (ev, st) = conn("web-1", "db", &["p1"]);
    let patch = acl.decide(&rules, &ev, &st);
    assert_eq!(patch.get_str(keys::ACTION), Some("deny"));
    assert_eq!(
        effects(&patch),
        [("deny-db".to_string(), "deny".to_string())]
    );
    let (ev, st) = conn("web-1", "api", &["p1"]);
    let patch = acl.decide(&rules, &ev, &st);
    assert_eq!(patch.get_str(keys::ACTION), Some("allow"));
    assert_eq!(
        effects(&patch),
        [("allow-web".to_string(), "allow".to_string())]
    );
}

/// A fleet rule decides before any site rule, whatever their priorities: a site's allow at a
/// lower priority number does not shadow the fleet's deny, and a site decides what the
/// fleet leaves unmatched.
#[test]
fn fleet_rules_decide_before_any_site_rule() {
    let acl = Acl::default();
    let fleet = |mut r: Stored<AclPolicy>| {
        r.level = bus::fleet::Level::Fleet;
        r
    };
    let rules = acl.compile(vec![
        rule("site-allows-db", -100, "allow", &[("dst_service", "db")]),
        fleet(rule(
            "fleet-denies-db",
            100,
            "deny",
            &[("dst_service", "db")],
        )),
        rule("site-allows-rest", 0, "allow", &[]),
    ]);
    let (ev, st) = conn("web", "db", &["p1"]);
    let patch = acl.decide(&rules, &ev, &st);
    assert_eq!(patch.get_str(keys::ACTION), Some("deny"));
    assert_eq!(
        effects(&patch),
        [("fleet-denies-db".to_string(), "deny".to_string())]
    );
    let (ev, st) = conn("web", "api", &["p1"]);
    let patch = acl.decide(&rules, &ev, &st);
    assert_eq!(patch.get_str(keys::ACTION), Some("allow"));
    assert_eq!(
        effects(&patch),
        [("site-allows-rest".to_string(), "allow".to_string())]
    );
}

#[test]
fn no_match_falls_to_the_default() {
    let rules = Acl::default().compile(vec![rule("r", 0, "allow", &[("dst_service", "x")])]);
    let (ev, st) = conn("a", "b", &["p1"]);
    let patch = Acl::default().decide(&rules, &ev, &st);
    assert_eq!(patch.get_str(keys::ACTION), Some("deny"));
    assert_eq!(
        effects(&patch),
        [("default".to_string(), "deny".to_string())]
    );
    let open = Acl {
        default: Action::Allow,
    };
    assert_eq!(
        open.decide(&rules, &ev, &st).get_str(keys::ACTION),
        Some("allow")
    );
}

#[test]
fn candidates_are_narrowed_per_peer() {
    let acl = Acl::default();
    let rules = acl.compile(vec![
        rule("no-p2", 0, "deny", &[("dst_peer", "p2")]),
        rule("all", 1, "allow", &[]),
    ]);
    let (ev, st) = conn("a", "b", &["p1", "p2", "p3"]);
    let patch = acl.decide(&rules, &ev, &st);
    assert_eq!(patch.get_str(keys::ACTION), Some("allow"));
    assert_eq!(patch.get_strings(keys::DST_PEERS), Some(vec!["p1", "p3"]));
    assert!(effects(&patch).contains(&("no-p2".into(), "narrow".into())));
    let (ev, st) = conn("a", "b", &["p2"]);
    assert_eq!(
        acl.decide(&rules, &ev, &st).get_str(keys::ACTION),
        Some("deny")
    );
    let (ev, st) = conn("a", "b", &[]);
    assert_eq!(
        acl.decide(&rules, &ev, &st).get_str(keys::ACTION),
        Some("deny")
    );
}

#[test]
fn audit_rules_report_but_never_decide() {
    let acl = Acl::default();
    let rules = acl.compile(vec![
        rule("all", 1, "allow", &[]),
        audit("would-block", "deny", &[("dst_service", "b")]),
    ]);
    let (ev, st) = conn("a", "b", &["p1"]);
    let patch = acl.decide(&rules, &ev, &st);
    assert_eq!(patch.get_str(keys::ACTION), Some("allow"));
    assert!(effects(&patch).contains(&("would-block".into(), "audit".into())));
}

#[test]
fn expose_and_list_count_only_rules_without_src_service_or_dst_peer() {
    let acl = Acl::default();
    let rules = acl.compile(vec![
        rule(
            "conn-only",
            0,
            "allow",
            &[("src_service", "web"), ("dst_service", "db")],
        ),
        rule(
            "peer-a-db",
            1,
            "allow",
            &[("src_peer", "a"), ("dst_service", "db")],
        ),
        rule("all-api", 2, "allow", &[("dst_service", "api")]),
        rule("outgoing", 3, "allow", &[("direction", "outgoing")]),
    ]);
    let ev = Event::ExposeService(ExposeService {
        service: "db".into(),
        peers: vec!["a".into(), "b".into()],
        service_labels: None,
        peer_labels: None,
    });
    let patch = acl.decide(&rules, &ev, &ev.initial_state());
    assert_eq!(patch.get_strings(keys::TARGET_PEERS), Some(vec!["a"]));
    assert!(patch.get(keys::ACTION).is_none());
    let ev = Event::ServiceListRequest(ServiceListRequest {
        src_peer: "b".into(),
        services: vec!["db".into(), "api".into(), "cache".into()],
        src_peer_labels: None,
        service_labels: None,
    });
    let patch = acl.decide(&rules, &ev, &ev.initial_state());
    assert_eq!(patch.get_strings(keys::SERVICES), Some(vec!["api"]));
}

#[test]
fn the_index_agrees_with_a_full_scan() {
    let acl = Acl::default();
    let mut policies = Vec::new();
    for i in 0..200 {
        let svc = format!("svc-{}", i % 20);
        let action = if i % 3 == 0 { "deny" } else { "allow" };
        let matcher: Vec<(&str, &str)> = match i % 4 {
            0 => vec![("dst_service", svc.as_str())],
            1 => vec![("dst_service", "svc-1*"), ("src_peer", "p1")],
            2 => vec![("src_service", "web")],
            _ => vec![("dst_service", svc.as_str()), ("dst_peer", "p2")],
        };
        policies.push(rule(&format!("r{i:03}"), i * 7 % 13, action, &matcher));
    }
    let rules = acl.compile(policies);
    for dst in ["svc-1", "svc-13", "svc-7", "other"] {
        for src_peer in ["p1", "p9"] {
            let q = Query {
                src_service: Some("web"),
                dst_service: Some(dst),
                src_peer: Some(src_peer),
                dst_peer: Some("p2"),
                direction: Some(Direction::Outgoing),
                partial: false,
                ..Query::default()
            };
            let scanned = rules
                .enforce
                .rules
                .iter()
                .find(|r| r.matches(&q))
                .map(|r| &r.id);
            assert_eq!(
                rules.enforce.first_match(&q).map(|r| &r.id),
                scanned,
                "{dst} {src_peer}"
            );
        }
    }
}

#[test]
fn invalid_documents_name_the_field() {
    let err = policy(&[
        ("agent", "acl".into()),
        ("id", "x".into()),
        ("action", "maybe".into()),
    ])
    .unwrap_err();
    assert!(err.contains("action"), "{err}");
    let err = policy(&[
        ("agent", "acl".into()),
        ("id", "x".into()),
        ("action", "allow".into()),
        ("match", m(&[("src_service", "a*b")])),
    ])
    .unwrap_err();
    assert!(err.contains("match.src_service"), "{err}");
    let err = policy(&[
        ("agent", "acl".into()),
        ("id", "x".into()),
        ("action", "allow".into()),
        ("acton", "x".into()),
    ])
    .unwrap_err();
    assert!(err.contains("acton"), "{err}");
    let err = policy(&[
        ("agent", "lb".into()),
        ("id", "x".into()),
        ("action", "allow".into()),
    ])
    .unwrap_err();
    assert!(err.contains("agent"), "{err}");
    let err = policy(&[("agent", "acl".into()), ("action", "allow".into())]).unwrap_err();
    assert!(err.contains("id"), "{err}");
}

#[test]
fn the_index_finds_what_a_scan_of_every_rule_in_order_finds() {
    // Rules over a few services and peers, exact, prefix and open, in mixed priorities; every
    // query's first match through the index must be the first match of a plain scan. Small
    // sets too, so that the first match is often a rule of one particular index list.
    let (svcs, peers) = (["db", "api", "web"], ["peer-a", "peer-b", "partner-x"]);
    let mut seed = 7u64;
    let mut next = |n: usize| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize % n
    };
    let mut checked = 0;
    for size in [3, 5, 10, 20, 50, 300].repeat(8) {
        let mut stored = Vec::new();
        for i in 0..size {
            let mut matcher = Vec::new();
            let dst = ["db", "api", "web", "db", "a*", "*", ""][next(7)];
            if !dst.is_empty() {
                matcher.push(("dst_service", dst));
            }
            let peer = [
                "peer-a",
                "peer-b",
                "partner-x",
                "peer-a",
                "partner-*",
                "*",
                "",
            ][next(7)];
            if !peer.is_empty() {
                matcher.push(("src_peer", peer));
            }
            let action = if next(2) == 0 { "allow" } else { "deny" };
            stored.push(rule(&format!("r{i}"), next(5) as i32, action, &matcher));
        }
        let rules = Acl::default().compile(stored);
        let index = &rules.enforce;
        for dst in svcs.iter().map(Some).chain([None]) {
            for peer in peers.iter().map(Some).chain([None]) {
                let q = Query {
                    src_service: Some("web"),
                    dst_service: dst.copied(),
                    src_peer: peer.copied(),
                    dst_peer: Some("p1"),
                    direction: Some(Direction::Outgoing),
                    partial: false,
                    ..Query::default()
                };
                let scan = index.rules.iter().find(|r| r.matches(&q)).map(|r| &r.id);
                assert_eq!(
                    index.first_match(&q).map(|r| &r.id),
                    scan,
                    "{size} rules, dst {dst:?} peer {peer:?}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 48 * 16);
}
