//! ClusterLink's own documents, applied as written on the secured bus: the shipped
//! `examples/clusterlink` folder (YAML, a `kind: List` in JSON, standard input), ClusterLink's
//! decisions as its tiers are removed from the top, and a bad object that stores nothing.

use std::io::Write;
use std::process::Stdio;

use bus::Action;

use crate::*;

const FOLDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/clusterlink");

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
    let passed = test_cases_pass(&engine, &cases).await;
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

/// `kubectl get … | policyctl apply -f - --prune` removes the ClusterLink objects that are
/// gone and keeps hand-written policies; `--keep-going` stores the valid objects at once,
/// reports the refused ones, and keeps a refused object's stored version.
#[tokio::test(flavor = "multi_thread")]
async fn prune_is_scoped_to_the_source_and_keep_going_stores_the_rest() {
    let engine = every_kind_engine().await;
    let run = |args: &[&str]| policyctl(&engine, args);
    let (code, out, err) = run(&["apply", FOLDER]);
    assert_eq!(code, Some(0), "{out}{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    let mine = dir.path().join("mine.yaml");
    std::fs::write(
        &mine,
        "agent: acl\nid: mine\npriority: 50\naction: allow\nmatch: {dst_service: ops}\n",
    )
    .expect("write");
    let (code, _, err) = run(&["policy", "add", "-f", mine.to_str().expect("path")]);
    assert_eq!(code, Some(0), "{err}");

    let object = |kind: &str, ns: Option<&str>, name: &str, spec: &str| {
        let ns = ns.map(|n| format!(", namespace: {n}")).unwrap_or_default();
        format!("- apiVersion: clusterlink.net/v1alpha1\n  kind: {kind}\n  metadata: {{name: {name}{ns}}}\n  spec: {spec}\n")
    };
    let allow = "{action: allow, from: [{workloadSelector: {}}], to: [{workloadSelector: {}}]}";
    let with_sets = "{action: allow, from: [{workloadSets: [a]}], to: [{workloadSelector: {}}]}";
    let cluster =
        |items: &[String]| format!("apiVersion: v1\nkind: List\nitems:\n{}", items.concat());
    // The stored ids, one a line.
    let stored = || {
        let (_, out, _) = run(&["policy", "list", "--json"]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).expect("a JSON list");
        list.iter()
            .map(|d| {
                format!(
                    "{}/{}\n",
                    d["agent"].as_str().unwrap_or("?"),
                    d["id"].as_str().unwrap_or("?")
                )
            })
            .collect::<String>()
    };

    // The cluster without deny-metering and the Import: both go, `mine` stays.
    let now = cluster(&[
        object("PrivilegedAccessPolicy", None, "deny-private-workloads-to-metering-on-prod", "{action: deny, from: [{workloadSelector: {matchLabels: {classification: private, environment: prod}}}], to: [{workloadSelector: {matchLabels: {workloadName: global-metering-service, environment: prod}}}]}"),
        object("PrivilegedAccessPolicy", None, "allow-metering-on-prod", "{action: allow, from: [{workloadSelector: {}}], to: [{workloadSelector: {matchLabels: {workloadName: global-metering-service, environment: prod}}}]}"),
        object("AccessPolicy", Some("default"), "allow-named-workloads", "{action: allow, from: [{workloadSelector: {}}], to: [{workloadSelector: {matchExpressions: [{key: workloadName, operator: Exists}]}}]}"),
        object("AccessPolicy", Some("shop"), "web-to-eu-db", "{action: allow, from: [{workloadSelector: {matchLabels: {client.clusterlink.net/labels.app: web}}}], to: [{workloadSelector: {matchLabels: {export.clusterlink.net/name: db, peer.clusterlink.net/labels.region: eu}}}]}"),
    ]);
    let (code, out, err) = policyctl_stdin(&engine, &["apply", "-f", "-", "--prune"], &now);
    assert_eq!(code, Some(0), "{out}{err}");
    let removed: Vec<&str> = out.lines().filter(|l| l.starts_with("- ")).collect();
    assert_eq!(
        removed,
        [
            "- policy acl/cl-ap__default__deny-metering",
            "- policy lb/cl-import__shop__db"
        ],
        "{out}"
    );
    assert!(
        stored().contains("acl/mine\n"),
        "the hand-written policy stays"
    );

    // One object turned invalid, one new: without --keep-going nothing is stored.
    let next: Vec<String> = vec![
        object(
            "AccessPolicy",
            Some("default"),
            "allow-named-workloads",
            with_sets,
        ),
        object("AccessPolicy", Some("ops"), "allow-ops", allow),
    ];
    let before = stored();
    let (code, _, err) =
        policyctl_stdin(&engine, &["apply", "-f", "-", "--prune"], &cluster(&next));
    assert_ne!(code, Some(0));
    assert!(
        err.contains("AccessPolicy default/allow-named-workloads: spec.from[0].workloadSets"),
        "{err}"
    );
    assert_eq!(stored(), before, "nothing stored");
    // With it: the new one is stored, the refused one keeps its stored version, the rest of
    // ClusterLink's is pruned, and `mine` stays.
    let (code, out, err) = policyctl_stdin(
        &engine,
        &["apply", "-f", "-", "--prune", "--keep-going"],
        &cluster(&next),
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("skipped standard input: document 1, item 1: AccessPolicy default/allow-named-workloads"), "{out}");
    assert!(err.contains("1 documents skipped"), "{err}");
    let after = stored();
    for kept in [
        "cl-ap__default__allow-named-workloads",
        "cl-ap__ops__allow-ops",
        "acl/mine\n",
    ] {
        assert!(after.contains(kept), "{kept}: {after}");
    }
    for gone in ["cl-pap__", "cl-ap__shop__web-to-eu-db"] {
        assert!(!after.contains(gone), "{gone}: {after}");
    }
    // Hand-written documents applied with --keep-going, which skips some (exit status 1).
    let hand = dir.path().join("hand.yaml");
    let apply_hand = |text: &str| {
        std::fs::write(&hand, text).expect("write");
        let (code, out, err) = run(&["apply", hand.to_str().expect("path"), "--keep-going"]);
        assert_eq!(code, Some(1), "{out}{err}");
        out
    };
    // A document its kind refuses: skipped by file and position.
    let out = apply_hand(
        "agent: acl\nid: fine\naction: allow\n---\nagent: acl\nid: odd\naction: maybe\n",
    );
    assert!(
        out.contains("skipped ") && out.contains("hand.yaml: document 2 (acl/odd)"),
        "{out}"
    );
    assert!(out.contains("+ policy acl/fine"), "{out}");
    // An id given twice: every copy is skipped, and the stored one stays as it was.
    let out = apply_hand(
        "agent: acl\nid: fine\naction: deny\n---\nagent: acl\nid: fine\naction: deny\npriority: 3\n",
    );
    assert_eq!(out.matches("skipped ").count(), 2, "{out}");
    let list = stored_acl(&engine);
    let fine = list
        .iter()
        .find(|d| d["id"] == "fine")
        .expect("fine is stored");
    assert_eq!(fine["action"], "allow", "the stored version stays");
    // The cluster's last objects deleted: an empty list, pruned by the source named.
    let empty = "apiVersion: v1\nkind: List\nitems: []\n";
    let (code, _, err) = policyctl_stdin(&engine, &["apply", "-f", "-", "--prune"], empty);
    assert_ne!(
        code,
        Some(0),
        "--prune alone cannot tell whose documents to remove"
    );
    assert!(err.contains("--prune-source"), "{err}");
    let (code, out, err) = policyctl_stdin(
        &engine,
        &[
            "apply",
            "-f",
            "-",
            "--prune",
            "--prune-source",
            "clusterlink",
        ],
        empty,
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let left = stored();
    assert!(!left.contains("/cl-"), "{left}");
    for kept in ["acl/mine\n", "acl/fine\n"] {
        assert!(left.contains(kept), "{kept}: {left}");
    }
}

/// A cluster with more objects than one request holds: applied in parts (each validated
/// before any is stored, then each stored atomically), then pruned by source in one last step.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_larger_than_one_request_is_applied_in_parts_and_pruned_by_source() {
    let engine = every_kind_engine().await;
    let run = |args: &[&str]| policyctl(&engine, args);
    let dir = tempfile::tempdir().expect("tempdir");
    let mine = dir.path().join("mine.yaml");
    std::fs::write(&mine, "agent: acl\nid: mine\naction: allow\n").expect("write");
    let (code, _, err) = run(&["policy", "add", "-f", mine.to_str().expect("path")]);
    assert_eq!(code, Some(0), "{err}");
    let cluster = |names: std::ops::Range<usize>, bad: bool| {
        let mut items: Vec<String> = names
            .map(|i| format!("- {{apiVersion: clusterlink.net/v1alpha1, kind: AccessPolicy, metadata: {{name: p{i}, namespace: big}}, spec: {{action: allow, from: [{{workloadSelector: {{}}}}], to: [{{workloadSelector: {{matchLabels: {{n: \"{i}\"}}}}}}]}}}}\n"))
            .collect();
        if bad {
            items.push("- {apiVersion: clusterlink.net/v1alpha1, kind: AccessPolicy, metadata: {name: p0, namespace: big}, spec: {action: maybe, from: [], to: []}}\n".into());
        }
        format!("apiVersion: v1\nkind: List\nitems:\n{}", items.concat())
    };
    let count = || {
        let list = stored_acl(&engine);
        let ours = list
            .iter()
            .filter(|d| {
                d["id"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("cl-ap__big__"))
            })
            .count();
        (ours, list.iter().any(|d| d["id"] == "mine"))
    };
    let (code, out, err) = policyctl_stdin(
        &engine,
        &["apply", "-f", "-", "--prune"],
        &cluster(0..2400, false),
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(err.contains("stored part 3 of 3"), "{err}");
    assert!(out.contains("2400 added, 0 changed, 0 removed"), "{out}");
    assert_eq!(count(), (2400, true));
    // Half of it deleted from the cluster, and p0 turned invalid: with --keep-going the rest
    // is kept as given, the deleted half pruned, p0's stored version kept, `mine` untouched.
    let (code, out, err) = policyctl_stdin(
        &engine,
        &["apply", "-f", "-", "--prune", "--keep-going"],
        &cluster(1..1200, true),
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("skipped standard input: document 1, item 1200 (AccessPolicy big/p0)")
            || out.contains("AccessPolicy big/p0: spec.action"),
        "{out}{err}"
    );
    assert!(out.contains("0 added, 0 changed, 1200 removed"), "{out}");
    assert_eq!(count(), (1200, true), "p1..p1199 and p0's stored version");
    // Ten objects left: one request, but a prune of 1 190, more than one request changes, goes
    // in steps.
    let (code, out, err) = policyctl_stdin(
        &engine,
        &["apply", "-f", "-", "--prune"],
        &cluster(1..11, false),
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        // "in N steps, each one atomic batch", or on 2.10 "key by key, in N steps".
        out.contains("1190 removed") && out.contains(" steps"),
        "{out}"
    );
    assert_eq!(count(), (10, true));
}

/// The acl policies stored, as `policyctl policy list acl --json` prints them.
fn stored_acl(engine: &e2e::Engine) -> Vec<serde_json::Value> {
    let (_, out, _) = policyctl(engine, &["policy", "list", "acl", "--json"]);
    serde_json::from_str(&out).expect("a JSON list")
}
