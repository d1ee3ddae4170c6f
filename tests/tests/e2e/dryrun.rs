//! Dry runs (`Policy-Dry-Run: true`): the engine answers what it would decide and changes
//! nothing; `policyctl explain` and `policyctl test` ask that way.

use std::time::Duration;

use bus::state::keys;
use bus::Action;
use e2e::Engine;
use futures::StreamExt;
use serde_json::json;

use crate::slots::slots_held;
use crate::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_takes_no_slot_spends_no_token_and_records_nothing() {
    let mut engine = Engine::new();
    engine.start(&["acl", "conn-limit", "rate-limit"]).await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "conn-limit", 30),
            sub("new-connection", "rate-limit", 30),
            sub("connection-closed", "conn-limit", 10),
        ],
    )
    .await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "open", "action": "allow"})),
            doc(
                json!({"agent": "conn-limit", "id": "one", "match": {"dst_service": "db"},
                "max_connections": 1}),
            ),
            doc(
                json!({"agent": "rate-limit", "id": "slow", "match": {"dst_service": "db"},
                "rate": "1/h"}),
            ),
        ])
        .await
        .expect("policy add");
    let mut tap = engine
        .client()
        .await
        .subscribe("policy.tap.new-connection")
        .await
        .expect("tap");
    let dry = engine.hook().await.with_dry_run(true);
    // One slot and one token an hour: real events would be refused from the second on.
    eventually("the limits apply", || async {
        let d = dry
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        (effects(&d.reasons, "conn-limit") == [pair("one", "allow")])
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    for i in 0..5 {
        let d = dry
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .expect("decision");
        assert_eq!(d.action, Action::Allow, "dry run {i}: {d:?}");
        assert!(d.dry_run, "{d:?}");
        let agents = format!("{:?}", d.extra.get(keys::AGENTS));
        assert!(
            agents.contains("conn-limit") && agents.contains("latency_us"),
            "{agents}"
        );
    }
    assert!(
        slots_held(&engine).await.is_empty(),
        "a dry run took a slot"
    );
    let tapped = tokio::time::timeout(Duration::from_millis(300), tap.next()).await;
    assert!(tapped.is_err(), "a dry run was tapped: {tapped:?}");

    // A real one takes the slot and the hour's token; a dry run then says what a real one
    // would meet, and a dry close frees nothing.
    let real = engine
        .hook()
        .await
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(real.action, Action::Allow, "{real:?}");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), tap.next())
            .await
            .is_ok(),
        "tapped"
    );
    let d = dry
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Deny, "{d:?}");
    let close = bus::event::ConnectionClosed {
        connection_id: real.connection_id.clone().expect("connection id"),
        src_service: "web".into(),
        dst_service: "db".into(),
        target_peer: None,
    };
    dry.connection_closed(&close)
        .await
        .expect("a dry close is acknowledged");
    assert_eq!(
        slots_held(&engine).await.len(),
        1,
        "a dry close freed the slot"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn policyctl_test_and_explain_check_the_shipped_examples_without_changing_anything() {
    // On the secured bus: they run as the gateway, with its permissions.
    let engine = every_kind_engine().await;
    let load = engine
        .command("policyctl", &["load", EXAMPLES])
        .output()
        .expect("policyctl load");
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    let cases = format!("{}/tests/examples.yaml", EXAMPLES);
    let run = |args: &[&str]| policyctl(&engine, args);
    // The agents load the policies a moment after they are stored.
    let passed = test_cases_pass(&engine, &cases).await;
    assert_eq!(passed.0, Some(0), "{}\n{}", passed.1, passed.2);
    assert!(
        passed.1.contains("7 cases: 7 passed, 0 failed"),
        "{}",
        passed.1
    );
    // Twice in a row, as the cases on cache (one connection per 5 s) show: nothing was spent.
    assert_eq!(run(&["test", &cases]).0, Some(0));
    assert!(
        slots_held(&engine).await.is_empty(),
        "policyctl test took slots"
    );

    let dir = std::env::temp_dir().join(format!("policyctl-cases-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let wrong = dir.join("wrong.yaml");
    std::fs::write(
        &wrong,
        "- name: billing is open\n  attributes: {src_service: batch, dst_service: billing, \
         direction: outgoing, dst_peers: [peer-a]}\n  expect: {action: allow}\n",
    )
    .expect("write");
    let (code, out, _) = run(&["test", wrong.to_str().expect("path")]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL") && out.contains("action: expected \"allow\", got \"deny\""),
        "{out}"
    );
    let broken = dir.join("broken.yaml");
    std::fs::write(
        &broken,
        "- name: x\n  expect: {action: allow}\n  atributes: {}\n",
    )
    .expect("write");
    let (code, _, err) = run(&["test", broken.to_str().expect("path")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("atributes"), "{err}");

    let (code, out, err) = run(&[
        "explain",
        "new-connection",
        "src_service=web-1",
        "dst_service=db",
        "direction=outgoing",
        "src_peer=local",
        "dst_peers=[peer-a,peer-b]",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("decided by: acl web-to-db: allow"), "{out}");
    assert!(
        out.contains("db-max-10: allow (dry run: would take a slot"),
        "{out}"
    );
    assert!(
        slots_held(&engine).await.is_empty(),
        "policyctl explain took a slot"
    );
}
