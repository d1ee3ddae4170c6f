//! Which stored documents `apply --prune` may remove. Only those from the same source as the
//! given ones (`bus::origin`): a ClusterLink cluster's objects piped in with `--prune` remove
//! ClusterLink's documents that are gone, never a hand-written policy, and a hand-written
//! folder never removes ClusterLink's. A document `keep` names, or one `keep_going` skipped,
//! stays as it is stored: an object refused now keeps its last good version, as ClusterLink's
//! controllers keep it.

use std::collections::BTreeSet;

use bus::admin::{Apply, PolicyRef, Skipped};
use bus::config::ConfigKey;
use bus::{codec, Value};

pub(crate) struct Prune {
    enabled: bool,
    /// The given policies' sources (`None`: by hand); `None` when no policy was given, so
    /// that an apply of subscriptions alone is scoped by section only, as before.
    sources: Option<BTreeSet<Option<String>>>,
    /// Keys never removed.
    kept: BTreeSet<String>,
}

impl Prune {
    pub(crate) fn new(args: &Apply, skipped: &[Skipped]) -> Self {
        let given = args.policies.as_deref().filter(|p| !p.is_empty()).map(|p| {
            p.iter()
                .map(|d| bus::origin::source_of(d).map(str::to_owned))
                .collect()
        });
        let sources = match &args.prune_source {
            Some(source) => Some(BTreeSet::from([Some(source.clone())])),
            None => given,
        };
        let kept = skipped
            .iter()
            .filter_map(|s| PolicyRef::from_name(s.name.as_deref()?))
            .map(|r| ConfigKey::policy(&r.agent, &r.id))
            .chain(args.keep.iter().map(|r| ConfigKey::policy(&r.agent, &r.id)))
            .collect();
        Prune {
            enabled: args.prune,
            sources,
            kept,
        }
    }

    /// Whether the stored `value` at `key`, not among the given documents, is removed.
    pub(crate) fn removes(&self, key: &str, value: &[u8]) -> bool {
        if !self.enabled || self.kept.contains(key) {
            return false;
        }
        let Some(sources) = &self.sources else {
            return true;
        };
        if !matches!(ConfigKey::parse(key), Some(ConfigKey::Policy { .. })) {
            return true;
        }
        // A stored document that does not decode has no source: it is the hand-written kind.
        let source = codec::decode::<Value>("policy", value)
            .ok()
            .and_then(|v| bus::origin::source_of(&v).map(str::to_owned));
        sources.contains(&source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(json: serde_json::Value) -> Value {
        rmpv::ext::to_value(json).expect("a value")
    }

    fn bytes(json: serde_json::Value) -> Vec<u8> {
        codec::encode("policy", &doc(json)).expect("encodes")
    }

    fn apply(policies: Vec<serde_json::Value>, prune: bool) -> Apply {
        Apply {
            subscriptions: None,
            policies: Some(policies.into_iter().map(doc).collect()),
            prune,
            dry_run: false,
            force: false,
            keep_going: false,
            keep: Vec::new(),
            prune_source: None,
        }
    }

    #[test]
    fn prune_removes_only_what_came_from_the_given_documents_source() {
        let cl = json!({"agent": "acl", "id": "cl-x", "origin": {"kind": "AccessPolicy", "name": "x", "source": "clusterlink"}});
        let by_hand = json!({"agent": "acl", "id": "mine"});
        let key = |id: &str| ConfigKey::policy("acl", id);
        let from_clusterlink = Prune::new(&apply(vec![cl.clone()], true), &[]);
        assert!(from_clusterlink.removes(&key("cl-y"), &bytes(cl.clone())));
        assert!(!from_clusterlink.removes(&key("mine"), &bytes(by_hand.clone())));
        let by_hand_folder = Prune::new(&apply(vec![by_hand.clone()], true), &[]);
        assert!(by_hand_folder.removes(&key("old"), &bytes(by_hand.clone())));
        assert!(!by_hand_folder.removes(&key("cl-y"), &bytes(cl.clone())));
        assert!(
            by_hand_folder.removes(&key("bad"), b"\xc1"),
            "undecodable: by hand"
        );
        assert!(
            by_hand_folder.removes("sub.new-connection.acl", b""),
            "subscriptions are scoped by section alone"
        );
        let both = Prune::new(&apply(vec![cl.clone(), by_hand.clone()], true), &[]);
        assert!(
            both.removes(&key("a"), &bytes(cl)) && both.removes(&key("b"), &bytes(by_hand.clone()))
        );
        assert!(!Prune::new(&apply(vec![], false), &[]).removes(&key("a"), &bytes(by_hand.clone())));
        // A source named outright: pruned with no document of it given.
        let mut named = apply(vec![], true);
        named.prune_source = Some("clusterlink".into());
        let named = Prune::new(&named, &[]);
        let cl = json!({"agent": "acl", "id": "cl-y", "origin": {"kind": "AccessPolicy", "name": "y", "source": "clusterlink"}});
        assert!(named.removes(&key("cl-y"), &bytes(cl)));
        assert!(!named.removes(&key("mine"), &bytes(by_hand)));
    }

    #[test]
    fn a_skipped_or_kept_document_is_never_removed() {
        let by_hand = json!({"agent": "acl", "id": "x"});
        let mut args = apply(vec![by_hand.clone()], true);
        args.keep = vec![PolicyRef {
            agent: "acl".into(),
            id: "client-skipped".into(),
        }];
        let skipped = [Skipped {
            document: 2,
            name: Some("acl/refused".into()),
            error: "bad".into(),
        }];
        let p = Prune::new(&args, &skipped);
        for id in ["client-skipped", "refused"] {
            assert!(
                !p.removes(&ConfigKey::policy("acl", id), &bytes(by_hand.clone())),
                "{id}"
            );
        }
        assert!(p.removes(&ConfigKey::policy("acl", "other"), &bytes(by_hand)));
    }
}
