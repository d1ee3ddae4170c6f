//! What the confused-deputy battery works with: logging in as a role's identities, raw
//! JetStream calls, snapshots of everything that must not change, and the battery's record.

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
pub(super) async fn identity(
    engine: &Engine,
    role: &str,
    store: bool,
) -> Option<async_nats::ConnectOptions> {
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
pub(super) async fn login(engine: &Engine, role: &str, store: bool) -> Option<async_nats::Client> {
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
pub(super) async fn jet_login(engine: &Engine, role: &str) -> async_nats::Client {
    match login(engine, role, true).await {
        Some(c) => c,
        None => login(engine, role, false).await.expect("role seed"),
    }
}

/// Where `stream` answers the JetStream API over `client`: the store identities' prefix, or
/// the server's own.
pub(super) async fn api(client: &async_nats::Client, stream: &str) -> String {
    for prefix in ["policy._js.API", "policy._js.conns.API", "$JS.API"] {
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
pub(super) async fn js_call(
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
pub(super) struct Snapshot {
    streams: BTreeMap<&'static str, Option<(u64, u64)>>,
    pub(super) config: BTreeMap<String, Vec<u8>>,
}

/// The identities a snapshot reads with: each store's owner.
pub(super) struct Readers {
    dispatcher: (async_nats::Client, String),
    conns: (async_nats::Client, String),
    rates: (async_nats::Client, String),
}

impl Readers {
    pub(super) async fn new(engine: &Engine) -> Readers {
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

    pub(super) async fn snapshot(&self) -> Snapshot {
        let mut streams = BTreeMap::new();
        for (stream, (client, api)) in [
            ("KV_policy_config", &self.dispatcher),
            ("OBJ_policy_modules", &self.dispatcher),
            ("policy_decisions", &self.dispatcher),
            ("KV_policy_conns", &self.conns),
            (SLOTS_DB, &self.conns),
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
pub(super) fn changes(before: &Snapshot, after: &Snapshot) -> Vec<String> {
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
pub(super) async fn decisions_right(hook: &bus::Client) -> Result<(), String> {
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
pub(super) struct Battery {
    pub(super) readers: Readers,
    pub(super) hook: bus::Client,
    pub(super) rows: Vec<(String, Vec<String>, Result<(), String>)>,
}

impl Battery {
    /// Runs one attempt and records what it changed and whether decisions stayed right.
    pub(super) async fn attempt(
        &mut self,
        name: &str,
        attack: impl std::future::Future<Output = String>,
    ) {
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
    pub(super) async fn attempt_deciding(
        &mut self,
        name: &str,
        attack: impl std::future::Future<Output = String>,
    ) {
        self.attempt(name, attack).await;
        if let Some((_, changed, _)) = self.rows.last_mut() {
            changed.retain(|c| {
                ![
                    "KV_policy_conns:",
                    "SLOTS_",
                    "KV_policy_rates:",
                    "policy_decisions:",
                ]
                .iter()
                .any(|s| c.starts_with(s))
            });
        }
    }

    pub(super) fn report(&self) -> String {
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
pub(super) async fn aim(
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

/// The slot stream of the battery's conn-limit policy `db`.
pub(super) const SLOTS_DB: &str = "SLOTS_policy_conns_db";
pub(super) const SUB_ACL: &str = "$KV.policy_config.sub.new-connection.acl";
pub(super) const POL_WEB: &str = "$KV.policy_config.pol.acl.web-to-db";
