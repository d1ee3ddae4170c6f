use proptest::prelude::*;

use super::*;

fn strings(s: &State, key: &str) -> Vec<String> {
    s.get_strings(key)
        .unwrap()
        .into_iter()
        .map(String::from)
        .collect()
}

fn reason(agent: &str) -> Value {
    Value::Map(vec![(Value::from("agent"), Value::from(agent))])
}

#[test]
fn deny_is_final() {
    let mut s = State::new();
    let mut p = State::new();
    p.insert(keys::ACTION, "deny");
    assert_eq!(
        merge(&mut s, p, "a", &mut Holds::default()).unwrap(),
        Flow::Stop
    );
    let mut p = State::new();
    p.insert(keys::ACTION, "allow");
    assert_eq!(
        merge(&mut s, p, "a", &mut Holds::default()).unwrap(),
        Flow::Continue
    );
    assert_eq!(s.get_str(keys::ACTION), Some("deny"));
}

#[test]
fn candidates_only_narrow_and_may_reorder() {
    let mut s = State::new();
    s.set_strings(keys::DST_PEERS, &["a", "b", "c"]);
    let mut p = State::new();
    p.set_strings(keys::DST_PEERS, &["c", "x", "a", "c"]);
    merge(&mut s, p, "a", &mut Holds::default()).unwrap();
    assert_eq!(strings(&s, keys::DST_PEERS), ["c", "a"]);
}

#[test]
fn a_list_the_event_never_offered_stays_absent() {
    let mut s = State::new();
    let mut p = State::new();
    p.set_strings(keys::SERVICES, &["x"]);
    merge(&mut s, p, "a", &mut Holds::default()).unwrap();
    assert!(s.get(keys::SERVICES).is_none());
}

#[test]
fn most_restrictive_rate_limit_wins() {
    let rl = |n: u64| Value::Map(vec![(Value::from("bits_per_second"), Value::from(n))]);
    let mut s = State::new();
    for n in [500u64, 100, 300] {
        let mut p = State::new();
        p.insert(keys::RATE_LIMIT, rl(n));
        merge(&mut s, p, "a", &mut Holds::default()).unwrap();
    }
    assert_eq!(s.get(keys::RATE_LIMIT), Some(&rl(100)));
}

#[test]
fn reasons_accumulate_in_order_and_a_kinds_later_answer_replaces_its_keys() {
    let mut s = State::new();
    let mut holds = Holds::default();
    for (agent, note) in [("acl", "one"), ("lb", "two"), ("acl", "three")] {
        let mut p = State::new();
        p.insert(keys::REASONS, Value::Array(vec![reason(agent)]));
        if agent == "acl" {
            p.insert("note", note);
        }
        p.insert(keys::EVENT_ID, "forged");
        merge(&mut s, p, agent, &mut holds).unwrap();
    }
    assert_eq!(
        s.get(keys::REASONS),
        Some(&Value::Array(vec![
            reason("acl"),
            reason("lb"),
            reason("acl")
        ]))
    );
    assert_eq!(s.get_str("note"), Some("three"));
    assert!(s.get(keys::EVENT_ID).is_none());
}

#[test]
fn the_dispatchers_keys_cannot_be_set_by_a_patch() {
    let mut s = State::new();
    s.insert(keys::CONNECTION_ID, "c1");
    s.insert(keys::DEGRADED, true);
    s.insert(keys::RUN_ID, "r1");
    let before = s.clone();
    let mut p = State::new();
    p.insert(keys::CONNECTION_ID, "forged");
    p.insert(keys::EVENT_ID, "forged");
    p.insert(keys::RUN_ID, "forged");
    p.insert(keys::DEGRADED, false);
    merge(&mut s, p, "a", &mut Holds::default()).unwrap();
    assert_eq!(s, before);
    let mut s = State::new();
    let mut p = State::new();
    p.insert(keys::DEGRADED, true);
    p.insert(keys::CONNECTION_ID, "forged");
    // A dry run's flag and timings are the dispatcher's too: an agent cannot make a real
    // decision look like a dry run, or forge the timings `policyctl explain` shows.
    p.insert(keys::DRY_RUN, true);
    p.insert(keys::AGENTS, Value::Array(Vec::new()));
    merge(&mut s, p, "a", &mut Holds::default()).unwrap();
    assert!(s.is_empty(), "{s:?}");
}

#[test]
fn malformed_patches_are_rejected_whole() {
    let mut s = State::new();
    s.set_strings(keys::DST_PEERS, &["a"]);
    let before = s.clone();
    let cases: Vec<(&str, Value)> = vec![
        (keys::ACTION, Value::from("maybe")),
        (keys::DST_PEERS, Value::from("a")),
        (keys::DST_PEERS, Value::Array(vec![Value::from(1)])),
        (keys::RATE_LIMIT, Value::from(10)),
        (keys::REASONS, Value::Array(vec![Value::from("x")])),
        (keys::TARGET_PEER, Value::from(7)),
    ];
    for (key, value) in cases {
        let mut p = State::new();
        p.insert("other", 1);
        p.insert(key, value);
        let err = merge(&mut s, p, "a", &mut Holds::default()).unwrap_err();
        assert!(
            matches!(&err, MergeError::Malformed { key: k, .. } if k == key),
            "{err}"
        );
        assert_eq!(s, before, "state changed by a rejected {key} patch");
    }
}

