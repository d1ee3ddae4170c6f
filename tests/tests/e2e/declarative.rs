//! `policyctl diff` and `policyctl export` against a live engine, on the secured bus: exit 0
//! when the folder equals the store, 1 when it differs, 2 on an error.

use crate::*;

#[tokio::test(flavor = "multi_thread")]
async fn diff_and_export_round_trip_the_stored_configuration() {
    let engine = every_kind_engine().await;
    let examples = EXAMPLES;
    let run = |args: &[&str]| policyctl(&engine, args);
    let (code, out, err) = run(&["diff", examples]);
    assert_eq!(code, Some(1), "nothing stored yet: {out}{err}");
    assert!(out.contains("+ policy acl/web-to-db"), "{out}");
    let (code, _, err) = run(&["load", examples]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = run(&["diff", examples]);
    assert_eq!(code, Some(0), "loaded, so equal: {out}{err}");
    // Adding the same documents again writes nothing, and says so.
    let acl = format!("{examples}/acl.yaml");
    let (code, out, err) = run(&["policy", "add", "-f", &acl]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.lines().all(|l| l.starts_with("unchanged acl/")),
        "{out}"
    );
    assert!(out.contains("unchanged acl/web-to-db"), "{out}");

    let dir = std::env::temp_dir().join(format!("policy-export-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().expect("path");
    let (code, out, err) = run(&["export", d]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("exported"), "{out}");
    assert_eq!(
        run(&["diff", d]).0,
        Some(0),
        "an export is equal to the store"
    );

    // A changed limit and a removed document: `~` and `-`, exit 1.
    let policies = dir.join("policies.yaml");
    let text = std::fs::read_to_string(&policies).expect("read");
    let changed = text.replace("max_connections: 10\n", "max_connections: 11\n");
    assert_ne!(changed, text, "the example's limit is in the export");
    let without_first = changed
        .split_once("---\n")
        .map(|(_, rest)| rest.to_string())
        .expect("several documents");
    std::fs::write(&policies, without_first).expect("write");
    let (code, out, _) = run(&["diff", d]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("~ policy conn-limit/db-max-10"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("- policy ")), "{out}");
    let (code, _, err) = run(&["diff", "/nonexistent/policy-bus"]);
    assert_eq!(code, Some(2), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
