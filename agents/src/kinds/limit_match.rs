//! The `match` of the limiters' policies: which connections a limit applies to, and the key
//! a connection is counted under.

use bus::event::NewConnection;
use serde::Deserialize;

use crate::pattern::{self, Pattern};

/// Every field optional (absent or `*` is any, a trailing `*` a prefix). `target_peer` is the
/// peer the load balancer picked, so a limiter that names it belongs after `lb` in the chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitMatch {
    pub src_service: Option<Pattern>,
    pub dst_service: Option<Pattern>,
    pub src_peer: Option<Pattern>,
    pub target_peer: Option<Pattern>,
}

impl LimitMatch {
    pub fn matches(&self, e: &NewConnection, target_peer: Option<&str>) -> bool {
        pattern::matches(&self.dst_service, Some(&e.dst_service))
            && pattern::matches(&self.src_service, Some(&e.src_service))
            && pattern::matches(&self.src_peer, e.src_peer.as_deref())
            && pattern::matches(&self.target_peer, target_peer)
    }

    /// Whether a connection between these services may have been counted (a close does not
    /// carry the peers, so those are taken to match).
    pub fn may_match(&self, src_service: &str, dst_service: &str) -> bool {
        pattern::matches(&self.dst_service, Some(dst_service))
            && pattern::matches(&self.src_service, Some(src_service))
    }

    /// The values of the attributes the match names: connections that share them share a
    /// limit (`src_service: "web*"` limits each `web-…` service separately).
    pub fn key(&self, e: &NewConnection, target_peer: Option<&str>) -> String {
        let mut key = String::new();
        let fields = [
            (&self.src_service, Some(e.src_service.as_str())),
            (&self.dst_service, Some(e.dst_service.as_str())),
            (&self.src_peer, e.src_peer.as_deref()),
            (&self.target_peer, target_peer),
        ];
        for (i, (p, value)) in fields.into_iter().enumerate() {
            if p.is_some() {
                key.push_str(&format!("{i}={};", value.unwrap_or("")));
            }
        }
        key
    }
}

pub use bus::config::key_token;

/// Merge rule 7: a limiter with a policy that names `target_peer` counts each connection for
/// its target as it stands when the limiter answers (or for none), so its answer says so
/// (`holds_target`), and no later agent may move the connection to another peer.
pub fn hold_target<'a>(
    matchers: impl IntoIterator<Item = &'a LimitMatch>,
    state: &bus::State,
    mut patch: bus::State,
) -> bus::State {
    if matchers.into_iter().any(|m| m.target_peer.is_some()) {
        let target = state
            .get_str(bus::state::keys::TARGET_PEER)
            .map_or(bus::Value::Nil, bus::Value::from);
        patch.insert(bus::state::keys::HOLDS_TARGET, target);
    }
    patch
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus::event::Direction;

    fn conn(src: &str) -> NewConnection {
        NewConnection {
            src_service: src.into(),
            dst_service: "db".into(),
            direction: Direction::Outgoing,
            src_peer: None,
            dst_peers: None,
            connection_id: None,
            src_labels: None,
            dst_labels: None,
            peer_labels: None,
            namespace: None,
        }
    }

    #[test]
    fn keys_hold_the_named_attributes_only() {
        let m = LimitMatch {
            src_service: Some(Pattern::Prefix("web".into())),
            ..Default::default()
        };
        assert!(m.matches(&conn("web-1"), None));
        assert!(!m.matches(&conn("api"), None));
        assert_ne!(
            m.key(&conn("web-1"), Some("p1")),
            m.key(&conn("web-2"), Some("p1"))
        );
        assert_eq!(
            m.key(&conn("web-1"), Some("p1")),
            m.key(&conn("web-1"), Some("p2"))
        );
        assert_eq!(LimitMatch::default().key(&conn("x"), None), "");
    }

    #[test]
    fn key_tokens_are_safe_and_stable() {
        assert_eq!(key_token("abc-1_2"), "abc-1_2");
        let t = key_token("0=web;1=db;");
        assert!(t.starts_with('h') && t.len() == 17);
        assert_eq!(t, key_token("0=web;1=db;"));
        assert_ne!(key_token(""), "");
    }
}