#[test]
fn a_key_belongs_to_the_kind_that_set_it_first() {
    let mut s = State::new();
    let mut holds = Holds::default();
    let mine = |holder: &str| {
        let mut p = State::new();
        p.insert(
            "conn_limit",
            Value::Map(vec![(Value::from("holder"), Value::from(holder))]),
        );
        p
    };
    merge(&mut s, mine("c1#r1"), "conn-limit", &mut holds).unwrap();
    // Another kind cannot point conn-limit's undo at someone else's slots ...
    let before = s.clone();
    let err = merge(&mut s, mine("victim#r9"), "rogue", &mut holds).unwrap_err();
    assert_eq!(
        err,
        MergeError::Owned {
            key: "conn_limit".into(),
            owner: "conn-limit".into()
        }
    );
    assert_eq!(s, before);
    // ... but may repeat it unchanged, and the kind itself may change it.
    merge(&mut s, mine("c1#r1"), "rogue", &mut holds).unwrap();
    merge(&mut s, mine("c1#r2"), "conn-limit", &mut holds).unwrap();
    assert_eq!(s, {
        let mut e = State::new();
        merge(&mut e, mine("c1#r2"), "x", &mut Holds::default()).unwrap();
        e
    });
}

#[test]
fn target_peer_is_fixed_once_an_answer_holds_something_for_it() {
    let target = |peer: &str| {
        let mut p = State::new();
        p.insert(keys::TARGET_PEER, peer);
        p
    };
    let holding = |peer: Option<&str>| {
        let mut p = State::new();
        p.insert(keys::HOLDS_TARGET, peer.map_or(Value::Nil, Value::from));
        p
    };
    let mut s = State::new();
    let mut holds = Holds::default();
    // Before anything holds, pickers may pick again.
    merge(&mut s, target("p1"), "lb", &mut holds).unwrap();
    merge(&mut s, target("p2"), "geo", &mut holds).unwrap();
    // A limiter that thinks the target is still p1 answered late: refused.
    assert!(merge(&mut s, holding(Some("p1")), "conn-limit", &mut holds).is_err());
    merge(&mut s, holding(Some("p2")), "conn-limit", &mut holds).unwrap();
    assert!(s.get(keys::HOLDS_TARGET).is_none(), "kept out of the state");
    let before = s.clone();
    let err = merge(&mut s, target("p3"), "rogue", &mut holds).unwrap_err();
    assert_eq!(
        err,
        MergeError::TargetHeld {
            holder: "conn-limit".into(),
            from: Some("p2".into()),
            to: "p3".into()
        }
    );
    assert_eq!(s, before);
    merge(&mut s, target("p2"), "rogue", &mut holds).unwrap();
    // Admitted for no peer in particular: none may be set afterwards either.
    let mut s = State::new();
    let mut holds = Holds::default();
    merge(&mut s, holding(None), "rate-limit", &mut holds).unwrap();
    assert!(merge(&mut s, target("p3"), "late-lb", &mut holds).is_err());
    assert!(s.get(keys::TARGET_PEER).is_none());
}

#[test]
fn reasons_name_the_kind_that_gave_them() {
    let mut s = State::new();
    let mut p = State::new();
    p.insert(
        keys::REASONS,
        Value::Array(vec![
            reason("conn-limit"),
            Value::Map(vec![(Value::from("policy"), Value::from("x"))]),
        ]),
    );
    merge(&mut s, p, "rogue", &mut Holds::default()).unwrap();
    let Some(Value::Array(reasons)) = s.get(keys::REASONS) else {
        panic!("{s:?}")
    };
    for r in reasons {
        assert_eq!(crate::state::field_str(r, "agent"), Some("rogue"), "{r:?}");
    }
}

proptest! {
    /// Whatever a sequence of agents answers, the candidates stay a subset of the offer, a deny
    /// stays a deny, and the rate limit is the minimum offered.
    #[test]
    fn merge_invariants(
        offer in proptest::collection::vec("[a-e]", 0..6),
        patches in proptest::collection::vec(
            (proptest::collection::vec("[a-g]", 0..6), any::<Option<bool>>(), any::<Option<u32>>()),
            0..6),
    ) {
        let mut s = State::new();
        s.set_strings(keys::DST_PEERS, &offer);
        let mut denied = false;
        let mut min_rate: Option<u64> = None;
        for (peers, action, rate) in patches {
            let mut p = State::new();
            p.set_strings(keys::DST_PEERS, &peers);
            if let Some(allow) = action {
                p.insert(keys::ACTION, if allow { "allow" } else { "deny" });
                denied |= !allow;
            }
            if let Some(r) = rate {
                let r = u64::from(r);
                p.insert(keys::RATE_LIMIT, Value::Map(vec![(Value::from("bits_per_second"), Value::from(r))]));
                min_rate = Some(min_rate.map_or(r, |m| m.min(r)));
            }
            let before: Vec<String> = strings(&s, keys::DST_PEERS);
            let flow = merge(&mut s, p, "a", &mut Holds::default()).unwrap();
            prop_assert_eq!(flow == Flow::Stop, action == Some(false));
            let after = strings(&s, keys::DST_PEERS);
            prop_assert!(after.iter().all(|x| before.contains(x) && offer.contains(x)));
            prop_assert!(after.len() <= before.len());
        }
        prop_assert_eq!(s.get_str(keys::ACTION) == Some("deny"), denied);
        prop_assert_eq!(s.get(keys::RATE_LIMIT).and_then(bits_per_second), min_rate);
    }
}
