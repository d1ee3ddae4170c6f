use super::*;
use bus::event::{Direction, NewConnection};

fn connection(peers: &[&str]) -> Event {
    Event::NewConnection(NewConnection {
        src_service: "a".into(),
        dst_service: "b".into(),
        direction: Direction::Outgoing,
        src_peer: None,
        dst_peers: Some(peers.iter().map(|p| p.to_string()).collect()),
        connection_id: Some("c".into()),
        src_labels: None,
        dst_labels: None,
        peer_labels: None,
    })
}

fn run_with(state: State) -> Run {
    Run {
        state,
        degraded: false,
        timings: Vec::new(),
        pure: 0,
        copies: 0,
        ignored_dry_run: false,
    }
}

#[test]
fn a_target_peer_outside_the_candidates_is_a_deny() {
    let mut s = State::new();
    s.set_strings(keys::DST_PEERS, &["p1"]);
    s.insert(keys::TARGET_PEER, "p2");
    let mut run = run_with(s);
    finalize(&mut run, "e", &connection(&["p1", "p2"]));
    let s = &run.state;
    assert_eq!(s.get_str(keys::ACTION), Some("deny"));
    assert_eq!(s.get(keys::TARGET_PEER), None);
    assert_eq!(s.get_strings(keys::DST_PEERS), Some(vec![]));
    let reasons = format!("{:?}", s.get(keys::REASONS));
    assert!(reasons.contains(INVALID_TARGET_PEER), "{reasons}");

    // Without any candidate list, a target cannot be checked: deny too.
    let mut s = State::new();
    s.insert(keys::TARGET_PEER, "p2");
    let mut run = run_with(s);
    finalize(&mut run, "e", &connection(&[]));
    assert_eq!(run.state.get_str(keys::ACTION), Some("deny"));
}

#[test]
fn a_target_peer_among_the_candidates_is_allowed() {
    let mut s = State::new();
    s.set_strings(keys::DST_PEERS, &["p1", "p2"]);
    s.insert(keys::TARGET_PEER, "p2");
    let mut run = run_with(s);
    finalize(&mut run, "e", &connection(&["p1", "p2"]));
    assert_eq!(run.state.get_str(keys::ACTION), Some("allow"));
    assert_eq!(run.state.get_str(keys::TARGET_PEER), Some("p2"));
    assert_eq!(run.state.get_str(keys::EVENT_ID), Some("e"));
}

#[test]
fn a_late_allow_becomes_a_deny_that_every_answering_kind_undoes() {
    let mut s = State::new();
    s.set_strings(keys::DST_PEERS, &["p1"]);
    s.insert(keys::TARGET_PEER, "p1");
    let mut run = run_with(s);
    let kind = |agent: &str, outcome| AgentTiming {
        agent: agent.into(),
        priority: 0,
        latency_us: 1,
        outcome,
        cached: false,
    };
    run.timings = vec![
        kind("acl", Outcome::Answered),
        kind("conn-limit", Outcome::Answered),
        kind("monitor", Outcome::Observed),
    ];
    deny_late(&mut run);
    finalize(&mut run, "e", &connection(&["p1"]));
    assert_eq!(run.state.get_str(keys::ACTION), Some("deny"));
    assert_eq!(run.state.get(keys::TARGET_PEER), None);
    let reasons = format!("{:?}", run.state.get(keys::REASONS));
    assert!(reasons.contains(PAST_DEADLINE), "{reasons}");
    let undo = undo_for(&run, &Bytes::new(), &HeaderMap::new()).expect("an undo");
    let kinds: Vec<&str> = undo.kinds.iter().map(|k| k.as_str()).collect();
    assert_eq!(kinds, ["acl", "conn-limit"]);
    // An answer that said it may be cached (or came from the cache) took nothing.
    run.pure = 1; // acl, timings[0]
    let undo = undo_for(&run, &Bytes::new(), &HeaderMap::new()).expect("an undo");
    let kinds: Vec<&str> = undo.kinds.iter().map(|k| k.as_str()).collect();
    assert_eq!(kinds, ["conn-limit"]);
    run.pure |= 1 << 1; // conn-limit
    assert!(undo_for(&run, &Bytes::new(), &HeaderMap::new()).is_none());
}

#[test]
fn a_kind_that_denied_is_undone_only_if_another_copy_of_its_call_may_have_run() {
    let mut run = run_with(State::new());
    run.timings = vec![AgentTiming {
        agent: "conn-limit".into(),
        priority: 0,
        latency_us: 1,
        outcome: Outcome::Answered,
        cached: false,
    }];
    deny(
        &mut run.state,
        Reason::new("conn-limit", "db", Effect::Deny),
    );
    assert!(
        undo_for(&run, &Bytes::new(), &HeaderMap::new()).is_none(),
        "one copy, which refused: nothing taken"
    );
    run.copies = 1;
    let undo = undo_for(&run, &Bytes::new(), &HeaderMap::new()).expect("an undo");
    assert_eq!(
        undo.kinds[0].as_str(),
        "conn-limit",
        "a hedged copy may have admitted"
    );
}
