//! The confused-deputy battery: an attacker holding one role's seeds on the secured bus tries to
//! make another process, or nats-server itself, write for it: replies aimed at a bucket's key,
//! at the JetStream API or at another process's subjects; JetStream's own deliveries, direct
//! gets and pull responses aimed the same way; consumers without end; a limiter bucket created
//! first with extras. After each attempt the configuration, the limiter buckets, the modules
//! store and the decision log must be as they were, and decisions still right.
//!
//! The attacker logs in with the files `policyctl auth` wrote, as any NATS client would, and
//! uses only raw NATS: so this file also runs against an engine from before store identities
//! (it then uses the role's one identity and `$JS.API`), which is how the closing note's
//! "before" column was measured.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use bus::roles::Role;
use bus::Action;
use e2e::Engine;
use serde_json::json;

use crate::*;

/// How `role`'s messaging or store identity logs in: with its `.creds` file in operator mode,
/// else with its seed (`None` when it has no such identity).
async fn identity(engine: &Engine, role: &str, store: bool) -> Option<async_nats::ConnectOptions> {
    let messaging = engine.seed(&Role::parse(role).expect("role"))?;
    let file = if store {
        messaging.with_file_name(format!("{role}.store.nk"))
    } else {
        messaging
    };
    if engine.creds {
        let creds = file.with_extension("creds");
        if !creds.exists() {
            return None;
        }
        return Some(
            async_nats::ConnectOptions::with_credentials_file(creds)
                .await
                .expect("creds file"),
        );
    }
    let text = std::fs::read_to_string(&file).ok()?;
    let seed = text
        .lines()
        .find(|l| l.starts_with("SU"))?
        .trim()
        .to_string();
    Some(async_nats::ConnectOptions::with_nkey(seed))
}

/// Logs in as `role`'s messaging identity, or its store identity where it has one (`None`
/// when it has none).
async fn login(engine: &Engine, role: &str, store: bool) -> Option<async_nats::Client> {
    let inbox = if store {
        format!("_INBOX.policy.{role}.store")
    } else {
        format!("_INBOX.policy.{role}")
    };
    let client = identity(engine, role, store)
        .await?
        .custom_inbox_prefix(inbox)
        .connect(engine.url())
        .await
        .expect("log in");
    Some(client)
}

/// The identity that reaches JetStream as `role`: its store identity, else its only one.
async fn jet_login(engine: &Engine, role: &str) -> async_nats::Client {
    match login(engine, role, true).await {
        Some(c) => c,
        None => login(engine, role, false).await.expect("role seed"),
    }
}

/// Where `stream` answers the JetStream API over `client`: the store identities' prefix, or
/// the server's own.
async fn api(client: &async_nats::Client, stream: &str) -> String {
    for prefix in ["policy._js.API", "$JS.API"] {
        let request = async_nats::Request::new().timeout(Some(Duration::from_secs(1)));
        if client
            .send_request(format!("{prefix}.STREAM.INFO.{stream}"), request)
            .await
            .is_ok()
        {
            return prefix.to_string();
        }
    }
    "$JS.API".into()
}

/// A JetStream API call as raw JSON.
async fn js_call(
    client: &async_nats::Client,
    subject: String,
    body: serde_json::Value,
) -> serde_json::Value {
    let request = async_nats::Request::new()
        .payload(body.to_string().into())
        .timeout(Some(Duration::from_secs(2)));
    match client.send_request(subject, request).await {
        Ok(m) => serde_json::from_slice(&m.payload).unwrap_or(json!({"raw": true})),
        Err(e) => json!({"error": {"description": e.to_string()}}),
    }
}

/// What must not change: every stream's (messages, last sequence) and the config's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    streams: BTreeMap<&'static str, Option<(u64, u64)>>,
    config: BTreeMap<String, Vec<u8>>,
}

/// The identities a snapshot reads with: each store's owner.
struct Readers {
    dispatcher: (async_nats::Client, String),
    conns: (async_nats::Client, String),
    rates: (async_nats::Client, String),
}

impl Readers {
    async fn new(engine: &Engine) -> Readers {
        let with_api = |stream: &'static str, role: &'static str| async move {
            let c = jet_login(engine, role).await;
            let a = api(&c, stream).await;
            (c, a)
        };
        Readers {
            dispatcher: with_api("KV_policy_config", "dispatcher").await,
            conns: with_api("KV_policy_conns", "agent-conn-limit").await,
            rates: with_api("KV_policy_rates", "agent-rate-limit").await,
        }
    }

