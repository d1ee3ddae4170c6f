//! Label keys and values as Kubernetes validates them (`IsQualifiedName`, `IsValidLabelValue`
//! in k8s.io/apimachinery), so that a selector Kubernetes or ClusterLink would refuse is
//! refused here too, rather than stored and never matching.
//!
//! - A key is a name, optionally after a prefix and `/`. The name has 1 to 63 characters of
//!   `[A-Za-z0-9_.-]`, beginning and ending with a letter or digit. The prefix is a DNS
//!   subdomain: at most 253 characters, dot-separated parts of `[a-z0-9-]` that begin and end
//!   with a letter or digit.
//! - A value is empty, or 1 to 63 characters under the name's rule.

/// The longest name part of a key, and the longest value.
pub const MAX_NAME: usize = 63;
/// The longest prefix of a key.
pub const MAX_PREFIX: usize = 253;

const NAME_RULE: &str =
    "alphanumeric characters, '-', '_' or '.', beginning and ending with an alphanumeric character";

/// Whether `s` is a name part (or a non-empty value): the rule above, without its length.
fn name_chars(s: &str) -> bool {
    let ends = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    ends(s.chars().next())
        && ends(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn dns_subdomain(s: &str) -> bool {
    let part = |p: &str| {
        let ends =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        ends(p.chars().next())
            && ends(p.chars().last())
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    !s.is_empty() && s.len() <= MAX_PREFIX && s.split('.').all(part)
}

/// Checks a label key; the error says what is wrong with it.
pub fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if name.contains('/') {
        return Err(format!(
            "{key:?} is not a label key: at most one '/' separates a prefix from the name"
        ));
    }
    if let Some(prefix) = prefix {
        if !dns_subdomain(prefix) {
            return Err(format!(
                "{key:?} is not a label key: its prefix {prefix:?} must be a DNS subdomain (at most {MAX_PREFIX} characters, lowercase alphanumeric parts and '-', separated by '.', each beginning and ending with an alphanumeric character)"
            ));
        }
    }
    if name.is_empty() || name.len() > MAX_NAME || !name_chars(name) {
        return Err(format!(
            "{key:?} is not a label key: its name must have 1 to {MAX_NAME} characters, {NAME_RULE}"
        ));
    }
    Ok(())
}

/// Checks a label value; the error says what is wrong with it.
pub fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() || (value.len() <= MAX_NAME && name_chars(value)) {
        return Ok(());
    }
    Err(format!(
        "{value:?} is not a label value: it must be empty or have at most {MAX_NAME} characters, {NAME_RULE}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_kubernetes() {
        for ok in [
            "app",
            "app.kubernetes.io/name",
            "clusterlink.net/workload-name",
            "a",
            "A_b.c-D",
            &"x".repeat(MAX_NAME),
            &format!("{}/n", "a".repeat(MAX_PREFIX)),
        ] {
            assert_eq!(check_key(ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("this is not a key", "its name"),
            ("", "its name"),
            ("-app", "its name"),
            ("app-", "its name"),
            ("a/b/c", "at most one '/'"),
            ("Example.com/app", "its prefix"),
            ("example..com/app", "its prefix"),
            ("/app", "its prefix"),
            ("example.com/", "its name"),
            (&"x".repeat(MAX_NAME + 1), "its name"),
            (&format!("{}/n", "a".repeat(MAX_PREFIX + 1)), "its prefix"),
        ] {
            let err = check_key(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn values_follow_kubernetes() {
        for ok in ["", "prod", "v1.2_3-x", &"v".repeat(MAX_NAME)] {
            assert_eq!(check_value(ok), Ok(()), "{ok}");
        }
        for bad in ["a b", "-x", "x.", "é", &"v".repeat(MAX_NAME + 1)] {
            assert!(check_value(bad).is_err(), "{bad}");
        }
    }
}
