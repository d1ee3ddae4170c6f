//! How the engine makes its streams, and puts back what someone else changed in them: each
//! store is made with bounds on its consumers, and a bucket whose routing was changed (a role
//! that may create it may have created it first, otherwise) is set right before it is used.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};

use crate::error::ConfigError;

/// The longest a consumer of any store may stay without interest before the server deletes
/// it, durable or not (the stream's consumer limits): a role that creates consumers it never
/// uses holds them this long at most. The engine's own consumers are ordered consumers with a
/// 30 s threshold of their own.
pub const CONSUMER_INACTIVE_MAX: Duration = Duration::from_secs(60);

/// The stream of a key-value bucket, as async-nats would create it, plus what it cannot set:
/// the atomic batches of `apply` (nats-server 2.12 and later) and the consumer limits.
pub fn kv_stream(config: kv::Config, atomic: bool) -> stream::Config {
    let bucket = config.bucket;
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(config.description),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: config.history.max(1),
        max_bytes: config.max_bytes,
        max_age: config.max_age,
        max_message_size: config.max_value_size,
        storage: config.storage,
        num_replicas: config.num_replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        allow_atomic_publish: atomic,
        consumer_limits: Some(consumer_limits()),
        sources: config.sources,
        ..Default::default()
    }
}

/// The stream of an object store, as async-nats would create it, plus the consumer limits.
pub fn object_stream(config: object_store::Config) -> stream::Config {
    let bucket = config.bucket;
    stream::Config {
        name: format!("OBJ_{bucket}"),
        description: config.description,
        subjects: vec![format!("$O.{bucket}.C.>"), format!("$O.{bucket}.M.>")],
        max_age: config.max_age,
        max_bytes: config.max_bytes,
        storage: config.storage,
        num_replicas: config.num_replicas.max(1),
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        allow_direct: true,
        consumer_limits: Some(consumer_limits()),
        ..Default::default()
    }
}

pub fn consumer_limits() -> stream::ConsumerLimits {
    stream::ConsumerLimits {
        inactive_threshold: CONSUMER_INACTIVE_MAX,
        ..Default::default()
    }
}

/// What in `actual` routes messages otherwise than `expected` does: subjects the engine does
/// not give it, a republish, sources other than the expected ones (a site's fleet source),
/// a mirror, a subject transform. A role that may create
/// its bucket could create it so before its process does; its account confines what that
/// reaches (nothing outside), but the process must not run on it either.
pub fn routing_differs(actual: &stream::Config, expected: &stream::Config) -> Vec<&'static str> {
    let mut differs = Vec::new();
    let mut a = actual.subjects.clone();
    let mut e = expected.subjects.clone();
    a.sort();
    e.sort();
    if a != e {
        differs.push("subjects");
    }
    if actual.republish.is_some() {
        differs.push("republish");
    }
    let (a, e) = (
        actual.sources.as_deref().unwrap_or_default(),
        expected.sources.as_deref().unwrap_or_default(),
    );
    if a.len() != e.len()
        || a.iter()
            .zip(e)
            .any(|(a, e)| !crate::source::same_source(a, e))
    {
        differs.push("sources");
    }
    if actual.mirror.is_some() {
        differs.push("mirror");
    }
    if actual.subject_transform.is_some() {
        differs.push("subject transform");
    }
    differs
}

/// Puts back, on a bucket its owner opens, the routing settings the engine gives it (see
/// [`routing_differs`]), keeping its limits; a mirror cannot be undone, and is an error.
pub async fn repair(
    js: &jetstream::Context,
    store: kv::Store,
    expected: &stream::Config,
) -> Result<kv::Store, ConfigError> {
    let actual = store.stream.cached_info().config.clone();
    let differs = routing_differs(&actual, expected);
    if differs.is_empty() {
        return Ok(store);
    }
    let name = actual.name.clone();
    if actual.mirror.is_some() {
        return Err(ConfigError::Io(
            format!(
                "stream {name} is a mirror, which the engine never makes, and cannot be made \
                 otherwise: remove the stream (it holds only this store's state) and start again"
            )
            .into(),
        ));
    }
    tracing::warn!(stream = %name, settings = ?differs,
        "the bucket routes messages otherwise than this process makes it (a fleet source added or taken away, or someone with this role's seed created it so): putting those settings back");
    let fixed = stream::Config {
        subjects: expected.subjects.clone(),
        republish: None,
        sources: expected.sources.clone(),
        subject_transform: None,
        ..actual
    };
    js.update_stream(fixed)
        .await
        .map_err(|e| ConfigError::Io(format!("cannot put back {name}'s settings: {e}").into()))?;
    let bucket = name.trim_start_matches("KV_").to_string();
    js.get_key_value(&bucket).await.map_err(ConfigError::io)
}

/// Creates a key-value bucket with [`kv_stream`] and opens it.
pub async fn create_bucket(
    js: &jetstream::Context,
    config: kv::Config,
    atomic: bool,
) -> Result<kv::Store, ConfigError> {
    let bucket = config.bucket.clone();
    js.create_stream(kv_stream(config, atomic))
        .await
        .map_err(ConfigError::io)?;
    js.get_key_value(&bucket).await.map_err(ConfigError::io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_made_to_route_elsewhere_is_noticed() {
        let expected = kv_stream(
            kv::Config {
                bucket: "b".into(),
                ..Default::default()
            },
            false,
        );
        assert!(routing_differs(&expected, &expected).is_empty());
        let tampered = stream::Config {
            subjects: vec!["$KV.b.>".into(), "_INBOX.>".into()],
            republish: Some(stream::Republish {
                source: "$KV.b.>".into(),
                destination: "$KV.other.>".into(),
                headers_only: false,
            }),
            sources: Some(vec![stream::Source {
                name: "KV_other".into(),
                ..Default::default()
            }]),
            ..expected.clone()
        };
        assert_eq!(
            routing_differs(&tampered, &expected),
            ["subjects", "republish", "sources"]
        );
    }

    #[test]
    fn created_streams_bound_their_consumers() {
        let kv = kv_stream(
            kv::Config {
                bucket: "b".into(),
                ..Default::default()
            },
            false,
        );
        assert_eq!(kv.consumer_limits, Some(consumer_limits()));
        assert_eq!(kv.subjects, ["$KV.b.>"]);
        let obj = object_stream(object_store::Config {
            bucket: "o".into(),
            ..Default::default()
        });
        assert_eq!(obj.consumer_limits, Some(consumer_limits()));
        assert_eq!(obj.subjects, ["$O.o.C.>", "$O.o.M.>"]);
    }
}
