//! Kubernetes label selectors, as ClusterLink's AccessPolicy uses them to name workloads and
//! peers: `{matchLabels: {k: v}, matchExpressions: [{key, operator, values}]}`.
//!
//! Semantics are Kubernetes': every term must hold (AND); `In` needs the label present with one
//! of the values, `NotIn` the label absent or with none of them, `Exists` present, and
//! `DoesNotExist` absent. A selector with no terms matches everything, an event that carries
//! no labels too. An event without labels is matched as having none, so a rule that requires a
//! label never matches a name-only event.

use std::collections::BTreeMap;

use bus::event::Labels;
use serde::{Deserialize, Serialize};

use crate::label::{check_key, check_value};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a label selector: {matchLabels: {key: value}, matchExpressions: [{key, operator, values}]}"
)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a selector term: {key, operator: In|NotIn|Exists|DoesNotExist, values}"
)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    /// Checks what serde cannot: the operators' values, and keys and values as Kubernetes
    /// validates them (`crate::label`).
    pub fn validate(&self, field: &str) -> Result<(), String> {
        for (k, v) in &self.match_labels {
            check_key(k)
                .and_then(|()| check_value(v))
                .map_err(|e| format!("{field}.matchLabels: {e}"))?;
        }
        for r in &self.match_expressions {
            check_key(&r.key).map_err(|e| format!("{field}.matchExpressions: {e}"))?;
            match (r.operator, r.values.is_empty()) {
                (Operator::In | Operator::NotIn, true) => {
                    return Err(format!(
                    "{field}.matchExpressions: {:?} with operator {:?} needs at least one value",
                    r.key, r.operator
                ))
                }
                (Operator::Exists | Operator::DoesNotExist, false) => {
                    return Err(format!(
                        "{field}.matchExpressions: {:?} with operator {:?} takes no values",
                        r.key, r.operator
                    ))
                }
                _ => {}
            }
            for v in &r.values {
                check_value(v)
                    .map_err(|e| format!("{field}.matchExpressions: {:?}: {e}", r.key))?;
            }
        }
        Ok(())
    }

    /// Whether `labels` (none: no labels at all) satisfy every term.
    pub fn matches(&self, labels: Option<&Labels>) -> bool {
        self.matches_with(|k| labels.and_then(|l| l.get(k)))
    }

    /// Whether the labels `get` finds by key satisfy every term: for attributes that are
    /// spread over several maps (ClusterLink's destination: the service's and the peer's).
    pub fn matches_with<'l>(&self, get: impl Fn(&str) -> Option<&'l String>) -> bool {
        let get = |k: &str| get(k).map(String::as_str);
        self.match_labels
            .iter()
            .all(|(k, v)| get(k) == Some(v.as_str()))
            && self.match_expressions.iter().all(|r| {
                let value = get(&r.key);
                let listed = || value.is_some_and(|v| r.values.iter().any(|x| x == v));
                match r.operator {
                    Operator::In => listed(),
                    Operator::NotIn => !listed(),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }

    /// No terms: matches everything (ClusterLink's `{}`).
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// A `matchLabels` pair every matching label set has: the rule can be indexed by it.
    pub fn required_pair(&self) -> Option<(&str, &str)> {
        self.match_labels
            .iter()
            .next()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Whether a selector that may be absent matches: an absent one matches everything.
pub fn matches(selector: &Option<Selector>, labels: Option<&Labels>) -> bool {
    selector.as_ref().is_none_or(|s| s.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn selector(json: &str) -> Selector {
        serde_json::from_str(json).expect("a selector")
    }

    #[test]
    fn terms_follow_kubernetes_semantics() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        let s = selector(
            r#"{"matchLabels": {"app": "web"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front", "edge"]}]}"#,
        );
        assert!(s.matches(Some(&web)));
        assert!(!s.matches(Some(&db)));
        assert!(!s.matches(None), "a required label is missing");
        let not_in = selector(
            r#"{"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}"#,
        );
        assert!(not_in.matches(Some(&web)) && !not_in.matches(Some(&db)));
        assert!(not_in.matches(None), "NotIn holds for an absent label");
        let exists = selector(r#"{"matchExpressions": [{"key": "tier", "operator": "Exists"}]}"#);
        assert!(exists.matches(Some(&web)) && !exists.matches(Some(&db)));
        let absent =
            selector(r#"{"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}"#);
        assert!(!absent.matches(Some(&web)) && absent.matches(Some(&db)) && absent.matches(None));
        let empty = selector("{}");
        assert!(
            empty.matches(Some(&web)) && empty.matches(None),
            "empty matches everything"
        );
        assert!(matches(&None, None));
        assert_eq!(s.required_pair(), Some(("app", "web")));
    }

    #[test]
    fn invalid_selectors_are_refused_with_the_field_named() {
        for (json, says) in [
            (
                r#"{"matchExpressions": [{"key": "a", "operator": "In"}]}"#,
                "needs at least one value",
            ),
            (
                r#"{"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}"#,
                "takes no values",
            ),
            (
                r#"{"matchExpressions": [{"key": "", "operator": "Exists"}]}"#,
                "is not a label key",
            ),
            (r#"{"matchLabels": {"": "x"}}"#, "is not a label key"),
            (
                r#"{"matchLabels": {"this is not a key": "x"}}"#,
                "is not a label key",
            ),
            (
                r#"{"matchLabels": {"app": "not a value"}}"#,
                "is not a label value",
            ),
            (
                r#"{"matchExpressions": [{"key": "app", "operator": "In", "values": ["a b"]}]}"#,
                "is not a label value",
            ),
            (
                r#"{"matchExpressions": [{"key": "Bad.Prefix/app", "operator": "Exists"}]}"#,
                "its prefix",
            ),
        ] {
            let err = selector(json).validate("dst_labels").expect_err(json);
            assert!(
                err.contains(says) && err.contains("dst_labels"),
                "{json}: {err}"
            );
        }
        for bad in [
            r#"{"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["x"]}]}"#,
            r#"{"matchLabel": {"a": "b"}}"#,
        ] {
            assert!(serde_json::from_str::<Selector>(bad).is_err(), "{bad}");
        }
    }
}
