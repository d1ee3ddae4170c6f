//! Peers ClusterLink said were removed (`peer-removed`), until they are added again
//! (`peer-added`). The set lives in the config bucket (`peer.<token>`, the value the peer's
//! name), so every dispatcher instance has it from its watch; each takes removed peers out of
//! an event's candidates before the chain runs, so no agent offers or picks one (the LB
//! included). The verdict cache stays exact: the candidates are part of its key.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use bus::config::ConfigKey;
use bus::event::Event;
use bus::state::keys;
use bus::watch::{Change, Update};
use bus::{ErrorCode, ErrorReply, State};

/// Peers removed at once, at most: a `peer-removed` past it is refused (`bad-request`) until
/// some are added back. ClusterLink fleets have tens of peers; the bound keeps the set, and the
/// config bucket's share of it, bounded whatever a gateway sends.
pub(crate) const MAX_REMOVED: usize = 10_000;

/// Removed peers: by config key, and their names (one lookup per candidate, whatever the
/// number removed).
#[derive(Default)]
pub(crate) struct Removed(RwLock<Set>);

#[derive(Default)]
struct Set {
    by_key: HashMap<String, String>,
    names: HashSet<String>,
}

impl Set {
    fn put(&mut self, key: &str, name: String) {
        if let Some(old) = self.by_key.insert(key.to_string(), name.clone()) {
            self.names.remove(&old);
        }
        self.names.insert(name);
    }

    fn delete(&mut self, key: &str) {
        if let Some(old) = self.by_key.remove(key) {
            self.names.remove(&old);
        }
    }
}

impl Removed {
    /// Follows the config bucket's watch.
    pub(crate) fn apply(&self, update: &Update<'_>) {
        let mut removed = self.0.write().unwrap_or_else(|e| e.into_inner());
        match update {
            Update::Loaded(snap) => {
                *removed = Set::default();
                for (key, value) in &snap.values {
                    if ConfigKey::is_removed_peer(key) {
                        removed.put(key, String::from_utf8_lossy(value).into_owned());
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
                            removed.put(key, String::from_utf8_lossy(value).into_owned());
                        }
                        Change::Delete { key, .. } => removed.delete(key),
                    }
                }
            }
        }
    }

    /// Whether one more peer may be removed (`peer` itself may be removed again).
    fn room_for(&self, peer: &str) -> bool {
        let removed = self.0.read().unwrap_or_else(|e| e.into_inner());
        removed.names.len() < MAX_REMOVED || removed.names.contains(peer)
    }

    /// Takes removed peers out of the state's peer candidates (`dst_peers`, `target_peers`).
    pub(crate) fn narrow(&self, state: &mut State) {
        let removed = self.0.read().unwrap_or_else(|e| e.into_inner());
        if removed.names.is_empty() {
            return;
        }
        for key in [keys::DST_PEERS, keys::TARGET_PEERS] {
            let Some(peers) = state.get_strings(key) else {
                continue;
            };
            let kept: Vec<String> = peers
                .iter()
                .filter(|p| !removed.names.contains(**p))
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
        Event::PeerRemoved(p) if !d.removed_peers.room_for(&p.peer) => {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!(
                    "{MAX_REMOVED} peers are removed already, the most the engine keeps: add some back (peer-added) first"
                ),
            ))
        }
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
            bus::watch::stream_state(&d.store)
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
    use bus::watch::Snapshot;

    #[test]
    fn removed_peers_are_bounded_and_filtering_does_not_scan_them() {
        let r = Removed::default();
        let mut snap = Snapshot::default();
        for i in 0..MAX_REMOVED {
            snap.values.insert(
                ConfigKey::removed_peer(&format!("p{i}")),
                format!("p{i}").into(),
            );
        }
        r.apply(&Update::Loaded(&snap));
        assert!(!r.room_for("another"));
        assert!(
            r.room_for("p7"),
            "removing a removed peer again takes no room"
        );
        let mut s = State::new();
        s.set_strings(keys::DST_PEERS, &["p7", "q1"]);
        r.narrow(&mut s);
        assert_eq!(s.get_strings(keys::DST_PEERS), Some(vec!["q1"]));
    }

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
