//! ClusterLink's own documents (group `clusterlink.net`, version `v1alpha1`) as the engine's
//! policies: `AccessPolicy` and `PrivilegedAccessPolicy` become ACL rules ([`access`]), an
//! `Import` an LB policy ([`import`]). Each
//! object becomes one engine document whose `origin` names it, so every tool can say
//! `AccessPolicy default/deny-gw1` and `apply --prune` can tell ClusterLink's documents from
//! hand-written ones. The mapping is docs/clusterlink.md's; this module is where it is decided.
//!
//! Objects are checked here, with ClusterLink's field names in the errors, before the engine
//! sees them: the engine then checks the documents they became as it checks any other.

mod access;
pub mod import;

use bus::origin::Origin;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value as Json;

/// The API group every object of ClusterLink's has, and the one version the engine reads.
pub const GROUP: &str = "clusterlink.net";
pub const API_VERSION: &str = "clusterlink.net/v1alpha1";
/// The `origin.source` of every document made from a ClusterLink object.
pub const SOURCE: &str = "clusterlink";
/// ClusterLink's namespace when an object gives none, as `kubectl apply` without a context
/// namespace uses.
pub const DEFAULT_NAMESPACE: &str = "default";

/// What went wrong with an object, named as kubectl names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct Error {
    /// `AccessPolicy default/deny-gw1`, or the kind alone when the name is what is wrong.
    pub object: String,
    /// The field, in ClusterLink's terms (`spec.from[0].workloadSelector`).
    pub field: String,
    pub message: String,
}

/// One object, translated: the engine documents it became (MessagePack maps, as stored).
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    pub origin: Origin,
    pub policies: Vec<bus::Value>,
}

/// ClusterLink's group before v0.2 (`ConnectivityPolicy`), refused by name.
const OLD_GROUP: &str = "clusterlink";

/// Whether a document is one of ClusterLink's: its `apiVersion` is in the `clusterlink.net`
/// group, or the older `clusterlink` (a version the engine does not read is then refused by
/// [`translate`], not mistaken for an engine document).
pub fn is_clusterlink(doc: &Json) -> bool {
    doc.get("apiVersion")
        .and_then(Json::as_str)
        .and_then(|v| v.split_once('/'))
        .is_some_and(|(group, _)| group == GROUP || group == OLD_GROUP)
}

#[derive(Deserialize)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
}

/// Translates one ClusterLink object.
pub fn translate(doc: &Json) -> Result<Translated, Error> {
    let kind = doc.get("kind").and_then(Json::as_str).unwrap_or_default();
    let version = doc
        .get("apiVersion")
        .and_then(Json::as_str)
        .unwrap_or_default();
    let refuse = |object: String, field: &str, message: String| Error {
        object,
        field: field.into(),
        message,
    };
    if version != API_VERSION {
        let older = match version.starts_with(&format!("{OLD_GROUP}/")) {
            true => " (ClusterLink's format before v0.2, with ConnectivityPolicy; v0.4 writes AccessPolicy)",
            false => "",
        };
        return Err(refuse(
            kind.to_string(),
            "apiVersion",
            format!("{version:?}: the engine reads {API_VERSION} only{older}"),
        ));
    }
    let scoped = match kind {
        access::REGULAR | import::KIND => true,
        access::PRIVILEGED => false,
        other => {
            let name = doc
                .pointer("/metadata/name")
                .and_then(Json::as_str)
                .unwrap_or("");
            return Err(refuse(
                format!("{other} {name}").trim().to_string(),
                "kind",
                format!("not a kind the engine reads from {GROUP}: {}, {}, {} (Peer, Export and Instance are the gateway's, not policies)",
                    access::REGULAR, access::PRIVILEGED, import::KIND),
            ));
        }
    };
    let meta: Metadata = doc
        .get("metadata")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| refuse(kind.into(), "metadata", e.to_string()))?
        .unwrap_or(Metadata {
            name: None,
            namespace: None,
        });
    let name = meta.name.unwrap_or_default();
    check_name(&name).map_err(|m| refuse(kind.into(), "metadata.name", m))?;
    let namespace = match (scoped, meta.namespace) {
        (true, ns) => {
            let ns = ns.unwrap_or_else(|| DEFAULT_NAMESPACE.into());
            check_name(&ns)
                .map_err(|m| refuse(format!("{kind} {ns}/{name}"), "metadata.namespace", m))?;
            Some(ns)
        }
        // A cluster-scoped object's namespace means nothing, as in Kubernetes.
        (false, _) => None,
    };
    let origin = Origin {
        kind: kind.into(),
        namespace,
        name,
        source: Some(SOURCE.into()),
    };
    let object = origin.to_string();
    let id = policy_id(&origin).map_err(|m| refuse(object.clone(), "metadata.name", m))?;
    let spec = doc.get("spec").cloned().unwrap_or(Json::Null);
    let policies = match kind {
        import::KIND => import::translate(&origin, id, spec),
        _ => access::translate(&origin, id, spec),
    }
    .map_err(|(field, message)| refuse(object.clone(), &field, message))?;
    Ok(Translated { origin, policies })
}

