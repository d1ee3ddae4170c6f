//! `policyctl apply`, `diff`, `export` and `status` against a live engine, on the secured bus:
//! `diff` exits 0 when the folder equals the store, 1 when it differs, 2 on an error; `apply`
//! stores all of a folder or nothing.

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

/// The configuration revision `policyctl status --json` reports.
fn revision(engine: &e2e::Engine) -> (u64, serde_json::Value) {
    let (code, out, err) = policyctl(engine, &["status", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    (status["revision"].as_u64().expect("revision"), status)
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_validates_everything_then_stores_it_in_one_step_and_prunes_on_request() {
    let engine = every_kind_engine().await;
    let run = |args: &[&str]| policyctl(&engine, args);
    let (r0, status) = revision(&engine);
    // On 2.12+ the dispatcher creates the config bucket for atomic batches.
    let atomic = e2e::nats_server_version() >= (2, 12);
    assert_eq!(status["atomic_apply"], atomic, "{status}");
    let how = if atomic {
        "(in one atomic batch)"
    } else {
        "(key by key)"
    };

    let (code, out, err) = run(&["apply", EXAMPLES]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("+ subscription new-connection/acl"), "{out}");
    assert!(out.contains("+ policy acl/web-to-db"), "{out}");
    assert!(out.contains(how), "{out}");
    let (r1, _) = revision(&engine);
    assert!(r1 > r0, "every change bumps the revision: {r0} -> {r1}");
    assert_eq!(run(&["diff", EXAMPLES]).0, Some(0));

    // A folder with one invalid document among changes: nothing is stored.
    let dir = tempfile::tempdir().expect("tempdir");
    for f in [
        "subscriptions.yaml",
        "acl.yaml",
        "conn-limit.yaml",
        "rate-limit.yaml",
    ] {
        std::fs::copy(format!("{EXAMPLES}/{f}"), dir.path().join(f)).expect("copy");
    }
    let limits = dir.path().join("conn-limit.yaml");
    let text = std::fs::read_to_string(&limits).expect("read");
    let changed = text.replace("max_connections: 10\n", "max_connections: 11\n");
    assert_ne!(changed, text, "the example has the limit");
    std::fs::write(&limits, &changed).expect("write");
    let broken = dir.path().join("zz-broken.yaml");
    std::fs::write(&broken, "agent: acl\nid: broken\naction: maybe\n").expect("write");
    let d = dir.path().to_str().expect("path");
    let (code, out, err) = run(&["apply", d, "--prune"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("zz-broken.yaml: document 1 (acl/broken)")
            && err.contains("nothing was stored"),
        "{err}"
    );
    assert_eq!(revision(&engine).0, r1, "a refused apply changes nothing");
    assert_eq!(run(&["diff", EXAMPLES]).0, Some(0));
    std::fs::remove_file(&broken).expect("rm");

    // A dry run plans the change and the removals, and stores nothing.
    let (code, out, err) = run(&["apply", d, "--prune", "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("~ policy conn-limit/db-max-10"), "{out}");
    assert!(out.contains("- policy lb/db-round-robin"), "{out}");
    assert!(
        out.contains("dry run:") && out.contains("nothing stored"),
        "{out}"
    );
    assert_eq!(revision(&engine).0, r1);
    // Without --prune the lb policies are kept, and said to be.
    let (code, out, err) = run(&["apply", d]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("1 changed, 0 removed"), "{out}");
    assert!(out.contains("kept 3 stored but not given"), "{out}");
    let (code, out, err) = run(&["apply", d, "--prune"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("0 added, 0 changed, 3 removed"), "{out}");
    assert_eq!(run(&["diff", d]).0, Some(0), "the store equals the folder");
    // No lb policy is left: listing the kind says so, with exit status 1.
    let (code, out, err) = run(&["policy", "list", "lb"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(err.contains("no policies of agent kind `lb`"), "{err}");
    let (code, _, err) = run(&["policy", "list", "acll"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("(did you mean `acl`?)"), "{err}");

    // `policy list --json` applies back, and with --prune removes no subscription: the file
    // has no subscriptions section.
    let listing = dir.path().join("listing.json");
    let (code, out, _) = run(&["policy", "list", "--json"]);
    assert_eq!(code, Some(0));
    std::fs::write(&listing, out).expect("write");
    let (_, before) = revision(&engine);
    let (code, out, err) = run(&["apply", listing.to_str().expect("path"), "--prune"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("0 added, 0 changed, 0 removed"), "{out}");
    let (_, after) = revision(&engine);
    assert_eq!(before, after, "an apply with no change stores nothing");
    // So does `-o yaml`.
    let (code, out, _) = run(&["policy", "list", "-o", "yaml"]);
    assert_eq!(code, Some(0));
    let yaml = dir.path().join("listing.yaml");
    std::fs::write(&yaml, out).expect("write");
    let (code, out, err) = run(&["apply", yaml.to_str().expect("path")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("0 added, 0 changed, 0 removed"), "{out}");
    assert_eq!(after["subscriptions"], before["subscriptions"]);
}

/// The atomic batch itself: a batch with one stale revision stores none of its writes. On the
/// secured bus, as the dispatcher's store identity: the batch crosses into the config's
/// account through the import, as `apply`'s does.
#[tokio::test(flavor = "multi_thread")]
async fn an_atomic_batch_with_one_stale_revision_stores_nothing() {
    use bus::batch::{write_atomic, Write};
    let engine = e2e::Engine::secured();
    let nats = engine
        .watched_store_client(&bus::roles::Role::Dispatcher)
        .await
        .0;
    let subjects = bus::Subjects::new("policy").expect("prefix");
    let opening = bus::config::Opening {
        replicas: 1,
        access: bus::config::Access::Owner,
        fleet_hub: None,
    };
    let store = bus::config::open_waiting(&nats, &subjects, opening)
        .await
        .expect("config bucket");
    let jet = bus::store::Jet::reach(&nats, &subjects, bus::store::Store::Config)
        .await
        .expect("reach the config");
    if e2e::nats_server_version() < (2, 12) {
        assert!(
            !bus::batch::atomic(&store),
            "2.10 and 2.11 take no atomic batch"
        );
        return;
    }
    assert!(bus::batch::atomic(&store));
    let first = store.put("pol.acl.a", "one".into()).await.expect("put");
    let write = |key: &str, value: Option<&'static str>, expected_revision| Write {
        key: key.into(),
        value: value.map(|v: &'static str| bytes::Bytes::from_static(v.as_bytes())),
        expected_revision,
    };
    let stale = [
        write("pol.acl.b", Some("new"), 0),
        write("pol.acl.a", Some("two"), first + 7),
    ];
    let err = write_atomic(&jet, &store, &stale).await.unwrap_err();
    assert!(err.to_string().contains("stored none"), "{err}");
    assert!(
        store.get("pol.acl.b").await.expect("get").is_none(),
        "nothing of the batch"
    );
    let good = [
        write("pol.acl.b", Some("new"), 0),
        write("pol.acl.a", None, first),
    ];
    let revision = write_atomic(&jet, &store, &good).await.expect("batch");
    assert_eq!(revision, first + 2);
    assert_eq!(
        store.get("pol.acl.b").await.expect("get").as_deref(),
        Some(&b"new"[..])
    );
    assert!(
        store.get("pol.acl.a").await.expect("get").is_none(),
        "deleted in the batch"
    );
}
