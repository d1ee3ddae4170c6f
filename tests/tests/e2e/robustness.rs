//! Bad input, dead and restarted processes, load sharing and shutdown.

use std::time::Duration;

use bus::{Action, ErrorCode, Subjects};
use e2e::{bin, Engine};
use serde_json::json;

use crate::*;

async fn raw_request(
    engine: &Engine,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: &'static [u8],
) -> Result<async_nats::Message, bus::ClientError> {
    let client = engine.client().await;
    bus::client::call(
        &client,
        subject,
        headers,
        bytes::Bytes::from_static(payload),
        WAIT,
    )
    .await
}

fn code(r: Result<async_nats::Message, bus::ClientError>) -> (ErrorCode, String) {
    match r {
        Err(bus::ClientError::Remote(e)) => (e.code, e.message),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

async fn allow_all(engine: &mut Engine) -> (AdminClient, bus::Client) {
    engine.start(&["acl"]).await;
    let admin = engine.admin().await;
    subscribe(&admin, &[sub("new-connection", "acl", 10)]).await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "open", "action": "allow"}),
        )])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    wait_allowed(&hook).await;
    (admin, hook)
}

async fn wait_allowed(hook: &bus::Client) {
    eventually("rule `open` allows", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        if d.action == Action::Allow && effects(&d.reasons, "acl") == [pair("open", "allow")] {
            Ok(())
        } else {
            Err(format!("{d:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_events_and_events_without_subscribers() {
    let mut engine = Engine::new();
    engine.start(&[]).await;
    let hook = engine.hook().await;
    let err = hook.emit("made-up", &bus::State::new()).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownEvent), "{err}");
    let err = hook.new_connection(&conn("a", "b", &[])).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoSubscribers), "{err}");
    assert!(
        err.to_string()
            .contains("policyctl subscribe new-connection"),
        "{err}"
    );
    let (c, msg) = code(
        raw_request(
            &engine,
            "policy.event.Not_An.Event".into(),
            Default::default(),
            b"",
        )
        .await,
    );
    assert_eq!(c, ErrorCode::UnknownEvent, "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_messages_get_clear_errors_and_processes_keep_serving() {
    let mut engine = Engine::new();
    let (_admin, hook) = allow_all(&mut engine).await;
    let subjects = Subjects::default();
    let event = subjects.event("new-connection");

    let (c, msg) = code(
        raw_request(
            &engine,
            event.clone(),
            Default::default(),
            b"\xc1\xff not msgpack",
        )
        .await,
    );
    assert_eq!(c, ErrorCode::BadRequest);
    assert!(msg.contains("new-connection"), "{msg}");
    // A map missing a required field names the field.
    let (c, msg) = code(
        raw_request(
            &engine,
            event.clone(),
            Default::default(),
            b"\x81\xabsrc_service\xa1a",
        )
        .await,
    );
    assert_eq!(c, ErrorCode::BadRequest);
    assert!(msg.contains("dst_service"), "{msg}");

    // Straight at an agent, with a state header that is not base64 of a map.
    let acl = subjects.agent(&bus::Kind::new("acl").expect("kind"), "new-connection");
    let payload = rmp_serde::to_vec_named(&conn("web", "db", &["p1"])).expect("encode");
    let payload: &'static [u8] = Box::leak(payload.into_boxed_slice());
    let mut h = async_nats::HeaderMap::new();
    h.insert("Policy-State", "!!!not base64");
    let (c, msg) = code(raw_request(&engine, acl.clone(), h, payload).await);
    assert_eq!(c, ErrorCode::BadRequest);
    assert!(msg.contains("Policy-State"), "{msg}");
    let mut h = async_nats::HeaderMap::new();
    h.insert("Policy-State", "kQE="); // base64 of a MessagePack array [1]
    let (c, msg) = code(raw_request(&engine, acl, h, payload).await);
    assert_eq!(c, ErrorCode::BadRequest, "{msg}");

    // The same fields by position (a MessagePack list): refused where it arrives, not passed
    // on for an agent to fail on.
    let positional: &'static [u8] = Box::leak(
        rmp_serde::to_vec(&("web", "db", vec!["p1"]))
            .expect("encode")
            .into_boxed_slice(),
    );
    let (c, msg) = code(raw_request(&engine, event.clone(), Default::default(), positional).await);
    assert_eq!(c, ErrorCode::BadRequest, "{msg}");
    assert!(
        msg.contains("expected a map of named fields, found a list"),
        "{msg}"
    );
    let (c, msg) = code(
        raw_request(
            &engine,
            subjects.admin(bus::subject::AdminCommand::PolicyList),
            Default::default(),
            b"\x91\xa3acl",
        )
        .await,
    );
    assert_eq!(c, ErrorCode::BadRequest, "{msg}");
    assert!(msg.contains("found a list"), "{msg}");

    // An event id is bounded where it arrives.
    let payload: &'static [u8] = Box::leak(
        rmp_serde::to_vec_named(&conn("web", "db", &["p1"]))
            .expect("encode")
            .into_boxed_slice(),
    );
    for bad_id in ["x".repeat(65), "a b".into(), "evt;1".into()] {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Policy-Event-Id", bad_id.as_str());
        let (c, msg) = code(raw_request(&engine, event.clone(), h, payload).await);
        assert_eq!(c, ErrorCode::BadRequest, "{bad_id}: {msg}");
        assert!(msg.contains("Policy-Event-Id"), "{msg}");
    }
    // A trace context that is not W3C's is dropped, and the event decided.
    let mut h = async_nats::HeaderMap::new();
    h.insert("traceparent", "x".repeat(5000).as_str());
    let reply = raw_request(&engine, event.clone(), h, payload)
        .await
        .expect("decided without the trace context");
    assert!(
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .is_none(),
        "a bad traceparent was passed on"
    );

    // Both processes still decide.
    let d = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("still serving");
    assert_eq!(d.action, Action::Allow);
}

