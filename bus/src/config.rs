//! The configuration bucket: subscriptions and policies in a JetStream key-value store, so
//! that every instance converges on the same set and restarts lose nothing.
//!
//! Keys: `sub.<event>.<kind>` holds a [`crate::admin::Subscription`];
//! `pol.<kind>.<id>` holds a policy document. Values are MessagePack maps. At a site of a
//! fleet, the same keys under `fleet.` are the fleet's documents (see [`crate::fleet`]).

use std::time::Duration;

use async_nats::jetstream::kv;

pub use crate::error::ConfigError;
use crate::fleet::{split_level, Level};
use crate::store::{Jet, Store};
use crate::subject::{Kind, Subjects};

/// How many past values JetStream keeps per key; enough to see what an operator just changed.
const HISTORY: i64 = 5;
/// Bytes the config bucket may hold: thousands of policies with their history. Only the
/// dispatcher writes it, and a full bucket refuses a `policy-add` rather than grow.
const MAX_BYTES: i64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigKey {
    Subscription {
        event: String,
        kind: String,
        level: Level,
    },
    Policy {
        kind: String,
        id: String,
        level: Level,
    },
}

impl ConfigKey {
    pub fn subscription(event: &str, kind: &str) -> String {
        format!("sub.{event}.{kind}")
    }
    pub fn policy(kind: &str, id: &str) -> String {
        format!("pol.{kind}.{id}")
    }
    /// The key filters for one kind's policies, the site's and the fleet's.
    pub fn policies_of(kind: &Kind) -> Vec<String> {
        let site = format!("pol.{kind}.>");
        vec![format!("{}{site}", crate::fleet::FLEET_KEYS), site]
    }

    /// The key of a peer taken out of the candidates by `peer-removed`, until `peer-added`
    /// (`peer.<token>`; the value is the peer's name).
    pub fn removed_peer(name: &str) -> String {
        format!("{PEER_PREFIX}{}", key_token(name))
    }

    /// Whether `key` is a removed peer's.
    pub fn is_removed_peer(key: &str) -> bool {
        key.starts_with(PEER_PREFIX)
    }

    pub fn parse(key: &str) -> Option<ConfigKey> {
        let (level, key) = split_level(key);
        let mut parts = key.splitn(3, '.');
        let (tag, a, b) = (parts.next()?, parts.next()?, parts.next()?);
        match tag {
            "sub" => Some(ConfigKey::Subscription {
                event: a.into(),
                kind: b.into(),
                level,
            }),
            "pol" => Some(ConfigKey::Policy {
                kind: a.into(),
                id: b.into(),
                level,
            }),
            _ => None,
        }
    }

    pub fn level(&self) -> Level {
        match self {
            ConfigKey::Subscription { level, .. } | ConfigKey::Policy { level, .. } => *level,
        }
    }
}

const PEER_PREFIX: &str = "peer.";

/// A KV key token for any string: kept when it is already `[A-Za-z0-9_-]`, otherwise the hex
/// of a fixed 64-bit hash (so every instance maps it the same way).
pub fn key_token(s: &str) -> String {
    if !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return s.to_string();
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("h{h:016x}")
}

/// Who opens the config bucket: the dispatcher owns it (creates and writes it); every other
/// process only reads it, and waits for a dispatcher to create it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Owner,
    Reader,
}

/// Who opens the config bucket, and, for its owner at a site of a fleet, the hub's JetStream
/// domain its bucket takes the fleet's documents from (see [`crate::fleet`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opening<'a> {
    pub replicas: usize,
    pub access: Access,
    pub fleet_hub: Option<&'a str>,
}

impl Opening<'_> {
    pub fn reader(replicas: usize) -> Self {
        Opening {
            replicas,
            access: Access::Reader,
            fleet_hub: None,
        }
    }
}

/// Opens the config bucket; its owner creates it on first use.
pub async fn open(
    client: &async_nats::Client,
    subjects: &Subjects,
    opening: Opening<'_>,
) -> Result<kv::Store, ConfigError> {
    let Opening {
        replicas,
        access,
        fleet_hub,
    } = opening;
    let config = kv::Config {
        bucket: subjects.config_bucket(),
        description: "policy-bus subscriptions and policies".into(),
        history: HISTORY,
        max_bytes: MAX_BYTES,
        num_replicas: replicas.max(1),
        ..Default::default()
    };
    // On a server that can, the owner creates the bucket able to take atomic batches, so
    // `apply` stores a whole configuration in one step (see `crate::batch`).
    // The server's INFO is only known once connected: a flush waits for that.
    if client.server_info().version.is_empty() {
        let _ = client.flush().await;
    }
    let atomic = crate::batch::server_at_least(&client.server_info().version, 2, 12);
    let jet = Jet::reach(client, subjects, Store::Config).await?;
    let config = kv::Config {
        sources: fleet_hub.map(|hub| vec![crate::fleet::site_source(&jet, subjects, hub)]),
        ..config
    };
    open_or_create(&jet, config, access == Access::Owner, atomic).await
}

