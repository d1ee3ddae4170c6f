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

mod kit;

use std::time::Duration;

use async_nats::HeaderMap;
use e2e::Engine;
use serde_json::json;

use crate::*;
use kit::*;

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
    // And a policy's slot stream, with the same extras and no limit.
    let slots = js_call(
        &limiter,
        format!("{limiter_api}.STREAM.CREATE.{SLOTS_DB}"),
        json!({
            "name": SLOTS_DB,
            "subjects": ["$SLOT.policy_conns.db.*", "policy.tap.>"],
            "max_msgs_per_subject": 1,
            "discard": "new",
            "republish": {"src": "$SLOT.policy_conns.db.*", "dest": "$KV.policy_config.x"},
            "sources": [{"name": "KV_policy_config"}],
        }),
    )
    .await;
    let said_slots = slots["error"]["description"]
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
    let slots = js_call(
        &limiter,
        format!("{limiter_api}.STREAM.INFO.{SLOTS_DB}"),
        json!({}),
    )
    .await;
    let now = &slots["config"];
    let slot_routes = format!(
        "now subjects {}, max_msgs {}, republish {}, sources {}",
        now["subjects"],
        now["max_msgs"],
        now.get("republish").unwrap_or(&json!(null)),
        now.get("sources").unwrap_or(&json!(null))
    );
    if now["subjects"] != json!(["$SLOT.policy_conns.db.*"])
        || now["max_msgs"] != json!(1000)
        || now.get("republish").is_some()
        || now
            .get("sources")
            .is_some_and(|s| s.as_array().is_some_and(|a| !a.is_empty()))
    {
        config_changes.push(format!("the slot stream kept its extras: {slot_routes}"));
    }
    battery.rows.push((
        format!("agent-conn-limit: its bucket and a policy's slot stream first, with extra subjects, a republish into the config and a source of it [{said_create}; {routes}] [{said_slots}; {slot_routes}]"),
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
        "$SLOT.policy_conns.db.victim",
        "policy._js.conns.API.$SLOT.policy_conns.db.victim",
        "$JS.API.STREAM.MSG.DELETE.SLOTS_policy_conns_db",
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
            "$KV.policy_conns.closed.c1",
            "$SLOT.policy_conns.db.c1",
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
