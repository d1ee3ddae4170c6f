//! Where a policy document came from, when the engine made it from another format's object
//! (ClusterLink's `AccessPolicy`, `PrivilegedAccessPolicy` and `Import`, see
//! docs/clusterlink.md). Stored in the document as the optional field `origin`, it lets every
//! tool name the object an operator wrote (`AccessPolicy default/deny-gw1`) beside the
//! generated id, and lets `apply --prune` remove only what came from the same source.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The document field that holds an [`Origin`].
pub const FIELD: &str = "origin";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    /// The object's kind, as its format spells it (`AccessPolicy`).
    pub kind: String,
    /// The object's namespace; absent for a cluster-scoped kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// Who owns the object (`clusterlink`): `apply --prune` of documents from a source
    /// removes only stored documents from that source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A document's `origin.source`, if it has one (`None`: written by hand). `apply --prune`
/// removes only stored documents whose source is among the given documents'.
pub fn source_of(doc: &crate::Value) -> Option<&str> {
    field(field(doc, FIELD)?, "source")?.as_str()
}

fn field<'v>(v: &'v crate::Value, name: &str) -> Option<&'v crate::Value> {
    v.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v)
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origin_reads_as_kubectl_names_the_object() {
        let mut o = Origin {
            kind: "AccessPolicy".into(),
            namespace: Some("default".into()),
            name: "deny-gw1".into(),
            source: None,
        };
        assert_eq!(o.to_string(), "AccessPolicy default/deny-gw1");
        o.kind = "PrivilegedAccessPolicy".into();
        o.namespace = None;
        assert_eq!(o.to_string(), "PrivilegedAccessPolicy deny-gw1");
    }

    #[test]
    fn a_documents_source_is_read_where_the_origin_holds_it() {
        let doc = |json: serde_json::Value| rmpv::ext::to_value(json).unwrap();
        let cl = doc(
            serde_json::json!({"agent": "acl", "origin": {"kind": "AccessPolicy", "name": "a", "source": "clusterlink"}}),
        );
        assert_eq!(source_of(&cl), Some("clusterlink"));
        assert_eq!(source_of(&doc(serde_json::json!({"agent": "acl"}))), None);
        assert_eq!(
            source_of(&doc(
                serde_json::json!({"origin": {"kind": "X", "name": "a"}})
            )),
            None
        );
        assert_eq!(
            source_of(&doc(serde_json::json!({"origin": "clusterlink"}))),
            None
        );
    }
}
