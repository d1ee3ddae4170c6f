//! Every process's `--metrics-addr`: `/metrics` in the format the scraper asks for, clean to
//! promtool's eye; `/healthz` and `/readyz`; a degraded decision counted as degraded.

use std::io::{Read, Write};
use std::time::Duration;

use e2e::Engine;
use serde_json::json;

use crate::monitor::{scrape, sum};
use crate::*;

fn free_addr() -> String {
    format!("127.0.0.1:{}", e2e::free_port())
}

/// One GET: the status line, the content type and the body.
fn get(addr: &str, path: &str, accept: &str) -> (String, String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nAccept: {accept}\r\n\r\n"
    )
    .expect("request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("response");
    let (head, body) = resp.split_once("\r\n\r\n").expect("http response");
    let status = head.lines().next().unwrap_or_default().to_string();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or_default()
        .to_string();
    (status, content_type, body.to_string())
}

/// `promtool check metrics` on an exposition: its exit status and what it said.
fn promtool(exposition: &str) -> (bool, String) {
    let mut child = std::process::Command::new(e2e::tool("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect(
            "promtool not found: scripts/install-tools installs it (Debian package prometheus)",
        );
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_process_serves_metrics_promtool_accepts_and_health_and_readiness() {
    let (d, a, w, m) = (free_addr(), free_addr(), free_addr(), free_addr());
    let mut engine = Engine::new();
    engine.spawn("policy-dispatcher", &["--metrics-addr", &d]);
    engine.agent("acl", &["--metrics-addr", &a]);
    engine.agent("wasm", &["--metrics-addr", &w]);
    engine.agent("monitor", &["--metrics-addr", &m]);
    engine
        .wait_instances(bus::headers::DISPATCHER_SERVICE, 1)
        .await;
    engine.wait_instances("policy-agent-acl", 1).await;
    engine
        .wait_instances(bus::headers::WASM_HOST_SERVICE, 1)
        .await;
    engine.wait_instances("policy-agent-monitor", 1).await;
    let admin = engine.admin().await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "open", "action": "allow"}),
        )])
        .await
        .expect("policy");
    // A kind nobody runs, failing open: every decision is allowed, degraded.
    let mut ghost = sub("new-connection", "ghost", 20);
    ghost.failure = bus::admin::FailureMode::Open;
    ghost.timeout_ms = 200;
    admin
        .subscribe_with(&bus::admin::Subscribe::new(ghost, true))
        .await
        .expect("subscribe ghost");
    subscribe(&admin, &[sub("new-connection", "acl", 10)]).await;
    let hook = engine.hook().await;
    for _ in 0..5 {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .expect("decision");
        assert!(d.degraded, "{d:?}");
    }
    // And one the dispatcher refuses: not MessagePack.
    let raw = engine.client().await;
    let refused = raw
        .request(
            engine.subjects().event("new-connection"),
            "not msgpack".into(),
        )
        .await
        .expect("an error reply");
    assert!(refused.headers.is_some(), "an error reply carries its code");
    tokio::time::sleep(Duration::from_millis(300)).await;

    for (process, addr) in [
        ("dispatcher", &d),
        ("acl", &a),
        ("wasm host", &w),
        ("monitor", &m),
    ] {
        let (status, _, body) = get(addr, "/healthz", "*/*");
        assert!(
            status.contains("200"),
            "{process} /healthz: {status} {body}"
        );
        let (status, _, body) = get(addr, "/readyz", "*/*");
        assert!(status.contains("200"), "{process} /readyz: {status} {body}");
        // The classic text format, as promtool and older scrapers ask for it.
        let (status, ty, text) = get(addr, "/metrics", "text/plain;version=0.0.4");
        assert!(status.contains("200"), "{process}: {status}");
        assert!(
            ty.starts_with("text/plain; version=0.0.4"),
            "{process}: {ty}"
        );
        let (clean, said) = promtool(&text);
        assert!(clean, "{process}: promtool check metrics: {said}\n{text}");
        assert!(text.contains("policy_build_info{"), "{process}: {text}");
        // OpenMetrics, as Prometheus asks first.
        let (_, ty, om) = get(
            addr,
            "/metrics",
            "application/openmetrics-text;version=1.0.0",
        );
        assert!(
            ty.starts_with("application/openmetrics-text"),
            "{process}: {ty}"
        );
        assert!(om.trim_end().ends_with("# EOF"), "{process}");
    }
    // Five events, all degraded; a hookpoint's hedged copy may make a sixth decision (the
    // engine's at-least-once hedging), which the monitor then counts too.
    let dispatcher = scrape(&d);
    let decisions = |result: &str| {
        let labels = [("event", "new-connection"), ("result", result)];
        sum(&dispatcher, "policy_dispatcher_decisions_total", &labels)
    };
    assert!(decisions("degraded") >= 5.0, "{}", decisions("degraded"));
    assert_eq!(
        decisions("allow"),
        0.0,
        "a degraded decision is not a plain allow"
    );
    assert_eq!(decisions("deny"), 0.0);
    let ghost = [("agent", "ghost"), ("outcome", "no-responders")];
    let ghost_calls = sum(&dispatcher, "policy_dispatcher_agent_calls_total", &ghost);
    assert_eq!(ghost_calls, decisions("degraded"));
    let bad = [("code", "bad-request")];
    assert_eq!(
        sum(&dispatcher, "policy_dispatcher_refused_total", &bad),
        1.0
    );
    assert!(sum(&dispatcher, "policy_config_revision", &[]) > 0.0);
    assert_eq!(
        sum(&dispatcher, "policy_dispatcher_subscriptions", &[]),
        2.0
    );
    let acl = scrape(&a);
    assert_eq!(sum(&acl, "policy_agent_policies", &[("kind", "acl")]), 1.0);
    let decided = [("kind", "acl"), ("op", "decide"), ("outcome", "ok")];
    assert!(sum(&acl, "policy_agent_requests_total", &decided) >= 1.0);
    // Every metric the shipped alerts and dashboard use is one some process serves.
    let mut served: std::collections::HashSet<String> = std::collections::HashSet::new();
    for addr in [&d, &a, &w, &m] {
        // The families (`# TYPE`), so that one with no sample yet counts too.
        let (_, _, text) = get(addr, "/metrics", "text/plain;version=0.0.4");
        served.extend(text.lines().filter_map(|l| {
            let name = l.strip_prefix("# TYPE ")?.split_whitespace().next()?;
            Some(name.to_string())
        }));
    }
    for file in [
        "deploy/prometheus/alerts.yaml",
        "deploy/grafana/policy-bus.json",
    ] {
        for name in metric_names(file) {
            let known = [name.clone(), format!("{name}_bucket")]
                .iter()
                .any(|n| served.contains(n));
            assert!(known, "{file} uses {name}, which no process serves");
        }
    }
    let monitor = scrape(&m);
    let seen = sum(
        &monitor,
        "policy_decisions_total",
        &[("event", "new-connection")],
    );
    assert_eq!(
        seen,
        decisions("degraded"),
        "the monitor counts what the dispatcher decided"
    );

    // What the containers' healthchecks run.
    let probe = |path: &str| {
        let (code, _, err) = policyctl(&engine, &["probe", &format!("http://{d}{path}")]);
        (code, err)
    };
    assert_eq!(probe("/readyz").0, Some(0));
    let (code, err) = probe("/nope");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("404"), "{err}");
    let (status, _, _) = get(&a, "/nope", "*/*");
    assert!(status.contains("404"), "{status}");
}

/// The `policy_*` metric names a shipped file mentions (histogram suffixes cut).
fn metric_names(file: &str) -> std::collections::BTreeSet<String> {
    let path = format!("{}/../{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("policy_") {
        let word: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + word.len()..];
        let name = word.strip_suffix("_bucket").unwrap_or(&word).to_string();
        names.insert(name);
    }
    assert!(!names.is_empty(), "{file} uses no policy metric");
    names
}

/// The shipped alerting rules load, and each fires on the series it is for (promtool's own
/// rule unit tests, `deploy/prometheus/alerts_test.yaml`).
#[test]
fn the_alert_rules_check_and_fire_on_what_they_are_for() {
    let dir = format!("{}/../deploy/prometheus", env!("CARGO_MANIFEST_DIR"));
    for args in [
        ["check", "rules", "alerts.yaml"],
        ["test", "rules", "alerts_test.yaml"],
    ] {
        let out = std::process::Command::new(e2e::tool("promtool"))
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
