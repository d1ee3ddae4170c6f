//! ClusterLink's own documents, applied as written on the secured bus: the shipped
//! `examples/clusterlink` folder (YAML, a `kind: List` in JSON, standard input), ClusterLink's
//! decisions as its tiers are removed from the top, and a bad object that stores nothing.

use std::io::Write;
use std::process::Stdio;

use bus::event::Labels;
use bus::Action;

use crate::*;

const FOLDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/clusterlink");

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `policyctl` with `input` on its standard input.
fn policyctl_stdin(
    engine: &e2e::Engine,
    args: &[&str],
    input: &str,
) -> (Option<i32>, String, String) {
    let mut child = engine
        .command("policyctl", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("policyctl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("policyctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn clusterlink_documents_apply_as_written_and_decide_as_clusterlink_decides() {
    let engine = every_kind_engine().await;
    let run = |args: &[&str]| policyctl(&engine, args);
    let (code, out, err) = run(&["apply", FOLDER]);
    assert_eq!(code, Some(0), "{out}{err}");
    for id in [
        "acl/cl-pap__deny-private-workloads-to-metering-on-prod",
        "acl/cl-pap__allow-metering-on-prod",
        "acl/cl-ap__default__deny-metering",
        "acl/cl-ap__default__allow-named-workloads",
        "acl/cl-ap__shop__web-to-eu-db",
        "lb/cl-import__shop__db",
    ] {
        assert!(out.contains(&format!("+ policy {id}")), "{id}: {out}");
    }
    // The same objects as `kubectl get -o yaml` prints them, on standard input: equal.
    let json = std::fs::read_to_string(format!("{FOLDER}/access-policies.json")).expect("read");
    let (code, out, err) = policyctl_stdin(&engine, &["diff", "-f", "-"], &json);
    // `diff` of part of the folder lists the rest as stored but not given, and nothing else.
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.lines()
            .all(|l| l.starts_with("- policy acl/cl-pap__")
                || l.starts_with("- policy lb/cl-import__")),
        "{out}"
    );

    // ClusterLink's decisions, as the shipped cases state them; the agents load the policies
    // a moment after they are stored.
    let cases = format!("{FOLDER}/tests/decisions.yaml");
    let mut passed = (None, String::new(), String::new());
    for _ in 0..50 {
        passed = run(&["test", &cases]);
        if passed.0 == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(passed.0, Some(0), "{}\n{}", passed.1, passed.2);
    assert!(passed.1.contains("10 cases: 10 passed"), "{}", passed.1);

    // The four layers, removed one by one from the top: each hands the decision down.
    let hook = engine.hook().await;
    let metering = || {
        let mut c = conn("reporter", "metering", &["p1"]);
        c.namespace = Some("default".into());
        c.src_labels = Some(labels(&[
            ("classification", "private"),
            ("environment", "prod"),
        ]));
        c.dst_labels = Some(labels(&[
            ("workloadName", "global-metering-service"),
            ("environment", "prod"),
        ]));
        c
    };
    let layers = [
        (
            "cl-pap__deny-private-workloads-to-metering-on-prod",
            Action::Deny,
            Some("PrivilegedAccessPolicy deny-private-workloads-to-metering-on-prod"),
        ),
        (
            "cl-pap__allow-metering-on-prod",
            Action::Allow,
            Some("PrivilegedAccessPolicy allow-metering-on-prod"),
        ),
        (
            "cl-ap__default__deny-metering",
            Action::Deny,
            Some("AccessPolicy default/deny-metering"),
        ),
        (
            "cl-ap__default__allow-named-workloads",
            Action::Allow,
            Some("AccessPolicy default/allow-named-workloads"),
        ),
        ("", Action::Deny, None),
    ];
    for (id, action, origin) in layers {
        eventually(&format!("decided by {origin:?}"), || async {
            let d = hook
                .new_connection(&metering())
                .await
                .map_err(|e| e.to_string())?;
            let decider = d.reasons.iter().find(|r| r.agent == "acl");
            let by = decider.map(|r| (r.origin.as_deref(), r.policy.as_str()));
            let want = (origin, origin.map_or("default", |_| id));
            (d.action == action && by == Some(want))
                .then_some(())
                .ok_or(format!("{d:?}"))
        })
        .await;
        if !id.is_empty() {
            let (code, _, err) = run(&["policy", "remove", "acl", id]);
            assert_eq!(code, Some(0), "{err}");
        }
    }

    // A list with one bad object among good ones: refused by name and field, nothing stored.
    let before = run(&["policy", "list", "acl", "--json"]).1;
    let bad = r#"
apiVersion: v1
kind: List
items:
- apiVersion: clusterlink.net/v1alpha1
  kind: AccessPolicy
  metadata: {name: fine, namespace: ops}
  spec: {action: allow, from: [{workloadSelector: {}}], to: [{workloadSelector: {}}]}
- apiVersion: clusterlink.net/v1alpha1
  kind: AccessPolicy
  metadata: {name: uses-sets, namespace: ops}
  spec: {action: deny, from: [{workloadSets: [frontends]}], to: [{workloadSelector: {}}]}
"#;
    let (code, out, err) = policyctl_stdin(&engine, &["apply", "-f", "-"], bad);
    assert_ne!(code, Some(0), "{out}");
    assert!(
        err.contains("standard input: document 1, item 2: AccessPolicy ops/uses-sets: ")
            && err.contains("spec.from[0].workloadSets"),
        "{err}"
    );
    assert_eq!(
        run(&["policy", "list", "acl", "--json"]).1,
        before,
        "nothing stored"
    );
}

/// Imports on the real engine: `static` fails over in the sources' order, and a
/// `peer-removed` moves it on until `peer-added`; round-robin keeps one counter per Import,
/// starting at the second source as ClusterLink's does; random picks only sources.
#[tokio::test(flavor = "multi_thread")]
async fn imports_pick_clusterlinks_way_and_a_removed_peer_moves_failover_on() {
    let engine = every_kind_engine().await;
    let (code, out, err) = policyctl(&engine, &["apply", FOLDER]);
    assert_eq!(code, Some(0), "{out}{err}");
    let more = r#"
apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata: {name: allow-cache, namespace: shop}
spec:
  action: allow
  from: [{workloadSelector: {}}]
  to: [{workloadSelector: {matchExpressions: [{key: export.clusterlink.net/name, operator: In, values: [cache, queue]}]}}]
---
apiVersion: clusterlink.net/v1alpha1
kind: Import
metadata: {name: cache, namespace: shop}
spec: {port: 6379, sources: [{peer: c1}, {peer: c2}, {peer: c3}]}
---
apiVersion: clusterlink.net/v1alpha1
kind: Import
metadata: {name: queue, namespace: shop}
spec: {port: 5672, lbScheme: random, sources: [{peer: q1}, {peer: q2}]}
"#;
    let (code, out, err) = policyctl_stdin(&engine, &["apply", "-f", "-"], more);
    assert_eq!(code, Some(0), "{out}{err}");
    let hook = engine.hook().await;
    let connect = |import: &str, peers: &[&str]| {
        let mut c = conn("web", &format!("shop/{import}"), peers);
        c.namespace = Some("shop".into());
        c.src_labels = Some(labels(&[("client.clusterlink.net/labels.app", "web")]));
        c.dst_labels = Some(labels(&[("export.clusterlink.net/name", import)]));
        c.peer_labels = Some(
            peers
                .iter()
                .map(|p| {
                    let region = if p.contains("us") { "us" } else { "eu" };
                    (
                        p.to_string(),
                        labels(&[("peer.clusterlink.net/labels.region", region)]),
                    )
                })
                .collect(),
        );
        c
    };
    let target = |import: &'static str, peers: &'static [&'static str]| {
        let (hook, c) = (hook.clone(), connect(import, peers));
        async move {
            let d = hook.new_connection(&c).await.map_err(|e| e.to_string())?;
            let lb = d.reasons.iter().find(|r| r.agent == "lb");
            match (
                d.action,
                &d.target_peer,
                lb.and_then(|r| r.origin.as_deref()),
            ) {
                (Action::Allow, Some(p), Some(o)) if o == format!("Import shop/{import}") => {
                    Ok(p.clone())
                }
                _ => Err(format!("{d:?}")),
            }
        }
    };
    const DB: &[&str] = &["peer-eu", "peer-eu-2", "peer-us"];
    eventually("the Import picks its first source", || async {
        (target("db", DB).await? == "peer-eu")
            .then_some(())
            .ok_or("not yet".into())
    })
    .await;
    let change = |peer: &str| bus::clusterlink::PeerChange {
        peer: peer.into(),
        labels: None,
    };
    let _: bus::State = hook
        .decide(bus::clusterlink::PEER_REMOVED, &change("peer-eu"))
        .await
        .expect("removal acknowledged");
    for i in 0..10 {
        assert_eq!(
            target("db", DB).await.as_deref(),
            Ok("peer-eu-2"),
            "event {i} after the removal"
        );
    }
    let _: bus::State = hook
        .decide(bus::clusterlink::PEER_ADDED, &change("peer-eu"))
        .await
        .expect("addition acknowledged");
    for i in 0..5 {
        assert_eq!(
            target("db", DB).await.as_deref(),
            Ok("peer-eu"),
            "event {i}: back"
        );
    }

    const CACHE: &[&str] = &["c1", "c2", "c3"];
    eventually("the cache Import applies", || async {
        target("cache", CACHE).await.map(|_| ())
    })
    .await;
    // Its counter moved once above; from here on it goes round, whatever other Imports do.
    let mut seq = Vec::new();
    for _ in 0..6 {
        seq.push(target("cache", CACHE).await.expect("picked"));
        let _ = target("queue", &["q1", "q2"]).await.expect("queue picked");
    }
    let start = CACHE.iter().position(|p| *p == seq[0]).expect("a source");
    let round: Vec<&str> = (0..6).map(|i| CACHE[(start + i) % 3]).collect();
    assert_eq!(seq, round, "one counter for the cache Import");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(target("queue", &["q1", "q2"]).await.expect("picked"));
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["q1", "q2"],
        "random over the sources"
    );
}
