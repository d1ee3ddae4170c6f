//! The monitor's live page in a real browser: Debian's chromium, headless, loads `/` from a
//! live engine and renders the decisions the engine made.

use e2e::Engine;
use serde_json::json;

use crate::*;

/// Chromium's rendering of `url` after its scripts ran for a few (virtual) seconds.
fn rendered(url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = std::process::Command::new(e2e::tool("chromium"))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .output()
        .expect("chromium");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_page_shows_the_decisions_in_a_real_browser() {
    let addr = format!("127.0.0.1:{}", e2e::free_port());
    let mut engine = Engine::new();
    engine.agent("monitor", &["--metrics-addr", &addr]);
    engine.start(&["acl"]).await;
    engine.wait_instances("policy-agent-monitor", 1).await;
    let admin = engine.admin().await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "web-to-db", "action": "allow",
            "match": {"src_service": "web", "dst_service": "db"}}),
        )])
        .await
        .expect("policy");
    subscribe(&admin, &[sub("new-connection", "acl", 10)]).await;
    let hook = engine.hook().await;
    eventually_allowed(&hook, "the acl policy applies").await;
    for _ in 0..3 {
        hook.new_connection(&conn("web", "db", &["p1"]))
            .await
            .expect("decision");
        hook.new_connection(&conn("batch", "ledger", &["p1"]))
            .await
            .expect("decision");
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let dom = rendered(&format!("http://{addr}/"));
    let rows = dom.matches("<tr class=\"decision\">").count();
    assert!(rows >= 7, "{rows} decision rows in:\n{dom}");
    assert!(
        dom.contains("acl/web-to-db allow"),
        "the reason that decided: {dom}"
    );
    assert!(
        dom.contains("class=\"deny\">deny<"),
        "a denied decision: {dom}"
    );
    assert!(dom.contains("ledger"), "the denied service: {dom}");
    assert!(dom.contains("live, refreshed every second"), "{dom}");
}
