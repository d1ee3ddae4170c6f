//! Traces over OTLP: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, one event yields the dispatcher's
//! span and each agent's, all in the trace the hookpoint's `traceparent` started. The receiver
//! is a small HTTP server of the test's own that keeps the OTLP/HTTP JSON export requests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::Engine;
use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::*;

/// Accepts OTLP/HTTP export requests (keep-alive included) and keeps their JSON bodies.
async fn receiver() -> (String, Arc<Mutex<Vec<Json>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got: Arc<Mutex<Vec<Json>>> = Arc::default();
    let keep = got.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let keep = keep.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    // One request: its head, then Content-Length bytes of body.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
                    if let Ok(v) = serde_json::from_slice::<Json>(&body) {
                        keep.lock().expect("lock").push(v);
                    }
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
                    if conn.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), got)
}

/// Every exported span as (service, trace id, parent span id, name).
fn spans(exports: &[Json]) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for export in exports {
        for rs in export["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or_default()
                .to_string();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    let field = |k: &str| s[k].as_str().unwrap_or_default().to_ascii_lowercase();
                    out.push((
                        service.clone(),
                        field("traceId"),
                        field("parentSpanId"),
                        field("name"),
                    ));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn one_event_yields_a_span_per_hop_in_the_hookpoints_trace() {
    let (endpoint, exports) = receiver().await;
    let mut engine = Engine::secured();
    engine
        .env
        .push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint));
    // Export each batch after 100 ms rather than 5 s.
    engine
        .env
        .push(("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()));
    // Every agent called, none answered from the verdict cache.
    engine.env.push(("POLICY_VERDICT_CACHE".into(), "0".into()));
    engine.start(&["acl", "lb"]).await;
    let admin = engine.admin().await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "open", "action": "allow"}),
        )])
        .await
        .expect("policy");
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "lb", 20),
        ],
    )
    .await;
    let hook = engine.hook().await;
    eventually_allowed(&hook, "the chain is in place").await;

    let mut tap = crate::cache::tap(&engine).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", format!("00-{trace_id}-{parent}-01").as_str());
    let payload = bus::codec::encode("event", &conn("web", "db", &["p1"])).expect("encode");
    hook.request("new-connection", headers, payload.into())
        .await
        .expect("decision");

    // The tap record names the trace too.
    let traceparent = format!("00-{trace_id}-{parent}-01");
    let records = crate::cache::records(&mut tap, 1).await;
    assert_eq!(
        records[0].traceparent.as_deref(),
        Some(traceparent.as_str())
    );

    let expected = ["policy-dispatcher", "policy-agent-acl", "policy-agent-lb"];
    eventually_within(
        "every hop's span arrives",
        Duration::from_secs(15),
        || async {
            let got = spans(&exports.lock().expect("lock"));
            let ours: Vec<_> = got.iter().filter(|s| s.1 == trace_id).collect();
            let missing: Vec<&str> = expected
                .iter()
                .copied()
                .filter(|svc| !ours.iter().any(|s| s.0 == *svc))
                .collect();
            missing.is_empty().then_some(()).ok_or(format!(
                "no span in trace {trace_id} from {missing:?}; got {ours:?}"
            ))
        },
    )
    .await;
    let got = spans(&exports.lock().expect("lock"));
    for (service, _, parent_id, name) in got.iter().filter(|s| s.1 == trace_id) {
        assert_eq!(
            parent_id, parent,
            "{service}'s span {name} hangs off the hookpoint's span"
        );
    }
}