    async fn snapshot(&self) -> Snapshot {
        let mut streams = BTreeMap::new();
        for (stream, (client, api)) in [
            ("KV_policy_config", &self.dispatcher),
            ("OBJ_policy_modules", &self.dispatcher),
            ("policy_decisions", &self.dispatcher),
            ("KV_policy_conns", &self.conns),
            ("KV_policy_rates", &self.rates),
        ] {
            let info = js_call(client, format!("{api}.STREAM.INFO.{stream}"), json!({})).await;
            let state = info.get("state").map(|s| {
                (
                    s["messages"].as_u64().unwrap_or(0),
                    s["last_seq"].as_u64().unwrap_or(0),
                )
            });
            streams.insert(stream, state);
        }
        let (client, api) = &self.dispatcher;
        let js = async_nats::jetstream::with_prefix(client.clone(), api);
        let mut config = BTreeMap::new();
        if let Ok(kv) = js.get_key_value("policy_config").await {
            use futures::TryStreamExt;
            let keys: Vec<String> = match kv.keys().await {
                Ok(k) => k.try_collect().await.unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            for k in keys {
                if let Ok(Some(v)) = kv.get(&k).await {
                    config.insert(k, v.to_vec());
                }
            }
        }
        Snapshot { streams, config }
    }
}

/// What changed between two snapshots, in words; empty when nothing did.
fn changes(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (stream, b) in &before.streams {
        let a = after.streams.get(stream).copied().flatten();
        if *b != a {
            out.push(format!("{stream}: {b:?} -> {a:?}"));
        }
    }
    for (k, v) in &before.config {
        match after.config.get(k) {
            None => out.push(format!("config key {k} deleted")),
            Some(w) if w != v => out.push(format!("config key {k} rewritten")),
            _ => {}
        }
    }
    for k in after.config.keys() {
        if !before.config.contains_key(k) {
            out.push(format!("config key {k} added"));
        }
    }
    out
}

/// web -> db allowed to p2 and admitted, batch -> billing denied by the ACL's default; the
/// admitted connection is closed again so no slot stays held.
async fn decisions_right(hook: &bus::Client) -> Result<(), String> {
    let d = hook
        .new_connection(&conn("web", "db", &["p1", "p2"]))
        .await
        .map_err(|e| format!("web -> db: {e}"))?;
    if d.action != Action::Allow
        || d.target_peer.as_deref() != Some("p2")
        || effects(&d.reasons, "acl") != [pair("web-to-db", "allow")]
    {
        return Err(format!("web -> db: {d:?}"));
    }
    hook.connection_closed(&bus::event::ConnectionClosed {
        connection_id: d.connection_id.clone().unwrap_or_default(),
        src_service: "web".into(),
        dst_service: "db".into(),
        target_peer: d.target_peer.clone(),
    })
    .await
    .map_err(|e| format!("close: {e}"))?;
    let d = hook
        .new_connection(&conn("batch", "billing", &["p1"]))
        .await
        .map_err(|e| format!("batch -> billing: {e}"))?;
    if d.action != Action::Deny {
        return Err(format!("batch -> billing: {d:?}"));
    }
    Ok(())
}

/// The battery's record: one row per attempt.
struct Battery {
    readers: Readers,
    hook: bus::Client,
    rows: Vec<(String, Vec<String>, Result<(), String>)>,
}

impl Battery {
    /// Runs one attempt and records what it changed and whether decisions stayed right.
    async fn attempt(&mut self, name: &str, attack: impl std::future::Future<Output = String>) {
        // The last check's decision log record is published after its answer: wait for it.
        let mut before = self.readers.snapshot().await;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let again = self.readers.snapshot().await;
            if again == before {
                break;
            }
            before = again;
        }
        let said = attack.await;
        // What the attempt set off (a reply, a delivery) has long landed by then.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = self.readers.snapshot().await;
        let changed = changes(&before, &after);
        let decided = decisions_right(&self.hook).await;
        let name = if said.is_empty() {
            name.to_string()
        } else {
            format!("{name} [{said}]")
        };
        self.rows.push((name, changed, decided));
    }

    /// [`Self::attempt`] for an attempt that itself asks for decisions: what those write (the
    /// limiter buckets, the decision log) is theirs; the configuration and the modules must
    /// still be as they were.
    async fn attempt_deciding(
        &mut self,
        name: &str,
        attack: impl std::future::Future<Output = String>,
    ) {
        self.attempt(name, attack).await;
        if let Some((_, changed, _)) = self.rows.last_mut() {
            changed.retain(|c| {
                !["KV_policy_conns:", "KV_policy_rates:", "policy_decisions:"]
                    .iter()
                    .any(|s| c.starts_with(s))
            });
        }
    }

