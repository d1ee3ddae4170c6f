use std::collections::HashMap;

use bus::event::Direction;

use super::*;

fn policy(id: &str, service: &str, scheme: Scheme) -> LbPolicy {
    LbPolicy {
        agent: NAME.into(),
        id: id.into(),
        dst_service: service.into(),
        scheme,
        weights: Default::default(),
        peer: None,
        hash_on: HashOn::SrcService,
        sources: Vec::new(),
        origin: None,
    }
}

fn event(src: &str, peers: &[&str]) -> (Event, State) {
    let ev = Event::NewConnection(NewConnection {
        src_service: src.into(),
        dst_service: "db".into(),
        direction: Direction::Outgoing,
        src_peer: None,
        dst_peers: Some(peers.iter().map(|s| s.to_string()).collect()),
        connection_id: None,
        src_labels: None,
        dst_labels: None,
        peer_labels: None,
        namespace: None,
    });
    let st = ev.initial_state();
    (ev, st)
}

fn picks(rules: &LbRules, src: &str, peers: &[&str], n: usize) -> HashMap<String, usize> {
    let (ev, st) = event(src, peers);
    let mut counts = HashMap::new();
    for _ in 0..n {
        let patch = Lb.decide(rules, &ev, &st);
        *counts
            .entry(patch.get_str(keys::TARGET_PEER).unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

/// A call of run `run`, as the dispatcher sends it (and sends it again when it hedges).
fn call(rules: &LbRules, peers: &[&str], run: &str) -> String {
    let (ev, mut st) = event("a", peers);
    st.insert(keys::RUN_ID, run);
    let patch = Lb.decide(rules, &ev, &st);
    patch.get_str(keys::TARGET_PEER).unwrap().to_string()
}

#[test]
fn a_hedged_copy_picks_as_its_run_did_and_moves_round_robin_on_once() {
    let mut by_sources = policy("rr", "db", Scheme::RoundRobin);
    by_sources.sources = vec!["p1".into(), "p2".into(), "p3".into()];
    for p in [policy("rr", "db", Scheme::RoundRobin), by_sources] {
        let rules = Lb.compile(vec![Stored::site("rr", p)]);
        let peers = ["p1", "p2", "p3"];
        let first = call(&rules, &peers, "r1");
        assert_eq!(call(&rules, &peers, "r1"), first, "the copy of r1");
        let second = call(&rules, &peers, "r2");
        let third = call(&rules, &peers, "r3");
        assert_eq!(call(&rules, &peers, "r2"), second, "a late copy of r2");
        let mut all = vec![first, second, third];
        all.sort();
        assert_eq!(
            all,
            ["p1", "p2", "p3"],
            "three runs, three peers, none skipped"
        );
    }
}

#[test]
fn a_copy_whose_run_passed_over_a_source_does_not_pass_over_it_again() {
    let mut p = policy("rr", "db", Scheme::RoundRobin);
    p.sources = vec!["p1".into(), "p2".into(), "p3".into()];
    let rules = Lb.compile(vec![Stored::site("rr", p)]);
    // p2 is not offered: r1 attempts it (counted, as ClusterLink counts) and fails over to p3.
    assert_eq!(call(&rules, &["p1", "p3"], "r1"), "p3");
    assert_eq!(call(&rules, &["p1", "p3"], "r1"), "p3", "the copy");
    assert_eq!(
        call(&rules, &["p1", "p2", "p3"], "r2"),
        "p1",
        "after r1's two attempts"
    );
}

#[test]
fn round_robin_cycles() {
    let rules = Lb.compile(vec![Stored::site(
        "rr",
        policy("rr", "db", Scheme::RoundRobin),
    )]);
    let c = picks(&rules, "a", &["p1", "p2", "p3"], 300);
    assert_eq!(c.values().copied().collect::<Vec<_>>(), vec![100; 3]);
}

#[test]
fn weighted_follows_the_weights() {
    let mut p = policy("w", "db", Scheme::Weighted);
    p.weights = [("p1".to_string(), 3), ("p2".to_string(), 1)].into();
    let rules = Lb.compile(vec![Stored::site("w", p)]);
    let c = picks(&rules, "a", &["p1", "p2", "p3"], 4000);
    assert!(!c.contains_key("p3"));
    let share = c["p1"] as f64 / 4000.0;
    assert!((0.70..0.80).contains(&share), "p1 share {share}");
}

#[test]
fn static_uses_its_peer_or_falls_back() {
    let mut p = policy("s", "db", Scheme::Static);
    p.peer = Some("p2".into());
    let rules = Lb.compile(vec![Stored::site("s", p)]);
    assert_eq!(picks(&rules, "a", &["p1", "p2"], 50)["p2"], 50);
    let (ev, st) = event("a", &["p1", "p3"]);
    let patch = Lb.decide(&rules, &ev, &st);
    assert!(["p1", "p3"].contains(&patch.get_str(keys::TARGET_PEER).unwrap()));
}

#[test]
fn consistent_hash_is_sticky_and_moves_only_removed_keys() {
    let rules = Lb.compile(vec![Stored::site(
        "h",
        policy("h", "db", Scheme::ConsistentHash),
    )]);
    let peers = ["p1", "p2", "p3", "p4"];
    let mut moved = 0;
    let mut spread = HashMap::new();
    for i in 0..400 {
        let src = format!("svc-{i}");
        let first = picks(&rules, &src, &peers, 3);
        assert_eq!(first.len(), 1, "same key, several peers");
        let chosen = first.keys().next().unwrap().clone();
        *spread.entry(chosen.clone()).or_insert(0) += 1;
        let without_p4 = picks(&rules, &src, &peers[..3], 1);
        let now = without_p4.keys().next().unwrap();
        if *now != chosen {
            assert_eq!(chosen, "p4", "a key not on the removed peer moved");
            moved += 1;
        }
    }
    assert_eq!(moved, spread["p4"]);
    assert!(spread.values().all(|n| *n > 50), "{spread:?}");
}

#[test]
fn random_without_policy_and_deny_without_candidates() {
    let rules = Lb.compile(vec![]);
    let c = picks(&rules, "a", &["p1", "p2"], 400);
    assert!(c["p1"] > 100 && c["p2"] > 100, "{c:?}");
    let (ev, st) = event("a", &[]);
    let patch = Lb.decide(&rules, &ev, &st);
    assert_eq!(patch.get_str(keys::ACTION), Some("deny"));
    let (ev, _) = event("a", &["p1"]);
    assert!(
        Lb.decide(&rules, &ev, &State::new()).is_empty(),
        "no candidates offered: no pick"
    );
}

#[test]
fn checks_name_the_field() {
    let p = policy("w", "db", Scheme::Weighted);
    assert!(Lb.check(&p).unwrap_err().contains("weights"));
    let p = policy("s", "db", Scheme::Static);
    assert!(Lb.check(&p).unwrap_err().contains("peer"));
    assert!(Lb.check(&policy("ok", "db", Scheme::Random)).is_ok());
}