/// A requester picks its reply subject; a responder that answered anywhere would write there
/// with its own rights. Every responder answers inboxes only: the dispatcher (events, admin),
/// an agent, and every process's services API. Here on the plain bus, where only the
/// processes themselves can refuse (the secured bus refuses it in the server too).
#[tokio::test(flavor = "multi_thread")]
async fn a_request_whose_reply_subject_is_not_an_inbox_gets_no_answer_and_is_logged() {
    let mut engine = Engine::new();
    let (admin, hook) = allow_all(&mut engine).await;
    let subjects = Subjects::default();
    let client = engine.client().await;
    let mut caught = client.subscribe("caught.>").await.expect("subscribe");
    let payload =
        bytes::Bytes::from(rmp_serde::to_vec_named(&conn("web", "db", &["p1"])).expect("encode"));
    let acl = bus::Kind::new("acl").expect("kind");
    let aims = [
        (subjects.event("new-connection"), payload.clone()),
        (
            subjects.admin(bus::subject::AdminCommand::PolicyList),
            bytes::Bytes::from_static(b"\x80"),
        ),
        (subjects.agent(&acl, "new-connection"), payload),
        ("$SRV.PING".to_string(), bytes::Bytes::new()),
        (
            Subjects::service_ping("policy-dispatcher"),
            bytes::Bytes::new(),
        ),
    ];
    for (i, (subject, body)) in aims.iter().enumerate() {
        client
            .publish_with_reply(subject.clone(), format!("caught.{i}"), body.clone())
            .await
            .expect("publish");
    }
    client.flush().await.expect("flush");
    let got = tokio::time::timeout(Duration::from_secs(2), caught.next()).await;
    assert!(got.is_err(), "a responder answered a non-inbox: {got:?}");
    eventually("every refusal is logged", || async {
        let n = engine
            .logs()
            .matches("reply subject is not an inbox")
            .count();
        (n >= aims.len()).then_some(()).ok_or(format!("{n} logged"))
    })
    .await;
    // Nothing was taken: the same requests from an inbox are answered.
    assert_eq!(admin.policy_list(None).await.expect("list").len(), 1);
    wait_allowed(&hook).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_policy_file_names_file_document_and_field_and_stores_nothing() {
    let mut engine = Engine::new();
    engine.start(&["acl"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rules.yaml");
    std::fs::write(
        &file,
        "agent: acl\nid: good\naction: allow\n---\nagent: acl\nid: bad\naction: maybe\nmatch: {dst_service: db}\n",
    )
    .expect("write");
    let out = std::process::Command::new(bin("policyctl"))
        .args(["--nats-url", &engine.nats.url(), "policy", "add", "-f"])
        .arg(&file)
        .output()
        .expect("run policyctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    for part in [
        "rules.yaml: document 2 (acl/bad)",
        "action",
        "maybe",
        "nothing was stored",
    ] {
        assert!(stderr.contains(part), "{part:?} missing from: {stderr}");
    }
    assert!(engine
        .admin()
        .await
        .policy_list(None)
        .await
        .expect("list")
        .is_empty());

    // A document without an id never leaves policyctl.
    std::fs::write(&file, "agent: acl\naction: allow\n").expect("write");
    let out = std::process::Command::new(bin("policyctl"))
        .args(["--nats-url", &engine.nats.url(), "policy", "add", "-f"])
        .arg(&file)
        .output()
        .expect("run policyctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("document 1") && stderr.contains("`id`"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_every_process_and_the_server_loses_nothing() {
    let mut engine = Engine::new();
    let (_admin, _hook) = allow_all(&mut engine).await;

    // The server restarts under running processes: they reconnect and keep watching.
    engine.nats.restart();
    let hook = engine.hook().await;
    wait_allowed(&hook).await;
    let admin = engine.admin().await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "no-db", "priority": -1, "action": "deny",
            "match": {"dst_service": "db"}}),
        )])
        .await
        .expect("policy add after a server restart");
    eventually("a policy added after the restart applies", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        (effects(&d.reasons, "acl") == [pair("no-db", "deny")])
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;

    // Everything stops, then starts again from the stored state alone.
    engine.kill_all();
    engine.nats.restart();
    engine.start(&["acl"]).await;
    let hook = engine.hook().await;
    let d = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision after restart");
    assert_eq!(effects(&d.reasons, "acl"), [pair("no-db", "deny")]);
    let d = hook
        .new_connection(&conn("web", "api", &["p1"]))
        .await
        .expect("decision after restart");
    assert_eq!(effects(&d.reasons, "acl"), [pair("open", "allow")]);
    assert_eq!(
        engine
            .admin()
            .await
            .subscriptions(None)
            .await
            .expect("list")
            .len(),
        1
    );
}

