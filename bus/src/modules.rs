//! The WebAssembly modules of deployed agent kinds: a JetStream object store (one object per
//! kind, named by it), written by the dispatcher on `agent-deploy` and watched by every wasm
//! host. A module rarely exceeds a few hundred KiB; JetStream chunks it.

use async_nats::jetstream::object_store;

use crate::admin::Module;
use crate::error::ConfigError;
use crate::store::{Jet, Store};
use crate::subject::Subjects;

/// The services API metadata key under which a wasm host's kind says the digest of the
/// module version it serves (as the store's object info gives it): `agent deploy` waits until
/// every host's says the new one.
pub const SERVED: &str = "module";

/// Bytes the store may hold: every module with room for a new version of each.
const MAX_BYTES: i64 = 256 * 1024 * 1024;

/// Opens the modules store; `create` (the dispatcher) creates it on first use.
pub async fn open(
    client: &async_nats::Client,
    subjects: &Subjects,
    replicas: usize,
    create: bool,
) -> Result<object_store::ObjectStore, ConfigError> {
    let jet = Jet::reach(client, subjects, Store::Modules).await?;
    let js = jet.context();
    let bucket = subjects.modules_bucket();
    let missing = match js.get_object_store(&bucket).await {
        Ok(store) => return Ok(store),
        Err(e) => e,
    };
    if !create {
        return Err(ConfigError::Open {
            bucket,
            source: format!(
                "{missing} (policy-dispatcher creates it on the first deploy){}",
                jet.hint()
            )
            .into(),
        });
    }
    let config = object_store::Config {
        bucket: bucket.clone(),
        description: Some("policy-bus WebAssembly agent modules".into()),
        max_bytes: MAX_BYTES,
        num_replicas: replicas.max(1),
        ..Default::default()
    };
    match js
        .create_stream(crate::streams::object_stream(config))
        .await
    {
        Ok(_) => js.get_object_store(&bucket).await.map_err(ConfigError::io),
        // Another dispatcher may have created it meanwhile.
        Err(e) => js
            .get_object_store(&bucket)
            .await
            .map_err(|_| ConfigError::io(e)),
    }
}

/// How `agent-list` shows a stored module.
pub fn describe(info: &object_store::ObjectInfo) -> Module {
    // async-nats keeps the time as `time::OffsetDateTime`; its JSON form is RFC 3339 already.
    let modified = serde_json::to_value(info)
        .ok()
        .and_then(|v| v.get("mtime").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_default();
    Module {
        kind: info.name.clone(),
        size: info.size as u64,
        digest: info.digest.clone().unwrap_or_default(),
        modified,
    }
}