    fn report(&self) -> String {
        let mut out = String::from("| attempt | changed | decisions |\n| --- | --- | --- |\n");
        for (name, changed, decided) in &self.rows {
            let changed = if changed.is_empty() {
                "nothing".to_string()
            } else {
                changed.join("; ")
            };
            let decided = match decided {
                Ok(()) => "right".to_string(),
                Err(e) => format!("WRONG: {e}"),
            };
            out.push_str(&format!("| {name} | {changed} | {decided} |\n"));
        }
        out
    }
}

/// Publishes `payload` to `subject` with reply `reply`, flushed.
async fn aim(
    client: &async_nats::Client,
    subject: &str,
    reply: &str,
    headers: HeaderMap,
    payload: Vec<u8>,
) {
    let _ = client
        .publish_with_reply_and_headers(
            subject.to_string(),
            reply.to_string(),
            headers,
            payload.into(),
        )
        .await;
    let _ = client.flush().await;
}

const SUB_ACL: &str = "$KV.policy_config.sub.new-connection.acl";
const POL_WEB: &str = "$KV.policy_config.pol.acl.web-to-db";

#[tokio::test(flavor = "multi_thread")]
async fn no_role_can_make_another_process_or_the_server_write_for_it() {
    battery(Engine::secured()).await;
}

/// The same battery in NATS's operator mode: the accounts, exports (with activations) and
/// imports as JWTs, every identity logging in with its `.creds`.
#[tokio::test(flavor = "multi_thread")]
async fn in_operator_mode_no_role_can_make_another_process_or_the_server_write_for_it() {
    battery(Engine::secured_by_jwt()).await;
}

