use super::*;
use crate::codec;

fn doc(pairs: &[(&str, &str)]) -> Value {
    Value::Map(
        pairs
            .iter()
            .map(|(k, v)| (Value::from(*k), Value::from(*v)))
            .collect(),
    )
}

#[test]
fn policy_refs_are_read_and_checked() {
    let r = PolicyRef::of(&doc(&[("agent", "acl"), ("id", "r-1")])).unwrap();
    assert_eq!(
        r,
        PolicyRef {
            agent: "acl".into(),
            id: "r-1".into()
        }
    );
    assert!(PolicyRef::of(&doc(&[("agent", "acl")]))
        .unwrap_err()
        .contains("`id`"));
    assert!(PolicyRef::of(&doc(&[("agent", "acl"), ("id", "a.b")]))
        .unwrap_err()
        .contains("`id`"));
    assert!(PolicyRef::of(&doc(&[("agent", "A C L"), ("id", "x")]))
        .unwrap_err()
        .contains("`agent`"));
    assert!(PolicyRef::of(&Value::from(1)).is_err());
}

#[test]
fn subscriptions_default_and_validate() {
    let mut m = std::collections::BTreeMap::new();
    m.insert("event", Value::from("new-connection"));
    m.insert("agent", Value::from("acl"));
    m.insert("priority", Value::from(10));
    let s: Subscription = codec::decode("s", &codec::encode("s", &m).unwrap()).unwrap();
    assert_eq!(s.timeout_ms, DEFAULT_TIMEOUT_MS);
    assert_eq!(s.failure, FailureMode::Closed);
    assert!(!s.observe);
    assert!(s.validate().is_ok());
    let bad = Subscription {
        timeout_ms: 0,
        ..s.clone()
    };
    assert!(bad.validate().unwrap_err().contains("timeout"));
    let bad = Subscription {
        agent: "Nope".into(),
        ..s
    };
    assert!(bad.validate().is_err());
}

#[test]
fn unknown_argument_fields_are_refused() {
    let mut m = std::collections::BTreeMap::new();
    m.insert("event", Value::from("new-connection"));
    m.insert("agent", Value::from("acl"));
    m.insert("priority", Value::from(10));
    m.insert("timout_ms", Value::from(100));
    let bytes = codec::encode("s", &m).unwrap();
    let err = codec::decode::<Subscribe>("s", &bytes).unwrap_err();
    assert!(err.to_string().contains("timout_ms"), "{err}");
    assert!(codec::decode::<Subscription>("s", &bytes).is_err());
    m.remove("timout_ms");
    m.insert("force", Value::from(true));
    let args: Subscribe = codec::decode("s", &codec::encode("s", &m).unwrap()).unwrap();
    assert!(args.force);
    let stored = codec::encode("s", &args.subscription()).unwrap();
    let back: Subscription = codec::decode("s", &stored).unwrap();
    assert_eq!(Subscribe::new(back, true), args);
}