/// The engine policy (`agent`, `id`) an object is or would be, from its kind and metadata
/// alone: what stays stored when the object itself is refused (`apply --keep-going`).
pub fn policy_of(doc: &Json) -> Option<(&'static str, String)> {
    let kind = doc.get("kind")?.as_str()?;
    let agent = match kind {
        access::REGULAR | access::PRIVILEGED => crate::kinds::acl::NAME,
        import::KIND => crate::kinds::lb::NAME,
        _ => return None,
    };
    let name = doc.pointer("/metadata/name")?.as_str()?.to_string();
    let namespace = (kind != access::PRIVILEGED).then(|| {
        doc.pointer("/metadata/namespace")
            .and_then(Json::as_str)
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_string()
    });
    let origin = Origin {
        kind: kind.into(),
        namespace,
        name,
        source: None,
    };
    Some((agent, policy_id(&origin).ok()?))
}

/// Reads a spec with the path of a bad field in the error, ClusterLink's names.
fn spec<T: DeserializeOwned>(spec: Json) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let field = match path.as_str() {
            "." | "" => "spec".to_string(),
            p => format!("spec.{p}"),
        };
        (field, e.inner().to_string())
    })
}

/// Names and namespaces the engine can hold. Kubernetes is stricter (lower case, no `_`), so
/// every object a cluster holds passes; ClusterLink's own test files name policies with `_`.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("missing: every object has a name".into());
    }
    if name.len() > 253
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(format!(
            "{name:?}: a name has at most 253 letters, digits, `-`, `.` and `_`"
        ));
    }
    Ok(())
}

/// The engine id of an object's document: `cl-ap__<namespace>__<name>`,
/// `cl-pap__<name>`, `cl-import__<namespace>__<name>`. Ids allow `[A-Za-z0-9_-]`, so `_`
/// escapes: `.` is `_d` and `_` is `_u`; `__` never occurs inside an escaped part, so it
/// separates the parts and no two objects share an id.
pub fn policy_id(origin: &Origin) -> Result<String, String> {
    let escape = |s: &str| s.replace('_', "_u").replace('.', "_d");
    let tag = match origin.kind.as_str() {
        access::REGULAR => "ap",
        access::PRIVILEGED => "pap",
        _ => "import",
    };
    let mut id = format!("cl-{tag}");
    if let Some(ns) = &origin.namespace {
        id.push_str("__");
        id.push_str(&escape(ns));
    }
    id.push_str("__");
    id.push_str(&escape(&origin.name));
    bus::admin::check_policy_id(&id).map_err(|_| {
        format!(
            "too long for the engine: its policy id {id} has {} characters, at most 128",
            id.len()
        )
    })?;
    Ok(id)
}

/// A serde value as the MessagePack map the engine stores.
fn to_value(v: &impl serde::Serialize) -> Result<bus::Value, String> {
    // Through JSON: rmpv writes a struct as an array, the engine reads maps.
    let json = serde_json::to_value(v).map_err(|e| e.to_string())?;
    rmpv::ext::to_value(json).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