/// Opens the config bucket for a long-running process that may start before the server (or
/// its JetStream, or the dispatcher that creates the bucket) is ready: it tries for about a
/// minute, with a warning each time, before it gives up. A server too old for the engine is
/// final at once.
pub async fn open_waiting(
    client: &async_nats::Client,
    subjects: &Subjects,
    opening: Opening<'_>,
) -> Result<kv::Store, ConfigError> {
    let access = opening.access;
    let mut attempt = 0;
    loop {
        match open(client, subjects, opening).await {
            Ok(store) => return Ok(store),
            Err(e @ ConfigError::ServerTooOld { .. }) => return Err(e),
            Err(e) if attempt >= 60 => return Err(e),
            Err(e) => {
                attempt += 1;
                // A reader started next to the dispatcher usually just waits for it a moment.
                if access == Access::Reader && attempt <= 5 {
                    tracing::info!(error = %e, attempt, "waiting for policy-dispatcher to create the config bucket");
                } else {
                    tracing::warn!(error = %e, attempt, "config bucket not available yet; retrying");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Opens a bucket, creating it with `config` on first use when `create`. Every owner may race
/// to create it; the loser of the race just opens it. An existing bucket keeps its own
/// settings.
pub async fn open_bucket(
    jet: &Jet,
    config: kv::Config,
    create: bool,
) -> Result<kv::Store, ConfigError> {
    open_or_create(jet, config, create, false).await
}

async fn open_or_create(
    jet: &Jet,
    config: kv::Config,
    create: bool,
    atomic: bool,
) -> Result<kv::Store, ConfigError> {
    let too_old = || {
        let version = jet.client().server_info().version;
        (!server_supported(&version)).then_some(ConfigError::ServerTooOld { version })
    };
    if let Some(e) = too_old() {
        return Err(e);
    }
    let js = jet.context();
    let bucket = config.bucket.clone();
    let missing = match js.get_key_value(&bucket).await {
        // Its owner runs only on a bucket that routes messages as the engine makes it.
        Ok(store) if create => {
            return crate::streams::repair(&js, store, &crate::streams::kv_stream(config, atomic))
                .await
        }
        Ok(store) => return Ok(store),
        Err(e) => e,
    };
    let source: Box<dyn std::error::Error + Send + Sync> = if create {
        let created = crate::streams::create_bucket(&js, config, atomic)
            .await
            .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) });
        match created {
            Ok(store) => return Ok(store),
            // Another owner may have won the race to create it.
            Err(e) => match js.get_key_value(&bucket).await {
                Ok(store) => return Ok(store),
                Err(_) => e,
            },
        }
    } else {
        format!("{missing} (policy-dispatcher creates it){}", jet.hint()).into()
    };
    Err(too_old().unwrap_or(ConfigError::Open { bucket, source }))
}

/// The engine's JetStream client understands servers from 2.10 on. An empty version means
/// the connection is not up yet; the request that follows will say so itself.
pub fn server_supported(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let v = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    version.is_empty() || v >= (2, 10)
}

/// How long an admin write may take before the caller is told the bucket is unavailable.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert!(!server_supported("2.9.10"));
        assert!(server_supported("2.10.0"));
        assert!(server_supported("2.12.8"));
        assert!(server_supported("3.0.0"));
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(
            ConfigKey::parse(&ConfigKey::subscription("new-connection", "acl")),
            Some(ConfigKey::Subscription {
                event: "new-connection".into(),
                kind: "acl".into(),
                level: Level::Site,
            })
        );
        assert_eq!(
            ConfigKey::parse(&ConfigKey::policy("acl", "r-1")),
            Some(ConfigKey::Policy {
                kind: "acl".into(),
                id: "r-1".into(),
                level: Level::Site,
            })
        );
        assert_eq!(
            ConfigKey::parse("fleet.pol.acl.r-1"),
            Some(ConfigKey::Policy {
                kind: "acl".into(),
                id: "r-1".into(),
                level: Level::Fleet,
            })
        );
        assert_eq!(ConfigKey::parse("fleet.peer.x"), None);
        assert_eq!(ConfigKey::parse("other.a.b"), None);
        assert_eq!(ConfigKey::parse("sub.a"), None);
    }
}
