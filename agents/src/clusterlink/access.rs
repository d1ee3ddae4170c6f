//! `AccessPolicy` and `PrivilegedAccessPolicy` as ACL rules. ClusterLink decides a connection
//! by privileged deny, privileged allow, regular deny, regular allow, then default deny; the
//! ACL orders by priority, then deny before allow, and denies by default. So a privileged
//! policy gets [`PRIVILEGED_PRIORITY`], a regular one [`REGULAR_PRIORITY`], and the two
//! orders agree. A regular policy counts only for connections of its namespace
//! (`match.namespace`); `from` and `to` keep their lists, each an OR of selectors, over the
//! attributes ClusterLink names (docs/clusterlink.md).

use bus::origin::Origin;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::selector::Selector;

pub const REGULAR: &str = "AccessPolicy";
pub const PRIVILEGED: &str = "PrivilegedAccessPolicy";
/// Before every regular policy; hand-written ACL rules may sit between the tiers.
pub const PRIVILEGED_PRIORITY: i32 = 0;
pub const REGULAR_PRIORITY: i32 = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    action: Option<String>,
    from: Option<Vec<Item>>,
    to: Option<Vec<Item>>,
}

/// `WorkloadSetOrSelector`: exactly one of the two, and ClusterLink supports only selectors.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Item {
    #[serde(default)]
    workload_sets: Vec<String>,
    workload_selector: Option<Selector>,
}

/// The ACL document (see `crate::kinds::acl::AclPolicy`).
#[derive(Serialize)]
struct Rule<'a> {
    agent: &'static str,
    id: String,
    priority: i32,
    action: &'a str,
    #[serde(rename = "match")]
    matcher: Match<'a>,
    origin: &'a Origin,
}

#[derive(Serialize)]
struct Match<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    from: Vec<Selector>,
    to: Vec<Selector>,
}

pub(super) fn translate(
    origin: &Origin,
    id: String,
    spec: Json,
) -> Result<Vec<bus::Value>, (String, String)> {
    let err = |field: &str, message: String| (field.to_string(), message);
    let spec: Spec = super::spec(spec)?;
    let action = match spec.action.as_deref() {
        Some(a @ ("allow" | "deny")) => a,
        Some(other) => {
            return Err(err(
                "spec.action",
                format!("{other:?} is not one of allow, deny"),
            ))
        }
        None => return Err(err("spec.action", "missing: allow or deny".into())),
    };
    let from = selectors("spec.from", spec.from)?;
    let to = selectors("spec.to", spec.to)?;
    let privileged = origin.kind == PRIVILEGED;
    let rule = Rule {
        agent: crate::kinds::acl::NAME,
        id,
        priority: if privileged {
            PRIVILEGED_PRIORITY
        } else {
            REGULAR_PRIORITY
        },
        action,
        matcher: Match {
            namespace: if privileged {
                None
            } else {
                origin.namespace.as_deref()
            },
            from,
            to,
        },
        origin,
    };
    Ok(vec![super::to_value(&rule).map_err(|e| err("spec", e))?])
}

/// A `from` or `to` list: required, not empty, each item a valid selector.
fn selectors(field: &str, items: Option<Vec<Item>>) -> Result<Vec<Selector>, (String, String)> {
    let items = items.unwrap_or_default();
    if items.is_empty() {
        return Err((
            field.into(),
            "empty: ClusterLink requires at least one item ({workloadSelector: {}} selects every workload)".into(),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("{field}[{i}]");
        match (item.workload_sets.is_empty(), item.workload_selector) {
            (false, _) => {
                return Err((
                    format!("{at}.workloadSets"),
                    "workload sets are not supported, by ClusterLink either: use workloadSelector"
                        .into(),
                ))
            }
            (true, None) => {
                return Err((
                    at,
                    "needs a workloadSelector ({} selects every workload)".into(),
                ))
            }
            (true, Some(s)) => {
                let field = format!("{at}.workloadSelector");
                s.validate(&field).map_err(|e| {
                    // The selector names its field first; say it once.
                    let e = e
                        .strip_prefix(&field)
                        .map_or(e.as_str(), |r| r.trim_start_matches(['.', ':', ' ']));
                    (field.clone(), e.to_string())
                })?;
                out.push(s);
            }
        }
    }
    Ok(out)
}
