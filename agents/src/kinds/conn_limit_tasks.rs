//! The connection limiter's background work: keeping the slot view in step with the bucket,
//! and releasing the slots of connections a later agent denied (read from the tap).

use std::sync::Arc;
use std::time::Duration;

use bus::config::{self, Change};
use bus::state::keys;
use bus::tap::TapRecord;
use bus::{codec, Value};
use futures::StreamExt;

use super::conn_limit::{Slots, View, NAME};
use super::limit_match::key_token;
use crate::kind::{Attach, AttachError};

pub(crate) async fn start(ctx: Attach<'_>, slots: Arc<Slots>) -> Result<(), AttachError> {
    let store = slots_store(&slots);
    // Load the slots before the first request, so a new instance knows the live connections.
    let (snapshot, changes) = config::load_and_watch(&store, "slot.>").await?;
    replace_view(&slots, &snapshot);
    tokio::spawn(follow(slots.clone(), store, Box::pin(changes)));

    let tap = ctx.subjects.tap(bus::event::NEW_CONNECTION);
    let mut sub = ctx.nats.queue_subscribe(tap, format!("{NAME}-tap")).await?;
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Ok(record) = codec::decode::<TapRecord>("tap record", &msg.payload) else {
                continue;
            };
            if let Some(conn) = denied_after_admission(&record) {
                slots.release(&key_token(conn)).await;
            }
        }
    });
    Ok(())
}

fn slots_store(slots: &Slots) -> async_nats::jetstream::kv::Store {
    slots.store_handle()
}

fn replace_view(slots: &Slots, snapshot: &config::Snapshot) {
    let mut view = View::default();
    for (key, value) in &snapshot.values {
        view.apply(key, Some(String::from_utf8_lossy(value).into_owned()));
    }
    *slots.view.lock().unwrap_or_else(|e| e.into_inner()) = view;
}

type Changes =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Change, config::ConfigError>> + Send>>;

/// Applies slot changes as they come; a broken watch is reopened and the view reloaded.
async fn follow(slots: Arc<Slots>, store: async_nats::jetstream::kv::Store, mut changes: Changes) {
    loop {
        while let Some(change) = changes.next().await {
            let mut view = slots.view.lock().unwrap_or_else(|e| e.into_inner());
            match change {
                Ok(Change::Put { key, value, .. }) => {
                    view.apply(&key, Some(String::from_utf8_lossy(&value).into_owned()))
                }
                Ok(Change::Delete { key, .. }) => view.apply(&key, None),
                Err(e) => {
                    tracing::warn!(error = %e, "slot watch failed; reloading");
                    break;
                }
            }
        }
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            match config::load_and_watch(&store, "slot.>").await {
                Ok((snapshot, next)) => {
                    replace_view(&slots, &snapshot);
                    changes = Box::pin(next);
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "cannot reload slots; retrying"),
            }
        }
    }
}

/// The connection id of a tap record whose connection this kind admitted but the chain
/// denied in the end.
fn denied_after_admission(record: &TapRecord) -> Option<&str> {
    let d = &record.decision;
    if d.get_str(keys::ACTION) != Some("deny") {
        return None;
    }
    let Some(Value::Array(reasons)) = d.get(keys::REASONS) else {
        return None;
    };
    let admitted = reasons.iter().any(|r| {
        let field = |k: &str| {
            r.as_map()
                .and_then(|m| m.iter().find(|(kk, _)| kk.as_str() == Some(k)))
                .and_then(|(_, v)| v.as_str())
        };
        field("agent") == Some(NAME) && field("effect") == Some("allow")
    });
    admitted.then(|| d.get_str(keys::CONNECTION_ID)).flatten()
}
