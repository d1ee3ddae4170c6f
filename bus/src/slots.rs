//! Where conn-limit keeps its slots: the layout every instance (and `policyctl`, and the
//! tests) reads, spelled once.
//!
//! - **Slots**: one stream per policy, `SLOTS_<prefix>_conns_<policy>`, one message per
//!   connection that holds a slot, on `$SLOT.<prefix>_conns.<policy>.<connection>`. The
//!   stream's own limits are the limit: `max_msgs` is the policy's `max_connections` with
//!   `discard: new` (a connection that would be one too many is refused by the server, whoever
//!   sends it), `max_msgs_per_subject: 1` (a connection counts once, however many copies of its
//!   admission write), and `max_age` is the lease. A slot's value is the runs that hold it,
//!   one key token a line.
//! - **Markers**: one key per connection in the bucket `<prefix>_conns` (`KV_<prefix>_conns`),
//!   `gone.<connection>`, whose value has a line `closed` once the connection is closed and a
//!   line `run <run>` for each of its runs whose event was denied. A copy of an admission that
//!   writes after one that concerns it gives its slot back. One key, so that an admission
//!   checks with one read.

use std::time::Duration;

use async_nats::jetstream::stream;

use crate::subject::Subjects;

/// conn-limit policies one engine may hold: each is a stream in the slot store's account,
/// whose `max_streams` is this plus the marker bucket.
pub const MAX_POLICIES: i64 = 256;

/// How long a marker counts: longer than the longest agent call (`MAX_TIMEOUT_MS`, 60 s) plus
/// its store requests, so no copy of an admission started before a close or an undo can still
/// write after the marker stops counting.
pub const MARKER_FOR: Duration = Duration::from_secs(120);

/// The stream of one policy's slots.
pub fn stream(s: &Subjects, policy: &str) -> String {
    format!("SLOTS_{}_{policy}", s.conn_bucket())
}

/// The subject of a connection's slot under a policy (the connection as a key token).
pub fn subject(s: &Subjects, policy: &str, connection: &str) -> String {
    format!("$SLOT.{}.{policy}.{connection}", s.conn_bucket())
}

/// Every slot subject, the import a store identity writes them through.
pub fn wildcard(s: &Subjects) -> String {
    format!("$SLOT.{}.>", s.conn_bucket())
}

/// The markers' key of a connection.
pub fn gone_key(connection: &str) -> String {
    format!("gone.{connection}")
}

/// The markers' line of a closed connection.
pub const CLOSED: &str = "closed";

/// The markers' line of an undone run.
pub fn undone_line(run: &str) -> String {
    format!("run {run}")
}

/// The stream of one policy's slots, as conn-limit creates it (with the stores' consumer
/// limits, `crate::streams::consumer_limits`, and its replicas).
pub fn stream_config(s: &Subjects, policy: &str, max: u32, lease: Duration) -> stream::Config {
    stream::Config {
        name: stream(s, policy),
        description: Some(format!("conn-limit's slots of policy {policy}")),
        subjects: vec![format!("$SLOT.{}.{policy}.*", s.conn_bucket())],
        max_messages: i64::from(max),
        max_messages_per_subject: 1,
        discard: stream::DiscardPolicy::New,
        max_age: lease,
        // A slot is one small message: its runs, 8 key tokens at most. No `max_bytes`: the
        // server reserves a stream's `max_bytes` against its account's, and `max_msgs` times
        // this bounds it anyway.
        max_message_size: 1024,
        allow_direct: false,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policys_stream_takes_exactly_its_connections() {
        let s = Subjects::default();
        let c = stream_config(&s, "db", 100, Duration::from_secs(3600));
        assert_eq!(c.name, "SLOTS_policy_conns_db");
        assert_eq!(c.subjects, ["$SLOT.policy_conns.db.*"]);
        assert_eq!(subject(&s, "db", "c1"), "$SLOT.policy_conns.db.c1");
        assert_eq!((c.max_messages, c.max_messages_per_subject), (100, 1));
        assert_eq!(c.discard, stream::DiscardPolicy::New);
        assert_eq!(gone_key("c1"), "gone.c1");
        assert_eq!(undone_line("r1"), "run r1");
    }
}
