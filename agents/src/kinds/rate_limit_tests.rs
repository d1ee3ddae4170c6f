use bus::event::{Direction, NewConnection};
use bus::Value;

use super::*;
use crate::kind::parse_policy;

/// A fleet policy's reason says it is the fleet's (see `bus::fleet`), a site's does not.
#[tokio::test]
async fn a_fleet_limits_reason_says_it_is_the_fleets() {
    let limiter = RateLimiter::default();
    let doc = |id: &str| {
        let v = serde_json::json!({"agent": "rate-limit", "id": id, "bandwidth": "10Mbit/s"});
        parse_policy(&limiter, &rmp_serde::to_vec_named(&v).expect("encode")).expect("policy")
    };
    let mut fleet = Stored::site("fleet-cap", doc("fleet-cap"));
    fleet.level = bus::fleet::Level::Fleet;
    let rules = limiter.compile(vec![fleet, Stored::site("site-cap", doc("site-cap"))]);
    let event = Event::NewConnection(NewConnection {
        src_service: "web".into(),
        dst_service: "db".into(),
        direction: Direction::Outgoing,
        src_peer: None,
        dst_peers: None,
        connection_id: None,
        src_labels: None,
        dst_labels: None,
        peer_labels: None,
        namespace: None,
    });
    let state = event.initial_state();
    let patch = limiter
        .decide_async(&rules, &event, &state)
        .await
        .expect("a decision");
    let Some(Value::Array(reasons)) = patch.get(keys::REASONS) else {
        panic!("reasons: {patch:?}");
    };
    let level_of = |id: &str| {
        reasons.iter().find_map(|r| {
            let m = r.as_map()?;
            let get = |k: &str| {
                m.iter()
                    .find(|(kk, _)| kk.as_str() == Some(k))
                    .map(|(_, v)| v)
            };
            (get("policy")?.as_str() == Some(id)).then(|| get("level").and_then(Value::as_str))
        })
    };
    assert_eq!(level_of("fleet-cap"), Some(Some("fleet")), "{reasons:?}");
    assert_eq!(level_of("site-cap"), Some(None), "{reasons:?}");
}
