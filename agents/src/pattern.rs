//! Match patterns of policy documents: absent or `*` is any, a trailing `*` is a prefix,
//! anything else is exact.

use std::fmt;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum Pattern {
    Any,
    Prefix(String),
    Exact(String),
}

impl Pattern {
    pub fn matches(&self, value: Option<&str>) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Prefix(p) => value.is_some_and(|v| v.starts_with(p.as_str())),
            Pattern::Exact(e) => value == Some(e.as_str()),
        }
    }
    pub fn exact(&self) -> Option<&str> {
        match self {
            Pattern::Exact(e) => Some(e),
            _ => None,
        }
    }
}

/// `None` (field absent) matches anything, like `*`.
pub fn matches(p: &Option<Pattern>, value: Option<&str>) -> bool {
    p.as_ref().is_none_or(|p| p.matches(value))
}

/// Whether the field matches whatever the value is (absent or `*`).
pub fn is_any(p: &Option<Pattern>) -> bool {
    matches!(p, None | Some(Pattern::Any))
}

impl TryFrom<String> for Pattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() {
            return Err("an empty pattern matches nothing; use `*` for any".into());
        }
        if s == "*" {
            return Ok(Pattern::Any);
        }
        let body = s.strip_suffix('*');
        let stem = body.unwrap_or(&s);
        if stem.contains('*') {
            return Err(format!("{s:?}: `*` is only allowed at the end"));
        }
        Ok(match body {
            Some(prefix) => Pattern::Prefix(prefix.to_string()),
            None => Pattern::Exact(s),
        })
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Prefix(p) => write!(f, "{p}*"),
            Pattern::Exact(e) => f.write_str(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::try_from(s.to_string()).unwrap()
    }

    #[test]
    fn patterns_match_as_documented() {
        assert!(p("*").matches(None));
        assert!(p("*").matches(Some("x")));
        assert!(p("web*").matches(Some("web-1")));
        assert!(p("web*").matches(Some("web")));
        assert!(!p("web*").matches(Some("api")));
        assert!(!p("web*").matches(None));
        assert!(p("web").matches(Some("web")));
        assert!(!p("web").matches(Some("web-1")));
        assert!(matches(&None, None));
        assert_eq!(p("a*").to_string(), "a*");
    }

    #[test]
    fn bad_patterns_are_rejected() {
        assert!(Pattern::try_from(String::new()).is_err());
        assert!(Pattern::try_from("a*b".to_string()).is_err());
        assert!(Pattern::try_from("**".to_string()).is_err());
    }
}
