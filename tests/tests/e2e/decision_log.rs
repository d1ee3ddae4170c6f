//! The durable decision log: every decision kept in JetStream, read after the fact with
//! `policyctl log` and its filters, on the secured bus.

use bus::Action;
use e2e::Engine;
use serde_json::json;

use crate::*;

#[tokio::test(flavor = "multi_thread")]
async fn decisions_are_kept_and_policyctl_log_filters_them() {
    let mut engine = Engine::secured();
    engine.start(&["acl"]).await;
    let admin = engine.admin().await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "web-to-db", "action": "allow",
                "match": {"src_service": "web", "dst_service": "db"}})),
            doc(
                json!({"agent": "acl", "id": "batch-to-db", "action": "deny",
                "match": {"src_service": "batch", "dst_service": "db"}}),
            ),
        ])
        .await
        .expect("policies");
    subscribe(&admin, &[sub("new-connection", "acl", 10)]).await;
    let hook = engine.hook().await;
    eventually_allowed(&hook, "the acl policies apply").await;
    let (mut allowed, mut denied) = (1, 0);
    for i in 0..6 {
        let (src, dst) = match i % 3 {
            0 => ("web", "db"),
            1 => ("batch", "db"),
            _ => ("web", "cache"),
        };
        let d = hook
            .new_connection(&conn(src, dst, &["p1"]))
            .await
            .expect("decision");
        match d.action {
            Action::Allow => allowed += 1,
            Action::Deny => denied += 1,
        }
    }
    assert_eq!(
        denied, 4,
        "batch -> db and web -> cache (no rule) are denied"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let log = |args: &[&str]| {
        let mut all = vec!["log", "--since", "5m"];
        all.extend(args);
        policyctl(&engine, &all)
    };
    let records = |out: &str| -> Vec<serde_json::Value> {
        out.lines()
            .map(|l| serde_json::from_str(l).expect("a JSON record a line"))
            .collect()
    };

    let (code, out, err) = log(&["-o", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let all = records(&out);
    assert!(
        all.len() >= allowed + denied,
        "{} of {}",
        all.len(),
        allowed + denied
    );
    let (code, out, err) = log(&["--action", "deny", "--service", "db", "-o", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let batch = records(&out);
    assert_eq!(batch.len(), 2, "{out}");
    for r in &batch {
        assert_eq!(r["decision"]["action"], "deny");
        assert_eq!(r["attributes"]["src_service"], "batch");
        assert_eq!(r["decision"]["reasons"][0]["policy"], "batch-to-db");
    }
    // Human lines by default, each with its time.
    let (code, out, _) = log(&["--action", "deny", "--service", "db", "--agent", "acl"]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("Z  new-connection") && lines[0].contains("batch -> db"),
        "{out}"
    );
    let (code, out, _) = log(&["--agent", "lb", "-o", "json"]);
    assert_eq!(code, Some(0));
    assert!(out.is_empty(), "no lb was called: {out}");
    let (code, out, _) = log(&["--limit", "1", "-o", "json"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dispatcher_told_to_keep_no_log_keeps_none() {
    let mut engine = Engine::new();
    engine.spawn("policy-dispatcher", &["--no-decision-log"]);
    engine.agent("acl", &[]);
    engine
        .wait_instances(bus::headers::DISPATCHER_SERVICE, 1)
        .await;
    engine.wait_instances("policy-agent-acl", 1).await;
    let (code, _, err) = policyctl(&engine, &["log"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no decision log"), "{err}");
}
