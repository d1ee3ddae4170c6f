//! ClusterLink's other events, typed: a connection's status (bytes counted by the monitor,
//! slots released by conn-limit), remote services (imported or not by the ACL, counted by the
//! monitor), and malformed ones refused by field.

use std::net::TcpListener;

use bus::event::{
    ConnectionState, ConnectionStatus, PeerChange, RemoteService, CONNECTION_STATUS, PEER_ADDED,
    REMOTE_SERVICE_ADDED, REMOTE_SERVICE_REMOVED,
};
use bus::{Action, ClientError, State};
use e2e::Engine;
use serde_json::json;

use crate::monitor::{scrape, sum};
use crate::*;

#[tokio::test(flavor = "multi_thread")]
async fn statuses_remote_services_and_peers_are_decided_counted_and_checked() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut engine = Engine::new();
    engine.agent("monitor", &["--metrics-addr", &addr]);
    engine.start(&["acl", "lb", "conn-limit"]).await;
    engine.wait_instances("policy-agent-monitor", 1).await;
    let admin = engine.admin().await;
    let observe = |event: &str| {
        let mut s = sub(event, "monitor", 0);
        s.observe = true;
        s
    };
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "lb", 20),
            sub("new-connection", "conn-limit", 30),
            sub(CONNECTION_STATUS, "conn-limit", 10),
            sub(REMOTE_SERVICE_ADDED, "acl", 10),
            observe(REMOTE_SERVICE_REMOVED),
            observe(PEER_ADDED),
        ],
    )
    .await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "web-to-db", "action": "allow",
                "match": {"src_service": "web", "dst_service": "db"}})),
            doc(
                json!({"agent": "acl", "id": "import-from-partners", "action": "allow",
                "match": {"src_peer": "partner-*", "dst_service": "shop"}}),
            ),
            doc(
                json!({"agent": "conn-limit", "id": "db", "match": {"dst_service": "db"},
                "max_connections": 5}),
            ),
        ])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    eventually("web reaches db", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        let limited = effects(&d.reasons, "conn-limit") == [pair("db", "allow")];
        if d.action == Action::Allow && limited {
            Ok(())
        } else {
            Err(format!("{d:?}"))
        }
    })
    .await;
    let d = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Allow);
    let connection = d.connection_id.clone().expect("connection id");
    // Two reports, then the close: the monitor counts 300 in and 40 out, on db and p1.
    for (state, bytes_in, bytes_out) in [
        (ConnectionState::Open, 100, 10),
        (ConnectionState::Open, 250, 10),
        (ConnectionState::Closed, 300, 40),
    ] {
        let status = ConnectionStatus {
            connection_id: connection.clone(),
            state,
            bytes_in,
            bytes_out,
            started_ms: Some(1),
            updated_ms: Some(2),
            target_peer: None,
            src_service: None,
            dst_service: None,
        };
        let _: State = hook
            .decide(CONNECTION_STATUS, &status)
            .await
            .expect("status");
    }
    // Remote services: imported from partners only.
    let offer = |peer: &str| RemoteService {
        service: "shop".into(),
        peer: peer.into(),
        labels: None,
    };
    let from_partner: State = hook
        .decide(REMOTE_SERVICE_ADDED, &offer("partner-a"))
        .await
        .expect("decision");
    assert_eq!(
        from_partner.get_str("action"),
        Some("allow"),
        "{from_partner:?}"
    );
    let from_stranger: State = hook
        .decide(REMOTE_SERVICE_ADDED, &offer("stranger"))
        .await
        .expect("decision");
    assert_eq!(
        from_stranger.get_str("action"),
        Some("deny"),
        "{from_stranger:?}"
    );
    let _: State = hook
        .decide(REMOTE_SERVICE_REMOVED, &offer("partner-a"))
        .await
        .expect("acknowledged");
    let _: State = hook
        .decide(
            PEER_ADDED,
            &PeerChange {
                peer: "partner-b".into(),
                labels: None,
            },
        )
        .await
        .expect("acknowledged");

    // A status with a state the contract does not name: refused, naming the field.
    let bad = hook
        .decide::<_, State>(
            CONNECTION_STATUS,
            &json!({"connection_id": connection, "state": "half-open"}),
        )
        .await;
    match bad {
        Err(ClientError::Remote(e)) => {
            assert!(
                e.message.contains("state") && e.message.contains("half-open"),
                "{e:?}"
            )
        }
        other => panic!("a bad status: {other:?}"),
    }

    eventually("the monitor counted it all", || async {
        let s = scrape(&addr);
        let bytes = |direction: &str| {
            sum(
                &s,
                "policy_connection_bytes_total",
                &[("service", "db"), ("peer", "p1"), ("direction", direction)],
            )
        };
        let removed = sum(
            &s,
            "policy_decisions_total",
            &[("event", REMOTE_SERVICE_REMOVED)],
        );
        let offers = sum(
            &s,
            "policy_peer_decisions_total",
            &[
                ("event", REMOTE_SERVICE_ADDED),
                ("peer", "partner-a"),
                ("action", "allow"),
            ],
        );
        let joined = sum(&s, "policy_peer_decisions_total", &[("event", PEER_ADDED)]);
        let got = (bytes("in"), bytes("out"), removed, offers, joined);
        (got == (300.0, 40.0, 1.0, 1.0, 1.0))
            .then_some(())
            .ok_or(format!("{got:?}"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_peer_is_picked_by_no_dispatcher_until_it_is_added_again() {
    // On the secured bus, with two dispatchers and the verdict cache on: a consistent-hash
    // answer cached before the removal must not be served after it.
    let mut engine = Engine::secured();
    engine.dispatcher();
    engine.start(&["acl", "lb"]).await;
    engine.wait_instances("policy-dispatcher", 2).await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "lb", 20),
            sub(PEER_ADDED, "acl", 10),
            sub(bus::event::PEER_REMOVED, "acl", 10),
        ],
    )
    .await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "open", "action": "allow"})),
            doc(
                json!({"agent": "lb", "id": "sticky", "dst_service": "cache",
                "scheme": "consistent-hash", "hash_on": "src_service"}),
            ),
        ])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    let peers = ["p1", "p2", "p3"];
    let target = || async {
        let d = hook
            .new_connection(&conn("web", "cache", &peers))
            .await
            .expect("decision");
        assert_eq!(d.action, Action::Allow, "{d:?}");
        d.target_peer.expect("a target peer")
    };
    eventually("the sticky policy applies", || async {
        let d = hook
            .new_connection(&conn("web", "cache", &peers))
            .await
            .map_err(|e| e.to_string())?;
        (effects(&d.reasons, "lb") == [pair("sticky", "pick")])
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    let sticky = target().await;
    for _ in 0..10 {
        assert_eq!(target().await, sticky, "consistent hashing picks one peer");
    }
    let change = |peer: &str| PeerChange {
        peer: peer.into(),
        labels: None,
    };
    let _: State = hook
        .decide(bus::event::PEER_REMOVED, &change(&sticky))
        .await
        .expect("removal acknowledged");
    for i in 0..20 {
        let t = target().await;
        assert_ne!(t, sticky, "event {i}: the removed peer was picked");
    }
    let _: State = hook
        .decide(PEER_ADDED, &change(&sticky))
        .await
        .expect("addition acknowledged");
    for i in 0..10 {
        assert_eq!(target().await, sticky, "event {i}: the peer is back");
    }
}
