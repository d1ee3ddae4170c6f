//! Bytes carried per destination service and target peer, from ClusterLink's
//! `connection-status` reports. A report carries a connection's totals so far, so the monitor
//! keeps the last totals of each live connection and counts the difference; a report that
//! names no service or peer is attributed from the connection's admission, which the monitor
//! saw on the tap.

use std::collections::HashMap;
use std::sync::Mutex;

use bus::Value;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Connections remembered at once. Past it, a new connection is not tracked: its reports are
/// not counted (never counted twice), and `untracked` says how many were missed.
const MAX_CONNECTIONS: usize = 100_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct BytesLabels {
    service: String,
    peer: String,
    direction: String,
}

#[derive(Default)]
struct Seen {
    service: Option<String>,
    peer: Option<String>,
    bytes_in: u64,
    bytes_out: u64,
}

#[derive(Default)]
pub(super) struct ConnectionBytes {
    pub(super) family: Family<BytesLabels, Counter>,
    /// Status reports not counted: their connection could not be tracked.
    pub(super) untracked: Counter,
    live: Mutex<HashMap<String, Seen>>,
}

use bus::state::{field as get, field_str as text};

impl ConnectionBytes {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An admitted connection: where its bytes will be counted. `service` and `peer` are the
    /// capped label values.
    pub(super) fn admitted(&self, connection: &str, service: Option<String>, peer: Option<String>) {
        let mut live = self.live();
        if live.len() >= MAX_CONNECTIONS {
            return;
        }
        live.insert(
            connection.to_string(),
            Seen {
                service,
                peer,
                ..Seen::default()
            },
        );
    }

    /// A status report: counts the bytes since the last one. `admit` caps a label's values.
    pub(super) fn status(&self, attributes: &Value, admit: impl Fn(&str, bool) -> String) {
        let Some(connection) = text(attributes, bus::attrs::CONNECTION_ID) else {
            return;
        };
        let total = |name: &str| get(attributes, name).and_then(Value::as_u64).unwrap_or(0);
        let (bytes_in, bytes_out) = (total("bytes_in"), total("bytes_out"));
        let ended = matches!(text(attributes, "state"), Some("closed" | "failed"));
        let mut live = self.live();
        if live.len() >= MAX_CONNECTIONS && !live.contains_key(connection) {
            self.untracked.inc();
            return;
        }
        let seen = live.entry(connection.to_string()).or_default();
        let service = match text(attributes, bus::attrs::DST_SERVICE) {
            Some(s) => admit(s, true),
            None => seen.service.clone().unwrap_or_else(|| "unknown".into()),
        };
        let peer = match text(attributes, bus::attrs::TARGET_PEER) {
            Some(p) => admit(p, false),
            None => seen.peer.clone().unwrap_or_else(|| "unknown".into()),
        };
        // Totals only grow; a smaller one is a new count (a restarted gateway): all of it.
        let delta = |now: u64, before: u64| if now >= before { now - before } else { now };
        for (direction, d) in [
            ("in", delta(bytes_in, seen.bytes_in)),
            ("out", delta(bytes_out, seen.bytes_out)),
        ] {
            if d > 0 {
                let labels = BytesLabels {
                    service: service.clone(),
                    peer: peer.clone(),
                    direction: direction.into(),
                };
                self.family.get_or_create(&labels).inc_by(d);
            }
        }
        seen.bytes_in = bytes_in;
        seen.bytes_out = bytes_out;
        if ended {
            live.remove(connection);
        }
    }

    /// A connection closed: forgotten.
    pub(super) fn closed(&self, connection: &str) {
        self.live().remove(connection);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(conn: &str, state: &str, bytes_in: u64, bytes_out: u64) -> Value {
        Value::Map(vec![
            ("connection_id".into(), conn.into()),
            ("state".into(), state.into()),
            ("bytes_in".into(), bytes_in.into()),
            ("bytes_out".into(), bytes_out.into()),
        ])
    }

    fn count(b: &ConnectionBytes, service: &str, peer: &str, direction: &str) -> u64 {
        b.family
            .get_or_create(&BytesLabels {
                service: service.into(),
                peer: peer.into(),
                direction: direction.into(),
            })
            .get()
    }

    #[test]
    fn reports_count_the_bytes_since_the_last_one_where_the_connection_was_admitted() {
        let b = ConnectionBytes::default();
        let same = |name: &str, _: bool| name.to_string();
        b.admitted("c1", Some("db".into()), Some("p1".into()));
        b.status(&status("c1", "open", 100, 10), same);
        b.status(&status("c1", "open", 250, 10), same);
        b.status(&status("c1", "closed", 300, 40), same);
        assert_eq!(count(&b, "db", "p1", "in"), 300);
        assert_eq!(count(&b, "db", "p1", "out"), 40);
        // Closed: forgotten; a report of a connection never seen counts as unknown.
        b.status(&status("c2", "open", 5, 0), same);
        assert_eq!(count(&b, "unknown", "unknown", "in"), 5);
        assert!(b.live().get("c1").is_none());
        b.admitted("c3", None, None);
        b.closed("c3");
        assert!(b.live().is_empty() || !b.live().contains_key("c3"));
    }
}
