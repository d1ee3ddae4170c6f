//! The connection limiter's background work: keeping the slot view in step with the bucket,
//! and releasing the slots of connections a later agent denied (read from the tap).

use std::sync::Arc;

use bus::config::{self, Change, Update};
use bus::state::keys;
use bus::tap::{Outcome, TapRecord};
use bus::{codec, Value};
use futures::StreamExt;

use super::conn_limit::{Slots, View, NAME, STATE_KEY};
use super::limit_match::key_token;
use crate::kind::{Attach, AttachError};

pub(crate) async fn start(ctx: Attach<'_>, slots: Arc<Slots>) -> Result<(), AttachError> {
    // Load the slots before the first request, so a new instance knows the live connections.
    // Changes are applied one by one: a rebuild would forget how long each slot was held.
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let watched = slots.clone();
    let on = move |update: Update<'_>| {
        let mut view = watched.view();
        match update {
            Update::Loaded(snap) => {
                *view = View::default();
                for (key, value) in &snap.values {
                    view.apply(key, Some(String::from_utf8_lossy(value).into_owned()));
                }
            }
            Update::Changed(changes) => {
                for change in changes {
                    match change {
                        Change::Put { key, value, .. } => {
                            view.apply(key, Some(String::from_utf8_lossy(value).into_owned()))
                        }
                        Change::Delete { key, .. } => view.apply(key, None),
                    }
                }
            }
        }
    };
    tokio::spawn(config::watch(
        slots.store.clone(),
        "slot.>".into(),
        on,
        Some(ready_tx),
    ));
    ready
        .await
        .map_err(|_| "the slot watch stopped before loading")?;

    let tap = ctx.subjects.tap(bus::event::NEW_CONNECTION);
    let mut sub = ctx
        .nats
        .queue_subscribe(tap, bus::roles::CONN_LIMIT_TAP_GROUP.to_string())
        .await?;
    // Releases run concurrently, bounded, so a flood of denies does not back up the tap.
    let limit = Arc::new(tokio::sync::Semaphore::new(64));
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Ok(record) = codec::decode::<TapRecord>("tap record", &msg.payload) else {
                continue;
            };
            let Some(release) = to_release(&record) else {
                continue;
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            let slots = slots.clone();
            tokio::spawn(async move {
                match release {
                    Release::Exact(list) => slots.release_exact(&list).await,
                    Release::Connection(token) => slots.release_connection(&token).await,
                }
                drop(permit);
            });
        }
    });
    Ok(())
}

pub enum Release {
    /// The slots an admission recorded, with their holder.
    Exact(Vec<(String, String)>),
    /// Every slot of a connection: conn-limit failed in the chain, so its answer (and what it
    /// took) is unknown.
    Connection(String),
}

/// What to free for a tap record: nothing unless the chain ended in a deny after conn-limit
/// was asked.
pub fn to_release(record: &TapRecord) -> Option<Release> {
    let d = &record.decision;
    if d.get_str(keys::ACTION) != Some("deny") {
        return None;
    }
    if let Some(Value::Map(m)) = d.get(STATE_KEY) {
        let get = |k: &str| {
            m.iter()
                .find(|(kk, _)| kk.as_str() == Some(k))
                .map(|(_, v)| v)
        };
        let holder = get("holder")?.as_str()?.to_string();
        let Value::Array(keys) = get("slots")? else {
            return None;
        };
        let list = keys
            .iter()
            .filter_map(|k| Some((k.as_str()?.to_string(), holder.clone())))
            .collect();
        return Some(Release::Exact(list));
    }
    let failed = record
        .agents
        .iter()
        .any(|a| a.agent == NAME && !matches!(a.outcome, Outcome::Answered | Outcome::Observed));
    let conn = d.get_str(keys::CONNECTION_ID)?;
    failed.then(|| Release::Connection(key_token(conn)))
}
