//! Peers ClusterLink said were removed (`peer-removed`), until they are added again
//! (`peer-added`). The set lives in the config bucket (`peer.<token>`, the value the peer's
//! name), so every dispatcher instance has it from its watch; each takes removed peers out of
//! an event's candidates before the chain runs, so no agent offers or picks one (the LB
//! included). The verdict cache stays exact: the candidates are part of its key.

use std::collections::HashMap;
use std::sync::RwLock;

use bus::config::{Change, ConfigKey, Update};
use bus::event::Event;
use bus::state::keys;
use bus::{ErrorCode, ErrorReply, State};

/// Removed peers: config key -> peer name.
#[derive(Default)]
pub(crate) struct Removed(RwLock<HashMap<String, String>>);

impl Removed {
    /// Follows the config bucket's watch.
    pub(crate) fn apply(&self, update: &Update<'_>) {
        let mut removed = self.0.write().unwrap_or_else(|e| e.into_inner());
        match update {
            Update::Loaded(snap) => {
                removed.clear();
                for (key, value) in &snap.values {
                    if ConfigKey::is_removed_peer(key) {
                        removed.insert(key.clone(), String::from_utf8_lossy(value).into_owned());
                    }
                }
            }
            Update::Changed(changes) => {
                for c in changes
                    .iter()
                    .filter(|c| ConfigKey::is_removed_peer(c.key()))
                {
                    match c {
                        Change::Put { key, value, .. } => {
                            removed
                                .insert(key.clone(), String::from_utf8_lossy(value).into_owned());
                        }
                        Change::Delete { key, .. } => {
                            removed.remove(key);
                        }
                    }
                }
            }
        }
    }

    /// Takes removed peers out of the state's peer candidates (`dst_peers`, `target_peers`).
    pub(crate) fn narrow(&self, state: &mut State) {
        let removed = self.0.read().unwrap_or_else(|e| e.into_inner());
        if removed.is_empty() {
            return;
        }
        for key in [keys::DST_PEERS, keys::TARGET_PEERS] {
            let Some(peers) = state.get_strings(key) else {
                continue;
            };
            let kept: Vec<String> = peers
                .iter()
                .filter(|p| !removed.values().any(|r| r == *p))
                .map(|p| p.to_string())
                .collect();
            if kept.len() < peers.len() {
                state.set_strings(key, &kept);
            }
        }
    }
}

/// Records a `peer-removed` or `peer-added` in the config bucket, and waits until every
/// dispatcher has seen it: once the gateway has the acknowledgement, no dispatcher offers the
/// removed peer. A write that fails is an error reply, so the gateway sends the event again.
pub(crate) async fn record(d: &crate::Dispatcher, event: &Event) -> Result<(), ErrorReply> {
    let unavailable = |e: String| {
        ErrorReply::new(
            ErrorCode::Internal,
            format!("could not record the peer change, send it again: {e}"),
        )
    };
    let revision = match event {
        Event::PeerRemoved(p) => d
            .store
            .put(ConfigKey::removed_peer(&p.peer), p.peer.clone().into())
            .await
            .map_err(|e| unavailable(e.to_string()))?,
        Event::PeerAdded(p) => {
            d.store
                .delete(ConfigKey::removed_peer(&p.peer))
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            // A delete says no revision: the bucket's last one is at or past it.
            bus::config::stream_state(&d.store)
                .await
                .map_err(|e| unavailable(e.to_string()))?
                .last_sequence
        }
        _ => return Ok(()),
    };
    crate::verdicts::everywhere(d, revision).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus::config::Snapshot;

    #[test]
    fn removed_peers_leave_the_candidates_until_added_again() {
        let r = Removed::default();
        let mut snap = Snapshot::default();
        snap.values
            .insert(ConfigKey::removed_peer("p2"), "p2".into());
        r.apply(&Update::Loaded(&snap));
        let mut s = State::new();
        s.set_strings(keys::DST_PEERS, &["p1", "p2", "p3"]);
        r.narrow(&mut s);
        assert_eq!(s.get_strings(keys::DST_PEERS), Some(vec!["p1", "p3"]));
        let added = [Change::Delete {
            key: ConfigKey::removed_peer("p2"),
            revision: 2,
        }];
        r.apply(&Update::Changed(&added));
        let mut s = State::new();
        s.set_strings(keys::TARGET_PEERS, &["p1", "p2"]);
        r.narrow(&mut s);
        assert_eq!(s.get_strings(keys::TARGET_PEERS), Some(vec!["p1", "p2"]));
    }
}
