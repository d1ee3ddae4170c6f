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
    ] {
        assert!(out.contains(&format!("+ policy {id}")), "{id}: {out}");
    }
    // The same objects as `kubectl get -o yaml` prints them, on standard input: equal.
    let json = std::fs::read_to_string(format!("{FOLDER}/access-policies.json")).expect("read");
    let (code, out, err) = policyctl_stdin(&engine, &["diff", "-f", "-"], &json);
    // `diff` of part of the folder lists the rest as stored but not given, and nothing else.
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.lines().all(|l| l.starts_with("- policy acl/cl-pap__")),
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
    assert!(passed.1.contains("9 cases: 9 passed"), "{}", passed.1);

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
