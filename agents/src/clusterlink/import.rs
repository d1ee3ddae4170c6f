//! `Import` as an LB policy: the connection's service is the Import (`dst_service:
//! <namespace>/<name>`, as Kubernetes prints a namespaced name), its sources' peers are the
//! policy's ordered `sources`, and `lbScheme` (default `round-robin`) is the scheme, picked
//! ClusterLink's way (`crate::kinds::lb`). The ports are the data plane's: read, checked,
//! not stored.

use bus::origin::Origin;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

pub const KIND: &str = "Import";
/// ClusterLink's limit on an Import's name (its CRD's validation rule).
const MAX_NAME: usize = 63;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    port: Option<u32>,
    target_port: Option<u32>,
    sources: Option<Vec<Source>>,
    lb_scheme: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Source {
    peer: Option<String>,
    #[allow(dead_code)] // the gateway's: which export of the peer to reach
    export_name: Option<String>,
    #[allow(dead_code)]
    export_namespace: Option<String>,
}

/// The LB document (see `crate::kinds::lb::LbPolicy`).
#[derive(Serialize)]
struct Rule<'a> {
    agent: &'static str,
    id: String,
    dst_service: String,
    scheme: &'a str,
    sources: Vec<String>,
    origin: &'a Origin,
}

/// The service a gateway names in `dst_service` for connections to an Import.
pub fn service(origin: &Origin) -> String {
    format!(
        "{}/{}",
        origin
            .namespace
            .as_deref()
            .unwrap_or(super::DEFAULT_NAMESPACE),
        origin.name
    )
}

pub(super) fn translate(
    origin: &Origin,
    id: String,
    spec: Json,
) -> Result<Vec<bus::Value>, (String, String)> {
    let err = |field: &str, message: String| Err((field.to_string(), message));
    if origin.name.len() > MAX_NAME {
        return err(
            "metadata.name",
            format!("an Import's name has at most {MAX_NAME} characters (ClusterLink's rule)"),
        );
    }
    let spec: Spec = super::spec(spec)?;
    for (field, port, required) in [
        ("spec.port", spec.port, true),
        ("spec.targetPort", spec.target_port, false),
    ] {
        match port {
            None if required => {
                return err(field, "missing: the port the service is imported on".into())
            }
            Some(p) if !(1..=65535).contains(&p) => {
                return err(field, format!("{p} is not a port (1 to 65535)"))
            }
            _ => {}
        }
    }
    let scheme = match spec.lb_scheme.as_deref() {
        None | Some("") => "round-robin",
        Some(s @ ("random" | "round-robin" | "static")) => s,
        Some(other) => {
            return err(
                "spec.lbScheme",
                format!("{other:?} is not one of random, round-robin, static"),
            )
        }
    };
    let sources = spec.sources.unwrap_or_default();
    if sources.is_empty() {
        return err(
            "spec.sources",
            "empty: an Import needs at least one source to pick".into(),
        );
    }
    let mut peers: Vec<String> = Vec::with_capacity(sources.len());
    for (i, s) in sources.into_iter().enumerate() {
        let field = format!("spec.sources[{i}].peer");
        let peer = s.peer.unwrap_or_default();
        if peer.is_empty() {
            return err(&field, "missing: the peer that exports the service".into());
        }
        if peers.contains(&peer) {
            return err(
                &field,
                format!("{peer:?} is a source twice: the engine picks a peer, so each peer may be a source once"),
            );
        }
        peers.push(peer);
    }
    let rule = Rule {
        agent: crate::kinds::lb::NAME,
        id,
        dst_service: service(origin),
        scheme,
        sources: peers,
        origin,
    };
    Ok(vec![super::to_value(&rule).map_err(|e| ("spec".into(), e))?])
}

#[cfg(test)]
#[path = "import_tests.rs"]
mod tests;
