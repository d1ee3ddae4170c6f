//! The monitor: counts from the tap, served as Prometheus text, and observe-only in a chain.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;

use bus::Action;
use e2e::Engine;
use serde_json::json;

use crate::*;

/// One sample of the text exposition format: `name{label="value",...} number`.
fn parse_sample(line: &str) -> Result<(String, HashMap<String, String>, f64), String> {
    let (head, value) = line.rsplit_once(' ').ok_or("no value")?;
    let value: f64 = value
        .parse()
        .map_err(|_| format!("bad value in {line:?}"))?;
    let (name, labels) = match head.split_once('{') {
        Some((n, rest)) => (
            n,
            rest.strip_suffix('}')
                .ok_or(format!("unclosed labels in {line:?}"))?,
        ),
        None => (head, ""),
    };
    let name_ok = !name.is_empty()
        && name.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        });
    if !name_ok {
        return Err(format!("bad metric name in {line:?}"));
    }
    let mut map = HashMap::new();
    if !labels.is_empty() {
        for pair in labels.split("\",") {
            let (k, v) = pair
                .split_once("=\"")
                .ok_or(format!("bad label in {line:?}"))?;
            map.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
    }
    Ok((name.to_string(), map, value))
}

pub(crate) fn scrape(addr: &str) -> Vec<(String, HashMap<String, String>, f64)> {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    s.write_all(
        b"GET /metrics HTTP/1.1\r\nHost: test\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
    )
        .expect("request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("response");
    let (head, body) = resp.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        body.trim_end().ends_with("# EOF"),
        "not a complete exposition"
    );
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_sample(l).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

pub(crate) fn sum(
    samples: &[(String, HashMap<String, String>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn monitor_counts_equal_the_decisions_sent_and_it_never_changes_one() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut engine = Engine::new();
    engine.agent("monitor", &["--metrics-addr", &addr]);
    engine.start(&["acl", "lb"]).await;
    engine.wait_instances("policy-agent-monitor", 1).await;
    let admin = engine.admin().await;
    // In the chain twice over: observe-only at the front, and as a plain agent at the end.
    let mut observe = sub("new-connection", "monitor", 1);
    observe.observe = true;
    subscribe(
        &admin,
        &[
            observe,
            sub("new-connection", "acl", 10),
            sub("new-connection", "lb", 20),
        ],
    )
    .await;
    subscribe(
        &admin,
        &[
            sub("expose-service", "acl", 10),
            sub("expose-service", "monitor", 99),
        ],
    )
    .await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "to-db", "action": "allow", "match": {"dst_service": "db"}})),
            doc(json!({"agent": "acl", "id": "to-ledger", "action": "allow", "match": {"dst_service": "ledger"}})),
        ])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    eventually("rules loaded", || async {
        let d = hook
            .new_connection(&conn("web", "ledger", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        (d.action == Action::Allow)
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    // Counts settle once the warm-up's tap records have all reached the monitor.
    let counts = || {
        let s = scrape(&addr);
        let allow = sum(
            &s,
            "policy_service_decisions_total",
            &[("service", "ledger"), ("action", "allow")],
        );
        let deny = sum(
            &s,
            "policy_service_decisions_total",
            &[("service", "billing"), ("action", "deny")],
        );
        (allow, deny)
    };
    let mut base = counts();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let now = counts();
        if now == base {
            break;
        }
        base = now;
    }

    for i in 0..30 {
        let dst = if i % 3 == 0 { "billing" } else { "ledger" };
        let d = hook
            .new_connection(&conn("web", dst, &["p1", "p2"]))
            .await
            .expect("decision");
        assert_eq!(d.action == Action::Allow, dst == "ledger");
        assert!(
            effects(&d.reasons, "monitor").is_empty(),
            "the monitor changed a decision"
        );
    }
    let d = hook
        .expose_service(&bus::event::ExposeService {
            service: "db".into(),
            peers: vec!["p1".into()],
            service_labels: None,
            peer_labels: None,
        })
        .await
        .expect("expose decision");
    assert_eq!(
        d.target_peers,
        ["p1"],
        "to-db counts for exposing db: {d:?}"
    );

    eventually("monitor counted every decision", || async {
        let (allow, deny) = counts();
        if (allow - base.0, deny - base.1) != (20.0, 10.0) {
            return Err(format!("allow {allow}, deny {deny}, from {base:?}"));
        }
        let s = scrape(&addr);
        assert_eq!(
            sum(
                &s,
                "policy_service_decisions_total",
                &[("service", "ledger"), ("action", "deny")]
            ),
            0.0
        );
        let ledger = sum(
            &s,
            "policy_reasons_total",
            &[
                ("agent", "acl"),
                ("policy", "to-ledger"),
                ("effect", "allow"),
            ],
        );
        assert_eq!(ledger, allow, "reasons and decisions disagree");
        assert!(
            sum(
                &s,
                "policy_decisions_total",
                &[("event", "new-connection"), ("action", "allow")]
            ) >= 20.0
        );
        assert!(
            sum(
                &s,
                "policy_decisions_total",
                &[("event", "new-connection"), ("action", "deny")]
            ) >= 10.0
        );
        assert!(sum(&s, "policy_decisions_total", &[("event", "expose-service")]) >= 1.0);
        assert!(sum(&s, "policy_peer_decisions_total", &[("action", "allow")]) >= 20.0);
        assert!(
            sum(
                &s,
                "policy_decision_seconds_count",
                &[("event", "new-connection")]
            ) >= 30.0
        );
        assert!(sum(&s, "policy_agent_seconds_count", &[("agent", "lb")]) >= 20.0);
        assert!(
            sum(
                &s,
                "policy_agent_calls_total",
                &[("agent", "monitor"), ("outcome", "observed")]
            ) >= 30.0
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn policyctl_top_shows_rates_denies_and_agents_from_the_tap() {
    let mut engine = Engine::new();
    engine.start(&["acl"]).await;
    let admin = engine.admin().await;
    subscribe(&admin, &[sub("new-connection", "acl", 10)]).await;
    let hook = engine.hook().await;
    let top = std::process::Command::new(e2e::bin("policyctl"))
        .args([
            "--nats-url",
            &engine.nats.url(),
            "top",
            "--interval",
            "500ms",
            "--count",
            "4",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start policyctl top");
    // Default deny: every decision is a deny.
    let traffic = tokio::spawn(async move {
        for _ in 0..60 {
            let _ = hook.new_connection(&conn("web", "db", &["p1"])).await;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    let out = tokio::task::spawn_blocking(move || top.wait_with_output())
        .await
        .expect("join")
        .expect("top output");
    traffic.abort();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let busy = text
        .lines()
        .filter(|l| l.starts_with("new-connection") && l.contains("100.0%"))
        .count();
    assert!(busy >= 1, "no frame showed the denied traffic:\n{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("new-connection") && l.contains(" acl ")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn policyctl_tap_o_json_streams_one_json_decision_a_line() {
    let mut engine = Engine::new();
    engine.start(&["lb"]).await;
    let admin = engine.admin().await;
    subscribe(&admin, &[sub("new-connection", "lb", 20)]).await;
    let mut tap = engine
        .command("policyctl", &["tap", "new-connection", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start policyctl tap");
    let stdout = tap.stdout.take().expect("stdout");
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .take(3)
            .collect::<Result<Vec<String>, _>>()
    });
    let hook = engine.hook().await;
    let deadline = std::time::Instant::now() + WAIT;
    while !lines.is_finished() && std::time::Instant::now() < deadline {
        hook.new_connection(&conn("web", "db", &["p1"]))
            .await
            .expect("decision");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let lines = lines.join().expect("reader").expect("lines");
    assert_eq!(lines.len(), 3);
    // The reader is gone (as with `policyctl tap | head -3`): the next record ends the stream
    // quietly, not with a panic.
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        hook.new_connection(&conn("web", "db", &["p1"]))
            .await
            .expect("decision");
        if let Some(status) = tap.try_wait().expect("wait") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "tap kept running");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success(), "tap ended with {status}");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON object per line");
        assert_eq!(v["event"], "new-connection");
        assert_eq!(v["decision"]["action"], "allow");
        assert_eq!(v["decision"]["target_peer"], "p1");
        assert!(v["agents"][0]["latency_us"].is_u64());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn policyctl_tap_prints_the_human_line_by_default() {
    let mut engine = Engine::new();
    engine.start(&["lb"]).await;
    let admin = engine.admin().await;
    subscribe(&admin, &[sub("new-connection", "lb", 20)]).await;
    let mut tap = engine
        .command("policyctl", &["tap"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start policyctl tap");
    let stdout = tap.stdout.take().expect("stdout");
    let line = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout).lines().next()
    });
    let hook = engine.hook().await;
    let deadline = std::time::Instant::now() + WAIT;
    while !line.is_finished() && std::time::Instant::now() < deadline {
        hook.new_connection(&conn("web", "db", &["p1"]))
            .await
            .expect("decision");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = tap.kill();
    let _ = tap.wait();
    let line = line.join().expect("reader").expect("a line").expect("text");
    // As `policyctl up` prints decisions: event, services, candidates, the outcome, reasons.
    assert!(line.starts_with("new-connection"), "{line}");
    assert!(
        line.contains("web -> db") && line.contains("=> allow to p1"),
        "{line}"
    );
    assert!(
        serde_json::from_str::<serde_json::Value>(&line).is_err(),
        "{line}"
    );
}
