//! The secured bus: a real nats-server started with the configuration `policyctl auth init`
//! writes, every process logged in with its own role's seed. Every role can do its job, and
//! every attempt to do another role's job is refused by the server and changes nothing.

use std::time::Duration;

use bus::roles::Role;
use bus::{Action, Kind};
use e2e::{bin, free_port, Engine, NatsServer};
use futures::StreamExt;
use serde_json::json;

use crate::*;

fn role(name: &str) -> Role {
    Role::parse(name).expect("role")
}

/// Waits for the server to report a permission violation on `subject` to this client.
async fn refused(
    errors: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    what: &str,
    subject: &str,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, errors.recv()).await {
            Ok(Some(e))
                if e.to_lowercase().contains("permissions violation") && e.contains(subject) =>
            {
                return
            }
            Ok(Some(_)) => continue,
            _ => panic!("{what}: the server never refused {subject}"),
        }
    }
}

/// The full engine on the secured bus, with an allow-all ACL, an LB, a one-connection limit on
/// db, a bandwidth cap, and the monitor.
async fn secured_engine(metrics: &str) -> (Engine, AdminClient, bus::Client) {
    secured_engine_on(Engine::secured(), metrics).await
}

async fn secured_engine_on(
    mut engine: Engine,
    metrics: &str,
) -> (Engine, AdminClient, bus::Client) {
    engine.agent("monitor", &["--metrics-addr", metrics]);
    engine
        .start(&["acl", "lb", "conn-limit", "rate-limit"])
        .await;
    engine.wait_instances("policy-agent-monitor", 1).await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "lb", 20),
            sub("new-connection", "conn-limit", 30),
            sub("new-connection", "rate-limit", 40),
            sub("connection-closed", "conn-limit", 10),
        ],
    )
    .await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "open", "action": "allow"})),
            doc(json!({"agent": "lb", "id": "db", "dst_service": "db", "scheme": "static", "peer": "p2"})),
            doc(json!({"agent": "conn-limit", "id": "db-one", "match": {"dst_service": "db"}, "max_connections": 1})),
            doc(json!({"agent": "rate-limit", "id": "cap", "bandwidth": "10Mbit/s"})),
            // Billing: two live connections, but one new one an hour, so the second is admitted
            // by conn-limit and then denied by rate-limit (a release through the tap).
            doc(json!({"agent": "conn-limit", "id": "billing-two", "match": {"dst_service": "billing"}, "max_connections": 2})),
            doc(json!({"agent": "rate-limit", "id": "billing-once", "match": {"dst_service": "billing"}, "rate": "1/h"})),
        ])
        .await
        .expect("the operator adds policies");
    let hook = engine.hook().await;
    eventually("every policy applies", || async {
        let d = hook
            .new_connection(&conn("web", "api", &["p1", "p2"]))
            .await
            .map_err(|e| e.to_string())?;
        (d.rate_limit.map(|r| r.bits_per_second) == Some(10_000_000))
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    (engine, admin, hook)
}

async fn close(hook: &bus::Client, d: &bus::ConnectionDecision) {
    hook.connection_closed(&bus::event::ConnectionClosed {
        connection_id: d.connection_id.clone().expect("connection id"),
        src_service: "web".into(),
        dst_service: "db".into(),
        target_peer: d.target_peer.clone(),
    })
    .await
    .expect("the gateway closes");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_role_does_its_job_on_the_secured_bus() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let (engine, admin, hook) = secured_engine(&metrics).await;
    every_role_does_its_job(engine, admin, hook, &metrics).await;
}

/// The same in NATS's operator mode: JWTs (`policyctl auth init --jwt`), `.creds` files, a
/// memory resolver; the same accounts, exports and imports, with activation tokens.
#[tokio::test(flavor = "multi_thread")]
async fn every_role_does_its_job_in_operator_mode_with_creds_files() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let (engine, admin, hook) = secured_engine_on(Engine::secured_by_jwt(), &metrics).await;
    every_role_does_its_job(engine, admin, hook, &metrics).await;
}

