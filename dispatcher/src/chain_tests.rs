use super::*;
use crate::undo::undo_for;
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
        namespace: None,
    })
}

fn run_with(state: State) -> Run {
    Run {
        state,
        degraded: false,
        timings: Vec::new(),
        owed: 0,
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
fn a_late_allow_becomes_a_deny_that_the_kinds_owed_an_undo_get() {
    let mut s = State::new();
    s.set_strings(keys::DST_PEERS, &["p1"]);
    s.insert(keys::TARGET_PEER, "p1");
    let mut run = run_with(s);
    let call = |agent: &str| AgentTiming {
        agent: agent.into(),
        priority: 0,
        latency_us: 1,
        outcome: Outcome::Answered,
        cached: false,
    };
    run.timings = vec![call("acl"), call("conn-limit")];
    run.owed = 0b10; // conn-limit's call
    assert!(
        undo_for(
            &run.state,
            &run.timings,
            run.owed,
            &Bytes::new(),
            &HeaderMap::new()
        )
        .is_none(),
        "allowed: nothing to undo"
    );
    deny_late(&mut run);
    finalize(&mut run, "e", &connection(&["p1"]));
    assert!(run.state.denies());
    assert_eq!(run.state.get(keys::TARGET_PEER), None);
    let reasons = format!("{:?}", run.state.get(keys::REASONS));
    assert!(reasons.contains(PAST_DEADLINE), "{reasons}");
    let undo = undo_for(
        &run.state,
        &run.timings,
        run.owed,
        &Bytes::new(),
        &HeaderMap::new(),
    )
    .expect("an undo");
    let kinds: Vec<&str> = undo.kinds.iter().map(|k| k.as_str()).collect();
    assert_eq!(kinds, ["conn-limit"]);
    run.owed = 0;
    assert!(undo_for(
        &run.state,
        &run.timings,
        run.owed,
        &Bytes::new(),
        &HeaderMap::new()
    )
    .is_none());
}

#[test]
fn what_an_answer_says_it_holds_decides_its_undo() {
    let answered = |source, undo, hedged, denied| {
        owes_undo(Ended::Answered {
            how: Answer {
                source,
                echoed: true,
                undo,
                hedged,
            },
            denied,
        })
    };
    use bus::headers::Undo::{Held, Never, Nothing};
    // What the kind says of its answer, whether or not it denied.
    for denied in [false, true] {
        assert!(answered(Source::Agent, Some(Held), false, denied));
        assert!(!answered(Source::Agent, Some(Nothing), false, denied));
        assert!(!answered(Source::Agent, Some(Never), true, denied));
        // Another copy of a hedged call may hold what this one did not take.
        assert!(answered(Source::Agent, Some(Nothing), true, denied));
        // Pure answers, from the agent or the cache, hold nothing.
        assert!(!answered(Source::Pure, None, true, denied));
        assert!(!answered(Source::Cache, Some(Never), false, denied));
    }
    // An agent that predates `Policy-Undo`: undone unless it refused, unhedged.
    assert!(answered(Source::Agent, None, false, false));
    assert!(!answered(Source::Agent, None, false, true));
    assert!(answered(Source::Agent, None, true, true));
    // A failed call may have taken something, unless its kind never holds anything.
    let failed = |outcome, nothing, hedged| {
        owes_undo(Ended::Failed {
            outcome,
            nothing,
            hedged,
        })
    };
    assert!(failed(Outcome::Timeout, false, false) && failed(Outcome::Error, false, false));
    assert!(!failed(Outcome::Timeout, true, true));
    assert!(
        !failed(Outcome::NoResponders, false, false),
        "no instance took it"
    );
    assert!(
        failed(Outcome::NoResponders, false, true),
        "an earlier copy reached an instance that is gone now"
    );
}