async fn battery(mut engine: Engine) {
    // A native third-party kind with a role of its own, as `policyctl auth add-agent` makes one.
    engine.add_agent_role("geo");
    engine.start(&["acl", "lb", "rate-limit"]).await;
    let metrics = format!("127.0.0.1:{}", e2e::free_port());
    engine.agent("monitor", &["--metrics-addr", &metrics]);
    engine.agent("wasm", &[]);
    engine.wait_instances("policy-agent-monitor", 1).await;
    engine.wait_instances("policy-agent-wasm", 1).await;
    let admin = engine.admin().await;
    // A deployed module, so that the modules store exists.
    let wat = format!("{EXAMPLES}/wasm/allow-v1.wat");
    let (code, _, err) = policyctl(&engine, &["agent", "deploy", "wasmgeo", &wat]);
    assert_eq!(code, Some(0), "{err}");

    // A limiter's role creates its bucket first, with extras, while it is absent (conn-limit
    // not started yet): extra subjects, a republish into the config, a source of the config.
    let limiter = jet_login(&engine, "agent-conn-limit").await;
    let limiter_api = api(&limiter, "KV_policy_conns").await;
    let created = js_call(
        &limiter,
        format!("{limiter_api}.STREAM.CREATE.KV_policy_conns"),
        json!({
            "name": "KV_policy_conns",
            "subjects": ["$KV.policy_conns.>", "policy.event.>", "_INBOX.>"],
            "max_msgs_per_subject": 1,
            "max_age": 3_600_000_000_000u64,
            "allow_rollup_hdrs": true,
            "deny_delete": true,
            "allow_direct": true,
            "discard": "new",
            "republish": {"src": "$KV.policy_conns.>", "dest": "$KV.policy_config.>"},
            "sources": [{"name": "KV_policy_config"}],
        }),
    )
    .await;
    let said_create = created["error"]["description"]
        .as_str()
        .map(|e| format!("refused: {e}"))
        .unwrap_or_else(|| "created".into());
    engine.agent("conn-limit", &[]);
    engine.wait_instances("policy-agent-conn-limit", 1).await;

    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "lb", 20),
            sub("new-connection", "conn-limit", 30),
            sub("new-connection", "rate-limit", 40),
            sub("connection-closed", "conn-limit", 10),
            sub(bus::event::PEER_REMOVED, "lb", 10),
            sub(bus::event::PEER_ADDED, "lb", 10),
        ],
    )
    .await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "web-to-db", "match": {"src_service": "web", "dst_service": "db"}, "action": "allow"})),
            doc(json!({"agent": "lb", "id": "db", "dst_service": "db", "scheme": "static", "peer": "p2"})),
            doc(json!({"agent": "conn-limit", "id": "db", "match": {"dst_service": "db"}, "max_connections": 1000})),
            doc(json!({"agent": "rate-limit", "id": "db", "match": {"dst_service": "db"}, "rate": "100000/s"})),
        ])
        .await
        .expect("policies");
    let hook = engine.hook().await;
    eventually("decisions are right", || decisions_right(&hook)).await;

    // A removed peer added back: a delete marker in the config bucket.
    let change = bus::clusterlink::PeerChange {
        peer: "p9".into(),
        labels: None,
    };
    let _: bus::State = hook
        .decide(bus::event::PEER_REMOVED, &change)
        .await
        .expect("peer removed");
    let readers = Readers::new(&engine).await;
    let peer_key = readers
        .snapshot()
        .await
        .config
        .keys()
        .find(|k| k.starts_with("peer."))
        .cloned()
        .expect("a removed peer's key");
    let _: bus::State = hook
        .decide(bus::event::PEER_ADDED, &change)
        .await
        .expect("peer added");

    let mut battery = Battery {
        readers,
        hook: engine.hook().await,
        rows: Vec::new(),
    };
    // The first row: the bucket created with extras, now that conn-limit has written to it.
    let before_extras = battery.readers.snapshot().await;
    for _ in 0..3 {
        let _ = decisions_right(&battery.hook).await;
    }
    let after_extras = battery.readers.snapshot().await;
    let config_changes: Vec<String> = changes(&before_extras, &after_extras)
        .into_iter()
        .filter(|c| c.starts_with("config key"))
        .collect();
    let info = js_call(
        &limiter,
        format!("{limiter_api}.STREAM.INFO.KV_policy_conns"),
        json!({}),
    )
    .await;
    let now = &info["config"];
    let routes = format!(
        "now subjects {}, republish {}, sources {}",
        now["subjects"],
        now.get("republish").unwrap_or(&json!(null)),
        now.get("sources").unwrap_or(&json!(null))
    );
    let mut config_changes = config_changes;
    if now["subjects"] != json!(["$KV.policy_conns.>"])
        || now.get("republish").is_some()
        || now
            .get("sources")
            .is_some_and(|s| s.as_array().is_some_and(|a| !a.is_empty()))
    {
        config_changes.push(format!("the bucket kept its extras: {routes}"));
    }
    battery.rows.push((
        format!("agent-conn-limit: its bucket first, with extra subjects, a republish into the config and a source of it [{said_create}; {routes}]"),
        config_changes,
        decisions_right(&battery.hook).await,
    ));

    let gateway = login(&engine, "gateway", false).await.expect("gateway");
    let event = rmp_serde::to_vec_named(&conn("web", "db", &["p1", "p2"])).expect("encode");
    let deadline = || {
        let mut h = HeaderMap::new();
        h.insert("Policy-Deadline", "1");
        h
    };
    let js_targets = [
        SUB_ACL,
        POL_WEB,
        "policy._js.API.$KV.policy_config.sub.new-connection.acl",
        "$JS.API.STREAM.PURGE.KV_policy_conns",
        "$JS.API.STREAM.PURGE.KV_policy_rates",
        "$JS.API.STREAM.PURGE.KV_policy_config",
        "$JS.API.STREAM.DELETE.KV_policy_config",
        "$JS.API.STREAM.LEADER.STEPDOWN.KV_policy_config",
        "$O.policy_modules.M.geo",
    ];
    for target in js_targets {
        battery
            .attempt(&format!("gateway: an event, reply {target}"), async {
                aim(
                    &gateway,
                    "policy.event.new-connection",
                    target,
                    HeaderMap::new(),
                    event.clone(),
                )
                .await;
                String::new()
            })
            .await;
    }
    for target in [SUB_ACL, POL_WEB] {
        battery
            .attempt(
                &format!("gateway: an event with Policy-Deadline: 1, reply {target}"),
                async {
                    aim(
                        &gateway,
                        "policy.event.new-connection",
                        target,
                        deadline(),
                        event.clone(),
                    )
                    .await;
                    String::new()
                },
            )
            .await;
    }
    battery
        .attempt("gateway: a bad payload, reply $KV config key", async {
            aim(
                &gateway,
                "policy.event.new-connection",
                SUB_ACL,
                HeaderMap::new(),
                b"\xc1".to_vec(),
            )
            .await;
            String::new()
        })
        .await;
    battery
        .attempt(
            "gateway: positional fields, reply $JS.API.STREAM.PURGE.KV_policy_config",
            async {
                let positional = rmp_serde::to_vec(&("web", "db")).expect("encode");
                aim(
                    &gateway,
                    "policy.event.new-connection",
                    "$JS.API.STREAM.PURGE.KV_policy_config",
                    HeaderMap::new(),
                    positional,
                )
                .await;
                String::new()
            },
        )
        .await;

    let operator = login(&engine, "operator", false).await.expect("operator");
    battery
        .attempt("operator: admin policy-list, reply $KV config key", async {
            aim(
                &operator,
                "policy.admin.policy-list",
                POL_WEB,
                HeaderMap::new(),
                vec![0x80],
            )
            .await;
            String::new()
        })
        .await;
    for ping in [
        "$SRV.PING",
        "$SRV.INFO.policy-dispatcher",
        "$SRV.STATS.policy-agent-acl",
    ] {
        battery
            .attempt(&format!("operator: {ping}, reply $KV config key"), async {
                aim(&operator, ping, SUB_ACL, HeaderMap::new(), Vec::new()).await;
                String::new()
            })
            .await;
    }

    // JetStream as the deputy, from a reader of the config.
    for (who, store) in [("agent-acl", true), ("agent-acl", false)] {
        let Some(acl) = login(&engine, who, store).await else {
            continue;
        };
        let identity = if store {
            "store identity"
        } else {
            "messaging identity"
        };
        let acl_api = api(&acl, "KV_policy_config").await;
        let marker = format!("{acl_api}.DIRECT.GET.KV_policy_config.$KV.policy_config.{peer_key}");
        for target in [SUB_ACL, "$KV.policy_config.sub.new-connection.conn-limit"] {
            battery
                .attempt(
                    &format!(
                        "agent-acl ({identity}): direct get of a delete marker, reply {target}"
                    ),
                    async {
                        aim(&acl, &marker, target, HeaderMap::new(), Vec::new()).await;
                        String::new()
                    },
                )
                .await;
        }
        battery
            .attempt(
                &format!("agent-acl ({identity}): direct get of a policy, reply another key"),
                async {
                    let get = format!(
                        "{acl_api}.DIRECT.GET.KV_policy_config.$KV.policy_config.pol.acl.web-to-db"
                    );
                    aim(&acl, &get, SUB_ACL, HeaderMap::new(), Vec::new()).await;
                    String::new()
                },
            )
            .await;
        for deliver in [
            SUB_ACL,
            "$KV.policy_conns.slot.db.0",
            "$JS.API.STREAM.PURGE.KV_policy_config",
            "policy.agent.conn-limit.connection-closed",
            "policy.admin.policy-remove",
        ] {
            battery
                .attempt(&format!("agent-acl ({identity}): a push consumer on the config delivering to {deliver}"), async {
                    let r = js_call(&acl, format!("{acl_api}.CONSUMER.CREATE.KV_policy_config"), json!({
                        "stream_name": "KV_policy_config",
                        "config": {"deliver_subject": deliver, "deliver_policy": "all", "ack_policy": "none"},
                    })).await;
                    r["error"]["description"].as_str().map(|e| format!("refused: {e}")).unwrap_or_else(|| "created".into())
                })
                .await;
        }
        battery
            .attempt(&format!("agent-acl ({identity}): a pull request whose reply is a config key"), async {
                let r = js_call(&acl, format!("{acl_api}.CONSUMER.CREATE.KV_policy_config.pull1"), json!({
                    "stream_name": "KV_policy_config",
                    "config": {"name": "pull1", "ack_policy": "none", "deliver_policy": "all"},
                })).await;
                aim(&acl, &format!("{acl_api}.CONSUMER.MSG.NEXT.KV_policy_config.pull1"), SUB_ACL, HeaderMap::new(), br#"{"batch":10}"#.to_vec()).await;
                r["error"]["description"].as_str().map(|e| format!("create refused: {e}")).unwrap_or_default()
            })
            .await;
        // Consumers without end: created until refused, the engine deciding while the bound
        // is full, then removed (a snapshot reads the bucket through consumers too).
        let hook = engine.hook().await;
        battery
            .attempt_deciding(
                &format!("agent-acl ({identity}): 1000 durable consumers on the config"),
                async {
                    let mut made = Vec::new();
                    let mut said = format!("all {} created", 1000);
                    let mut threshold = 0;
                    for i in 0..1000 {
                        let name = format!("flood{i}");
                        let r = js_call(
                            &acl,
                            format!("{acl_api}.CONSUMER.CREATE.KV_policy_config.{name}"),
                            json!({
                                "stream_name": "KV_policy_config",
                                "config": {"durable_name": name, "ack_policy": "none"},
                            }),
                        )
                        .await;
                        if let Some(e) = r["error"]["description"].as_str() {
                            said = format!("refused after {i}: {e}");
                            break;
                        }
                        if i == 0 {
                            threshold = r["config"]["inactive_threshold"].as_u64().unwrap_or(0);
                        }
                        made.push(name);
                    }
                    let full = match decisions_right(&hook).await {
                        Ok(()) => "decisions right while full".to_string(),
                        Err(e) => format!("WRONG while full: {e}"),
                    };
                    for name in made {
                        let _ = js_call(
                            &acl,
                            format!("{acl_api}.CONSUMER.DELETE.KV_policy_config.{name}"),
                            json!({}),
                        )
                        .await;
                    }
                    format!(
                        "{said}; a durable's inactive threshold {} s; {full}",
                        threshold / 1_000_000_000
                    )
                },
            )
            .await;
    }

    // The wasm host, at a native kind: its queue group, its events, its services ping.
    battery
        .attempt(
            "wasm-host: a queue subscription to geo's events in group geo, and geo's services ping",
            async {
                let (tx, mut refused) = tokio::sync::mpsc::unbounded_channel::<String>();
                let watcher = identity(&engine, "wasm-host", false)
                    .await
                    .expect("the wasm host's identity")
                    .custom_inbox_prefix("_INBOX.policy.wasm-host")
                    .event_callback(move |e| {
                        let tx = tx.clone();
                        async move {
                            if let async_nats::Event::ServerError(e) = e {
                                let _ = tx.send(e.to_string());
                            }
                        }
                    })
                    .connect(engine.url())
                    .await
                    .expect("log in");
                let _q = watcher
                    .queue_subscribe("policy.agent.geo.>", "geo".into())
                    .await;
                let _p = watcher.subscribe("$SRV.PING.policy-agent-geo").await;
                let _ = watcher.flush().await;
                let mut said = Vec::new();
                while let Ok(Some(e)) =
                    tokio::time::timeout(Duration::from_millis(500), refused.recv()).await
                {
                    said.push(e);
                }
                if said.len() == 2 {
                    "both refused by the server".into()
                } else {
                    format!("WRONG: the server said {said:?}")
                }
            },
        )
        .await;

    // JetStream as the deputy across stores: a reader of the modules aims into the config.
    let host = jet_login(&engine, "wasm-host").await;
    let host_api = api(&host, "OBJ_policy_modules").await;
    battery
        .attempt("wasm-host: a push consumer on the modules delivering to a config key", async {
            let r = js_call(&host, format!("{host_api}.CONSUMER.CREATE.OBJ_policy_modules"), json!({
                "stream_name": "OBJ_policy_modules",
                "config": {"deliver_subject": SUB_ACL, "deliver_policy": "all", "ack_policy": "none"},
            })).await;
            r["error"]["description"].as_str().map(|e| format!("refused: {e}")).unwrap_or_else(|| "created".into())
        })
        .await;
    let operator_js = jet_login(&engine, "operator").await;
    let log_api = api(&operator_js, "policy_decisions").await;
    battery
        .attempt("operator: a push consumer on the decision log delivering to a config key and the tap", async {
            let mut said = Vec::new();
            for deliver in [SUB_ACL, "policy.tap.new-connection"] {
                let r = js_call(&operator_js, format!("{log_api}.CONSUMER.CREATE.policy_decisions"), json!({
                    "stream_name": "policy_decisions",
                    "config": {"deliver_subject": deliver, "deliver_policy": "all", "ack_policy": "none"},
                })).await;
                said.push(r["error"]["description"].as_str().map(|e| format!("refused: {e}")).unwrap_or_else(|| "created".into()));
            }
            said.join(", ")
        })
        .await;

    let report = battery.report();
    println!("{report}");
    let bad: Vec<_> = battery
        .rows
        .iter()
        .filter(|(name, changed, decided)| {
            !changed.is_empty() || decided.is_err() || name.contains("WRONG")
        })
        .collect();
    assert!(bad.is_empty(), "attempts that got through:\n{report}");
    assert!(
        engine.exited().is_empty(),
        "processes exited: {:?}",
        engine.exited()
    );
}