async fn every_role_does_its_job(
    engine: Engine,
    admin: AdminClient,
    hook: bus::Client,
    metrics: &str,
) {
    // The operator reads the tap.
    let operator = engine.client_as(&role("operator")).await;
    let mut tap = operator
        .subscribe("policy.tap.new-connection")
        .await
        .expect("tap");
    operator.flush().await.expect("flush");

    // The gateway gets decisions from every agent kind, the limiter counting across the chain.
    let first = hook
        .new_connection(&conn("web", "db", &["p1", "p2"]))
        .await
        .expect("decision");
    assert_eq!(first.action, Action::Allow, "{first:?}");
    assert_eq!(first.target_peer.as_deref(), Some("p2"));
    assert_eq!(
        effects(&first.reasons, "conn-limit"),
        [pair("db-one", "allow")]
    );
    let second = hook
        .new_connection(&conn("web", "db", &["p1", "p2"]))
        .await
        .expect("decision");
    assert_eq!(
        effects(&second.reasons, "conn-limit"),
        [pair("db-one", "deny")]
    );
    close(&hook, &first).await;
    eventually("the closed connection's slot is free", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1", "p2"]))
            .await
            .map_err(|e| e.to_string())?;
        (d.action == Action::Allow)
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    let record = tokio::time::timeout(WAIT, tap.next())
        .await
        .expect("a tap record")
        .expect("open");
    assert!(!record.payload.is_empty());

    // The operator lists what it stored; the monitor counted the decisions from the tap.
    assert_eq!(admin.policy_list(None).await.expect("list").len(), 6);
    assert_eq!(admin.subscriptions(None).await.expect("list").len(), 5);
    let body = reqwest_free_get(metrics).await;
    assert!(
        body.contains("policy_decisions_total{event=\"new-connection\",action=\"allow\"}"),
        "{body}"
    );
    // The rate limiter writes its bucket; conn-limit gives back, on the dispatcher's undo, the slot of a
    // connection the rate limiter then denied.
    let first = hook
        .new_connection(&conn("web", "billing", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(first.action, Action::Allow, "{first:?}");
    let second = hook
        .new_connection(&conn("web", "billing", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(
        effects(&second.reasons, "rate-limit"),
        [pair("billing-once", "deny")]
    );
    let admitted = first.connection_id.clone().expect("connection id");
    eventually("the denied connection's slot is released", || async {
        let mut held = crate::slots::slots_held(&engine).await;
        held.retain(|h| h.starts_with("billing-two = "));
        (held.len() == 1 && held[0].starts_with(&format!("billing-two = {admitted}#")))
            .then_some(())
            .ok_or(format!("slots held: {held:?}"))
    })
    .await;

    // And not one process was refused anything it does, the batched reads of conn-limit's
    // confirmations included (refused, they would fall back to reading key by key).
    let logs = engine.logs();
    assert!(
        !logs.to_lowercase().contains("permissions violation")
            && !logs.contains("markers read key by key"),
        "a role lacks a permission it needs:\n{logs}"
    );
}

/// GET /metrics over a plain TCP stream.
async fn reqwest_free_get(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("read");
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn every_cross_role_attempt_is_refused_by_the_server_and_changes_nothing() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let (engine, admin, hook) = secured_engine(&metrics).await;
    // The gateway holds db's one slot.
    let held = hook
        .new_connection(&conn("web", "db", &["p1", "p2"]))
        .await
        .expect("decision");
    assert_eq!(held.action, Action::Allow);
    let policies = admin.policy_list(None).await.expect("list");
    let subs = admin.subscriptions(None).await.expect("list");
    let allow_all = rmp_serde::to_vec_named(&json!({"policies": [
        {"agent": "acl", "id": "evil", "priority": -100, "action": "allow"}]}))
    .expect("encode");

    // gateway -> admin
    let (gw, mut gw_errors) = engine.watched_client(&role("gateway")).await;
    gw.publish("policy.admin.policy-add", allow_all.clone().into())
        .await
        .expect("publish call");
    refused(
        &mut gw_errors,
        "gateway -> admin",
        "policy.admin.policy-add",
    )
    .await;

    // gateway -> an agent's queue group: it would answer allow for its share of requests.
    let mut rogue = gw
        .queue_subscribe("policy.agent.acl.>", "acl".into())
        .await
        .expect("subscribe call");
    refused(
        &mut gw_errors,
        "gateway -> acl queue group",
        "policy.agent.acl.>",
    )
    .await;

    // gateway -> tap: a forged final deny that would free the held connection's slot.
    let forged = rmp_serde::to_vec_named(&json!({
        "event": "new-connection", "event_id": "forged", "attributes": {},
        "decision": {"action": "deny", "connection_id": held.connection_id,
                     "conn_limit": held.extra.get("conn_limit")},
        "total_us": 1, "agents": [], "at_ms": 0}))
    .expect("encode");
    gw.publish("policy.tap.new-connection", forged.clone().into())
        .await
        .expect("publish call");
    refused(
        &mut gw_errors,
        "gateway -> tap",
        "policy.tap.new-connection",
    )
    .await;
    // gateway -> reading the tap
    let _tap = gw.subscribe("policy.tap.>").await.expect("subscribe call");
    refused(&mut gw_errors, "gateway reads the tap", "policy.tap.>").await;

    // agent -> admin, another kind's queue group, its own kind outside its queue group, the tap
    let (acl, mut acl_errors) = engine.watched_client(&role("agent-acl")).await;
    acl.publish(
        "policy.admin.unsubscribe",
        rmp_serde::to_vec_named(&json!({"event": "new-connection", "agent": "acl"}))
            .expect("encode")
            .into(),
    )
    .await
    .expect("publish call");
    refused(
        &mut acl_errors,
        "agent -> admin",
        "policy.admin.unsubscribe",
    )
    .await;
    let _lb = acl
        .queue_subscribe("policy.agent.lb.>", "lb".into())
        .await
        .expect("subscribe call");
    refused(
        &mut acl_errors,
        "acl -> lb's queue group",
        "policy.agent.lb.>",
    )
    .await;
    let _spy = acl
        .subscribe("policy.agent.acl.>")
        .await
        .expect("subscribe call");
    refused(
        &mut acl_errors,
        "acl outside its queue group",
        "policy.agent.acl.>",
    )
    .await;
    acl.publish("policy.tap.new-connection", forged.into())
        .await
        .expect("publish call");
    refused(&mut acl_errors, "agent -> tap", "policy.tap.new-connection").await;
    // ...and the conn-limit's slots, which only conn-limit writes.
    acl.publish("$KV.policy_conns.slot.db-one.0", "".into())
        .await
        .expect("publish call");
    refused(
        &mut acl_errors,
        "acl -> conn-limit's bucket",
        "$KV.policy_conns.slot.db-one.0",
    )
    .await;

    // Anyone but the dispatcher -> the config bucket, and the bucket's stream itself.
    for name in [
        "operator",
        "gateway",
        "monitor",
        "agent-acl",
        "agent-lb",
        "agent-conn-limit",
        "agent-rate-limit",
    ] {
        let (c, mut errors) = engine.watched_client(&role(name)).await;
        let evil =
            rmp_serde::to_vec_named(&json!({"agent": "acl", "id": "evil", "action": "allow"}))
                .expect("encode");
        c.publish("$KV.policy_config.pol.acl.evil", evil.into())
            .await
            .expect("publish call");
        refused(&mut errors, name, "$KV.policy_config.pol.acl.evil").await;
        for api in ["STREAM.PURGE", "STREAM.DELETE", "STREAM.UPDATE"] {
            let subject = format!("$JS.API.{api}.KV_policy_config");
            c.publish(subject.clone(), "{}".into())
                .await
                .expect("publish call");
            refused(&mut errors, name, &subject).await;
        }
    }
    // policyctl with the wrong role's seed says so at once, rather than time out.
    let started = std::time::Instant::now();
    let out = engine
        .command_as("policyctl", &["policy", "list"], &role("gateway"))
        .output()
        .expect("policyctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("refused")
            && stderr.contains("operator role")
            && stderr.contains("gateway.nk"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );

    // An anonymous client is not let in at all.
    assert!(async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(engine.nats.url())
        .await
        .is_err());

    // Nothing changed: the policies, the subscriptions, the held slot, the decisions.
    assert_eq!(admin.policy_list(None).await.expect("list"), policies);
    assert_eq!(admin.subscriptions(None).await.expect("list"), subs);
    for _ in 0..20 {
        let d = hook
            .new_connection(&conn("web", "db", &["p1", "p2"]))
            .await
            .expect("decision");
        assert_eq!(
            effects(&d.reasons, "conn-limit"),
            [pair("db-one", "deny")],
            "{d:?}"
        );
        assert_eq!(effects(&d.reasons, "acl"), [pair("open", "allow")]);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rogue.next())
            .await
            .is_err(),
        "the rogue subscriber got a request"
    );
}

/// A third-party gateway that does not set its role's inbox prefix is told so by the server
/// (its inbox subscription is refused), and the dispatcher, whose answer the server refuses,
/// says why in its log: not a silent drop.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_without_its_roles_inbox_prefix_gets_a_clear_error_not_silence() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let (engine, _admin, _hook) = secured_engine(&metrics).await;
    let seed =
        std::fs::read_to_string(engine.seed(&role("gateway")).expect("seed")).expect("seed file");
    let (tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let gateway = async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(engine.url())
        .await
        .expect("log in as the gateway, default inbox");
    let payload = rmp_serde::to_vec_named(&conn("web", "db", &["p1"])).expect("encode");
    let asked = gateway
        .send_request(
            "policy.event.new-connection",
            async_nats::Request::new()
                .payload(payload.into())
                .timeout(Some(Duration::from_secs(2))),
        )
        .await;
    assert!(asked.is_err(), "answered on a foreign inbox: {asked:?}");
    refused(&mut errors, "the gateway", "Subscription to \"_INBOX.").await;
    eventually("the dispatcher says why it could not answer", || async {
        engine
            .logs()
            .contains("asked from an inbox outside its role's")
            .then_some(())
            .ok_or_else(|| "not logged yet".to_string())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_template_runs_the_engine_on_an_operators_own_nats() {
    let mut engine = Engine::secured_by_template();
    engine.start(&["acl"]).await;
    let admin = engine.admin().await;
    subscribe(&admin, &[sub("expose-service", "acl", 10)]).await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "open", "action": "allow"}),
        )])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    eventually("decided through the template's permissions", || async {
        let d = hook
            .expose_service(&bus::event::ExposeService {
                service: "db".into(),
                peers: vec!["p1".into()],
                service_labels: None,
                peer_labels: None,
            })
            .await
            .map_err(|e| e.to_string())?;
        (d.target_peers == ["p1"])
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    let logs = engine.logs();
    assert!(
        !logs.to_lowercase().contains("permissions violation"),
        "{logs}"
    );
}

/// Subscribes geo after an allow-all ACL and waits for its answer, `{zone: eu}`, in a
/// decision.
async fn geo_answers(engine: &Engine, what: &str) {
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "geo", 20),
        ],
    )
    .await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "open", "action": "allow"}),
        )])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    eventually(what, || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        (d.action == Action::Allow && d.extra.get("zone") == Some(&V::from("eu")))
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_third_party_kind_gets_its_role_from_the_same_generator() {
    let mut engine = Engine::secured();
    engine.start(&["acl"]).await;
    engine.add_agent_role("geo");
    let geo_role = Role::Agent(Kind::new("geo").expect("kind"));
    // Written against the contract (docs/contract.md) only: its queue group, the services ping, a verdict.
    let (geo, mut errors) = engine.watched_client(&geo_role).await;
    let mut calls = geo
        .queue_subscribe("policy.agent.geo.new-connection", "geo".into())
        .await
        .expect("subscribe");
    let mut pings = geo
        .subscribe("$SRV.PING.policy-agent-geo")
        .await
        .expect("subscribe");
    geo.flush().await.expect("flush");
    let responder = geo.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(msg) = calls.next() => {
                    let patch = rmp_serde::to_vec_named(&json!({"zone": "eu"})).expect("encode");
                    let mut h = async_nats::HeaderMap::new();
                    use base64::Engine as _;
                    h.insert("Policy-State", base64::engine::general_purpose::STANDARD.encode(patch).as_str());
                    if let Some(reply) = msg.reply {
                        let _ = responder.publish_with_headers(reply, h, bytes::Bytes::new()).await;
                    }
                }
                Some(msg) = pings.next() => {
                    if let Some(reply) = msg.reply {
                        let pong = json!({"type": "io.nats.micro.v1.ping_response", "name": "policy-agent-geo", "id": "g1", "version": "1", "metadata": {}});
                        let _ = responder.publish(reply, pong.to_string().into()).await;
                    }
                }
                else => break,
            }
        }
    });
    geo_answers(&engine, "geo answers on the secured bus").await;
    // Its role is an agent's like any other: no other kind's queue group.
    let _acl = geo
        .queue_subscribe("policy.agent.acl.>", "acl".into())
        .await
        .expect("subscribe call");
    refused(
        &mut errors,
        "geo -> acl's queue group",
        "policy.agent.acl.>",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn binaries_log_in_with_a_password_a_token_or_a_url_list_and_never_print_a_secret() {
    // A user and a password, from the URL or from the environment.
    let server = NatsServer::start_configured(&["--user", "alice", "--pass", "s3cret-pw"]);
    let port = server.port();
    let url = format!("nats://alice:s3cret-pw@127.0.0.1:{port}");
    let dispatcher = ChildGuard(
        std::process::Command::new(bin("policy-dispatcher"))
            .args(["--nats-url", &url])
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dispatcher"),
    );
    let client =
        async_nats::ConnectOptions::with_user_and_password("alice".into(), "s3cret-pw".into())
            .connect(format!("127.0.0.1:{port}"))
            .await
            .expect("connect");
    let deadline = std::time::Instant::now() + WAIT;
    while bus::client::count_instances(&client, "policy-dispatcher", Duration::from_millis(100))
        .await
        .unwrap_or(0)
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the dispatcher never logged in"
        );
    }
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(bin("policyctl"));
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("policyctl")
    };
    let plain = format!("nats://127.0.0.1:{port}");
    let out = run(&["--nats-url", &url, "subscriptions"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &["--nats-url", &plain, "subscriptions"],
        &[("NATS_USER", "alice"), ("NATS_PASSWORD", "s3cret-pw")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A list whose first server is down.
    let list = format!("nats://127.0.0.1:{},{url}", free_port());
    let out = run(&["--nats-url", &list, "subscriptions"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A wrong password: one line, and no secret in it.
    let wrong = format!("nats://alice:wr0ng-pw@127.0.0.1:{port}");
    let out = run(&["--nats-url", &wrong, "subscriptions"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        !stderr.contains("wr0ng-pw") && !stderr.contains("alice:"),
        "{stderr}"
    );
    assert!(stderr.contains("***@127.0.0.1"), "{stderr}");
    drop(dispatcher);

    // A token, from a flag or the environment.
    let server = NatsServer::start_configured(&["--auth", "t0ken-value"]);
    let plain = format!("nats://127.0.0.1:{}", server.port());
    let _dispatcher = ChildGuard(
        std::process::Command::new(bin("policy-dispatcher"))
            .args(["--nats-url", &plain])
            .env("NATS_TOKEN", "t0ken-value")
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dispatcher"),
    );
    eventually("policyctl logs in with a token", || {
        let out = run(
            &[
                "--nats-url",
                &plain,
                "--token",
                "t0ken-value",
                "subscriptions",
            ],
            &[],
        );
        async move {
            out.status
                .success()
                .then_some(())
                .ok_or(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .await;
    let out = run(
        &["--nats-url", &plain, "subscriptions"],
        &[("NATS_TOKEN", "wrong-t0ken")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !stderr.contains("wrong-t0ken"),
        "{stderr}"
    );
    drop(server);
}

/// Kills a child when dropped.
struct ChildGuard(std::process::Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with openssl.
fn certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (Debian package openssl) is needed for the TLS test");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=policy-bus test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("write ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn binaries_connect_over_tls_with_a_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    certificates(dir.path());
    let path = |f: &str| dir.path().join(f).to_str().expect("utf-8").to_string();
    let server = NatsServer::start_configured(&[
        "--tls",
        "--tlscert",
        &path("server.pem"),
        "--tlskey",
        &path("server.key"),
    ]);
    let url = format!("tls://127.0.0.1:{}", server.port());
    let _dispatcher = ChildGuard(
        std::process::Command::new(bin("policy-dispatcher"))
            .args(["--nats-url", &url, "--tls-ca-file", &path("ca.pem")])
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dispatcher"),
    );
    let ca = path("ca.pem");
    eventually("policyctl talks to the dispatcher over TLS", || {
        let out = std::process::Command::new(bin("policyctl"))
            .args(["--nats-url", &url, "--tls-ca-file", &ca, "subscriptions"])
            .output()
            .expect("policyctl");
        async move {
            out.status
                .success()
                .then_some(())
                .ok_or(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .await;
    // Without the CA, the server's certificate is not trusted: one line, and no connection.
    let out = std::process::Command::new(bin("policyctl"))
        .args(["--nats-url", &url, "subscriptions"])
        .output()
        .expect("policyctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "connected without trusting the server"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    drop(server);
}

/// A third-party agent in Python (nats-py) logs in with the seed file `policyctl auth
/// add-agent` wrote, exactly as written: a bare seed, as `nk` writes one (nats-py refuses a
/// file with comment lines around the seed), and answers for its kind on the secured bus.
#[tokio::test(flavor = "multi_thread")]
async fn a_python_agent_logs_in_with_its_roles_seed_file_as_written() {
    use std::io::BufRead;
    let mut engine = Engine::secured();
    engine.start(&["acl"]).await;
    let dir = engine.add_agent_role("geo");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/geo_agent.py");
    let mut agent = std::process::Command::new(e2e::tool("python"))
        .arg(script)
        .arg(engine.url())
        .arg(dir.join("agent-geo.nk"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python agent");
    let stdout = agent.stdout.take().expect("stdout");
    let ready = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .next()
            .and_then(Result::ok)
    });
    let line = tokio::time::timeout(WAIT, ready).await;
    if !matches!(&line, Ok(Ok(Some(l))) if l == "ready") {
        let _ = agent.kill();
        let mut err = String::new();
        use std::io::Read;
        let _ = agent.stderr.take().map(|mut e| e.read_to_string(&mut err));
        panic!("the Python agent never got ready: {line:?}\n{err}");
    }
    geo_answers(&engine, "the Python agent answers on the secured bus").await;
    let _ = agent.kill();
    let _ = agent.wait();
}