async fn requests_per_instance(engine: &Engine, service: &str, endpoint: &str) -> Vec<u64> {
    use futures::StreamExt;
    let client = engine.client().await;
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish_with_reply(Subjects::service_stats(service), inbox, bytes::Bytes::new())
        .await
        .expect("publish");
    let mut counts = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        let stats: serde_json::Value = serde_json::from_slice(&msg.payload).expect("stats json");
        let n = stats["endpoints"]
            .as_array()
            .and_then(|eps| eps.iter().find(|e| e["name"] == endpoint))
            .and_then(|e| e["num_requests"].as_u64())
            .unwrap_or(0);
        counts.push(n);
    }
    counts
}

/// Every instance's `$SRV.STATS` for one endpoint, as JSON.
async fn endpoint_stats(engine: &Engine, service: &str, endpoint: &str) -> Vec<serde_json::Value> {
    use futures::StreamExt;
    let client = engine.client().await;
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish_with_reply(Subjects::service_stats(service), inbox, bytes::Bytes::new())
        .await
        .expect("publish");
    let mut found = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        let stats: serde_json::Value = serde_json::from_slice(&msg.payload).expect("stats json");
        assert_eq!(stats["type"], "io.nats.micro.v1.stats_response");
        if let Some(e) = stats["endpoints"]
            .as_array()
            .and_then(|eps| eps.iter().find(|e| e["name"] == endpoint))
        {
            found.push(e.clone());
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn services_stats_count_error_replies_as_errors() {
    let mut engine = Engine::new();
    let (_admin, hook) = allow_all(&mut engine).await;
    let before = endpoint_stats(&engine, "policy-dispatcher", "events").await;
    let errors = |s: &[serde_json::Value]| s[0]["num_errors"].as_u64().unwrap_or(0);
    let (c, _) = code(
        raw_request(
            &engine,
            "policy.event.new-connection".into(),
            Default::default(),
            b"\xc1",
        )
        .await,
    );
    assert_eq!(c, ErrorCode::BadRequest);
    hook.new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    let after = endpoint_stats(&engine, "policy-dispatcher", "events").await;
    assert_eq!(errors(&after), errors(&before) + 1, "{after:?}");
    assert!(
        after[0]["last_error"]
            .as_str()
            .unwrap_or("")
            .starts_with("400:"),
        "{after:?}"
    );
    assert!(after[0]["num_requests"].as_u64() > before[0]["num_requests"].as_u64());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_dispatchers_and_two_agents_share_the_load() {
    let mut engine = Engine::new();
    let (_admin, hook) = allow_all(&mut engine).await;
    engine.dispatcher();
    engine.agent("acl", &[]);
    engine.wait_instances("policy-dispatcher", 2).await;
    engine.wait_instances("policy-agent-acl", 2).await;
    // Each from its own service, so the dispatchers' verdict cache cannot answer for the acl.
    let sends = (0..200).map(|i| {
        let hook = hook.clone();
        async move {
            hook.new_connection(&conn(&format!("web-{i}"), "db", &["p1"]))
                .await
        }
    });
    for d in futures::future::join_all(sends).await {
        assert_eq!(d.expect("decision").action, Action::Allow);
    }
    for (service, endpoint) in [
        ("policy-dispatcher", "events"),
        ("policy-agent-acl", "decide"),
    ] {
        let counts = requests_per_instance(&engine, service, endpoint).await;
        assert_eq!(counts.len(), 2, "{service}: {counts:?}");
        assert!(
            counts.iter().all(|n| *n > 10),
            "{service} did not share: {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_decisions_before_exiting() {
    let mut engine = Engine::new();
    let (admin, hook) = allow_all(&mut engine).await;
    // A slow third party keeps a decision in flight while the dispatcher is told to stop.
    let client = engine.client().await;
    let mut slow = client
        .subscribe("policy.agent.slow.new-connection")
        .await
        .expect("subscribe");
    // Make sure the server has the subscription before anything is sent to it.
    client.flush().await.expect("flush");
    let mut s = sub("new-connection", "slow", 20);
    s.timeout_ms = 5000;
    subscribe_forced(&admin, &[s]).await;
    let pending =
        tokio::spawn(async move { hook.new_connection(&conn("web", "db", &["p1"])).await });
    use futures::StreamExt;
    let asked = tokio::time::timeout(WAIT, slow.next())
        .await
        .expect("slow agent asked")
        .expect("message");
    let dispatcher = engine.take("policy-dispatcher");
    let stopping = tokio::task::spawn_blocking(move || dispatcher.terminate());
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
        .publish_with_headers(
            asked.reply.expect("reply subject"),
            async_nats::HeaderMap::new(),
            bytes::Bytes::new(),
        )
        .await
        .expect("answer");
    let d = pending
        .await
        .expect("join")
        .expect("the in-flight decision was answered");
    assert_eq!(d.action, Action::Allow);
    assert!(
        stopping.await.expect("join"),
        "dispatcher did not exit cleanly after SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn event_id_and_traceparent_travel_every_hop() {
    let mut engine = Engine::new();
    engine.start(&["lb"]).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // A hop the test can see: a foreign agent records the headers it is called with.
    let client = engine.client().await;
    let mut hop = client
        .subscribe("policy.agent.spy.new-connection")
        .await
        .expect("subscribe");
    // Make sure the server has the subscription before anything is sent to it.
    client.flush().await.expect("flush");
    let spy = client.clone();
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(msg) = hop.next().await {
            let _ = tx.send(msg.headers.clone());
            if let Some(reply) = msg.reply {
                let _ = spy.publish(reply, bytes::Bytes::new()).await;
            }
        }
    });
    let admin = engine.admin().await;
    subscribe_forced(
        &admin,
        &[
            sub("new-connection", "spy", 10),
            sub("new-connection", "lb", 20),
        ],
    )
    .await;
    let mut tap = client
        .subscribe("policy.tap.new-connection")
        .await
        .expect("tap");
    // Make sure the server has the subscription before anything is sent to it.
    client.flush().await.expect("flush");
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut h = async_nats::HeaderMap::new();
    h.insert("Policy-Event-Id", "evt-42");
    h.insert("traceparent", trace);
    let payload = rmp_serde::to_vec_named(&conn("web", "db", &["p1"])).expect("encode");
    let reply = engine
        .hook()
        .await
        .request("new-connection", h, payload.into())
        .await
        .expect("decision");
    let got = |h: Option<&async_nats::HeaderMap>, k: &str| {
        h.and_then(|h| h.get(k)).map(|v| v.as_str().to_string())
    };
    assert_eq!(
        got(reply.headers.as_ref(), "Policy-Event-Id").as_deref(),
        Some("evt-42")
    );
    assert_eq!(
        got(reply.headers.as_ref(), "traceparent").as_deref(),
        Some(trace)
    );
    let decision: bus::ConnectionDecision =
        rmp_serde::from_slice(&reply.payload).expect("decision");
    assert_eq!(decision.event_id, "evt-42");
    let seen = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("agent called")
        .expect("open");
    assert_eq!(
        got(seen.as_ref(), "Policy-Event-Id").as_deref(),
        Some("evt-42")
    );
    assert_eq!(got(seen.as_ref(), "traceparent").as_deref(), Some(trace));
    use futures::StreamExt;
    let tapped = tokio::time::timeout(WAIT, tap.next())
        .await
        .expect("tap")
        .expect("open");
    assert_eq!(
        got(tapped.headers.as_ref(), "traceparent").as_deref(),
        Some(trace)
    );
    let record: bus::tap::TapRecord = rmp_serde::from_slice(&tapped.payload).expect("tap record");
    assert_eq!(record.event_id, "evt-42");
    assert_eq!(record.agents.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_older_than_2_10_is_refused_with_its_version() {
    // Debian's package is 2.9; where it is installed, the engine must name the problem.
    let debian = std::path::PathBuf::from("/usr/sbin/nats-server");
    let version = std::process::Command::new(&debian)
        .arg("--version")
        .output();
    let Ok(version) = version else {
        eprintln!("skipped: no /usr/sbin/nats-server on this machine");
        return;
    };
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    if !version.contains("v2.9.") {
        eprintln!("skipped: /usr/sbin/nats-server is {version}, not 2.9");
        return;
    }
    let engine = Engine::on(e2e::NatsServer::start_with(debian));
    let out = tokio::task::spawn_blocking(move || {
        engine
            .command("policy-dispatcher", &[])
            .output()
            .expect("run dispatcher")
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("2.9") && stderr.contains("too old") && stderr.contains("2.10"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn instance_counts_ignore_the_servers_no_responders_answer() {
    let mut engine = Engine::new();
    engine.start(&["acl"]).await;
    let client = engine.client().await;
    let window = Duration::from_millis(300);
    let none = bus::client::count_instances(&client, "policy-agent-absent", window)
        .await
        .expect("ping");
    assert_eq!(none, 0, "a kind with no instance was counted");
    let one = bus::client::count_instances(&client, "policy-agent-acl", window)
        .await
        .expect("ping");
    assert_eq!(one, 1);
}
