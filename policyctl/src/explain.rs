//! `policyctl explain` and `policyctl test`: decisions asked as dry runs (`Policy-Dry-Run:
//! true`), so the live engine answers what it would decide and takes nothing, records nothing.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use bus::state::keys;
use bus::{Client, State};
use serde::Deserialize;
use serde_json::Value as Json;

/// An error with the exit status it asks for: `test` exits 1 when a case fails and 2 when it
/// could not run, as `opa test` and `kubectl diff` tell the two apart.
#[derive(Debug)]
pub struct Exit(pub u8, pub String);

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for Exit {}

/// Sends `attributes` as a dry run and prints the decision, each agent's answer and time, and
/// which policy decided.
pub async fn explain(client: &Client, event: &str, attributes: &State) -> anyhow::Result<()> {
    let decision = dry_run(client, event, attributes).await?;
    let d = serde_json::to_value(&decision)?;
    println!(
        "{event}: {} (dry run: nothing was taken or recorded)",
        summary(&d)
    );
    let reasons = d["reasons"].as_array().cloned().unwrap_or_default();
    println!(
        "  {:<14} {:>8}  {:<14} {:>9}  said",
        "agent", "priority", "outcome", "latency"
    );
    for a in d[keys::AGENTS].as_array().into_iter().flatten() {
        let agent = a["agent"].as_str().unwrap_or("?");
        let said: Vec<String> = reasons
            .iter()
            .filter(|r| r["agent"] == agent)
            .map(reason_line)
            .collect();
        let outcome = match (a["outcome"].as_str(), a["cached"].as_bool()) {
            (Some(o), Some(true)) => format!("{o} (cached)"),
            (Some(o), _) => o.to_string(),
            _ => "?".into(),
        };
        println!(
            "  {:<14} {:>8}  {:<14} {:>6.2} ms  {}",
            agent,
            a["priority"].as_i64().unwrap_or(0),
            outcome,
            a["latency_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
            if said.is_empty() {
                "-".to_string()
            } else {
                said.join("; ")
            }
        );
    }
    for r in reasons.iter().filter(|r| r["agent"] == "dispatcher") {
        println!("  dispatcher: {}", reason_line(r));
    }
    match decided_by(&d) {
        Some(r) => println!(
            "decided by: {} {}",
            r["agent"].as_str().unwrap_or("?"),
            reason_line(r)
        ),
        None => println!("decided by: no reason given"),
    }
    Ok(())
}

/// `allow (target peer p1)`, `deny`, or the candidates left.
fn summary(d: &Json) -> String {
    let mut s = d[keys::ACTION].as_str().unwrap_or("decided").to_string();
    if let Some(p) = d[keys::TARGET_PEER].as_str() {
        s.push_str(&format!(" (target peer {p})"));
    }
    for key in [keys::TARGET_PEERS, keys::SERVICES] {
        if let Some(list) = d[key].as_array() {
            let names: Vec<&str> = list.iter().filter_map(Json::as_str).collect();
            s = format!("{key} [{}]", names.join(", "));
        }
    }
    if d[keys::DEGRADED] == true {
        s.push_str(", degraded");
    }
    s
}

/// `policy: effect (detail)`, the policy marked `(fleet)` when it is the fleet's.
fn reason_line(r: &Json) -> String {
    let level = match r["level"].as_str() {
        Some(level) => format!(" ({level})"),
        None => String::new(),
    };
    // A policy made from another format's object is named by the object first.
    let policy = match (r["origin"].as_str(), r["policy"].as_str().unwrap_or("?")) {
        (Some(origin), id) => format!("{origin} [{id}]"),
        (None, id) => id.to_string(),
    };
    let mut s = format!("{policy}{level}: {}", r["effect"].as_str().unwrap_or("?"));
    if let Some(d) = r["detail"].as_str() {
        s.push_str(&format!(" ({d})"));
    }
    s
}

/// The reason that decided: the first deny of a denied event, else the first allow.
fn decided_by(d: &Json) -> Option<&Json> {
    let reasons = d["reasons"].as_array()?;
    let denied = d[keys::ACTION] == "deny";
    let effect = if denied { "deny" } else { "allow" };
    reasons.iter().find(|r| r["effect"] == effect)
}

async fn dry_run(
    client: &Client,
    event: &str,
    attributes: &impl serde::Serialize,
) -> anyhow::Result<State> {
    let decision: State = client
        .clone()
        .with_dry_run(true)
        .decide(event, attributes)
        .await
        .with_context(|| format!("the engine did not decide the {event} event"))?;
    // A dispatcher that does not know dry runs decided it for real: say so, never pretend.
    if !decision.flag(keys::DRY_RUN) {
        return Err(Exit(
            2,
            format!("the engine decided this {event} event for real, not as a dry run (a dispatcher older than dry runs?): its limiters may have taken a slot or a token"),
        )
        .into());
    }
    Ok(decision)
}

/// One test case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default = "new_connection")]
    event: String,
    #[serde(default)]
    attributes: serde_json::Map<String, Json>,
    /// Decision fields that must hold: each given field must equal the decision's, except
    /// `reasons`, whose every entry must match some reason of the decision in the fields it
    /// gives.
    expect: serde_json::Map<String, Json>,
}

fn new_connection() -> String {
    bus::event::NEW_CONNECTION.to_string()
}

/// Runs every case of every file against the live engine, as dry runs.
pub async fn test(client: &Client, files: &[PathBuf]) -> anyhow::Result<()> {
    let mut cases = Vec::new();
    for f in files {
        cases.extend(read_cases(f).map_err(|e| Exit(2, format!("{e:#}")))?);
    }
    for (file, case) in &cases {
        check_case(case).map_err(|e| Exit(2, format!("{file}: {}: {e}", case.name)))?;
    }
    let (mut passed, mut failed, mut errors) = (0, 0, 0);
    for (file, case) in &cases {
        match dry_run(client, &case.event, &case.attributes).await {
            Ok(decision) => {
                let got = serde_json::to_value(&decision)?;
                let misses = mismatches(&case.expect, &got);
                if misses.is_empty() {
                    passed += 1;
                    println!("ok    {file}: {}", case.name);
                } else {
                    failed += 1;
                    println!("FAIL  {file}: {}", case.name);
                    for m in misses {
                        println!("        {m}");
                    }
                }
            }
            Err(e) => {
                errors += 1;
                println!("ERROR {file}: {}: {e:#}", case.name);
            }
        }
    }
    println!(
        "{} cases: {passed} passed, {failed} failed, {errors} errors",
        cases.len()
    );
    match (errors, failed) {
        (0, 0) => Ok(()),
        (0, _) => Err(Exit(1, format!("{failed} of {} cases failed", cases.len())).into()),
        _ => Err(Exit(
            2,
            format!("{errors} of {} cases could not run", cases.len()),
        )
        .into()),
    }
}

/// A case that could not fail is refused: one with nothing expected, or with `reasons` that
/// is not a list of maps.
fn check_case(case: &Case) -> Result<(), String> {
    if case.expect.is_empty() {
        return Err("expect is empty: the case would pass whatever is decided".into());
    }
    if let Some(r) = case.expect.get("reasons") {
        let listed = r.as_array().is_some_and(|l| l.iter().all(Json::is_object));
        if !listed {
            return Err("expect.reasons must be a list of maps ({agent, policy, effect, detail, origin}, any of them)".into());
        }
    }
    Ok(())
}

fn read_cases(path: &Path) -> anyhow::Result<Vec<(String, Case)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let cases: Vec<Case> = serde_norway::from_str(&text).with_context(|| {
        format!(
            "{}: not a list of test cases (name, event, attributes, expect)",
            path.display()
        )
    })?;
    let name = path.display().to_string();
    Ok(cases.into_iter().map(|c| (name.clone(), c)).collect())
}

/// What differs between the expected fields and the decision, one line each.
fn mismatches(expect: &serde_json::Map<String, Json>, got: &Json) -> Vec<String> {
    let mut out = Vec::new();
    for (field, want) in expect {
        let have = &got[field.as_str()];
        if field == "reasons" {
            let have = have.as_array().cloned().unwrap_or_default();
            for w in want.as_array().into_iter().flatten() {
                let found = have.iter().any(|h| {
                    w.as_object()
                        .is_some_and(|w| w.iter().all(|(k, v)| &h[k.as_str()] == v))
                });
                if !found {
                    out.push(format!(
                        "reasons: no reason matches {w}; got {}",
                        Json::Array(have.clone())
                    ));
                }
            }
        } else if have != want {
            out.push(format!("{field}: expected {want}, got {have}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expected_fields_must_equal_and_expected_reasons_must_be_found() {
        let got = json!({"action": "allow", "target_peer": "p1", "reasons": [
            {"agent": "acl", "policy": "web-to-db", "effect": "allow"},
            {"agent": "lb", "policy": "default", "effect": "pick", "detail": "x"}]});
        let expect = |v: Json| v.as_object().cloned().expect("a map");
        assert!(mismatches(
            &expect(json!({"action": "allow", "reasons": [{"agent": "lb", "effect": "pick"}]})),
            &got
        )
        .is_empty());
        let misses = mismatches(
            &expect(json!({"action": "deny", "dst_peers": ["p1"],
                           "reasons": [{"agent": "acl", "policy": "other"}]})),
            &got,
        );
        assert_eq!(misses.len(), 3, "{misses:?}");
        assert!(
            misses[0].contains("action: expected \"deny\", got \"allow\""),
            "{misses:?}"
        );
    }

    #[test]
    fn the_deciding_reason_is_the_first_deny_or_else_the_first_allow() {
        let d = json!({"action": "deny", "reasons": [
            {"agent": "acl", "policy": "a", "effect": "allow"},
            {"agent": "rate-limit", "policy": "r", "effect": "deny"}]});
        assert_eq!(decided_by(&d).map(|r| &r["policy"]), Some(&json!("r")));
        let d = json!({"action": "allow", "reasons": [{"agent": "acl", "policy": "a", "effect": "allow"}]});
        assert_eq!(decided_by(&d).map(|r| &r["policy"]), Some(&json!("a")));
    }

    #[test]
    fn a_case_that_cannot_fail_is_refused() {
        let case = |expect: Json| Case {
            name: "x".into(),
            event: new_connection(),
            attributes: Default::default(),
            expect: expect.as_object().cloned().expect("a map"),
        };
        assert!(check_case(&case(json!({}))).is_err());
        assert!(check_case(&case(json!({"reasons": {"agent": "acl"}}))).is_err());
        assert!(check_case(&case(json!({"reasons": [{"agent": "acl"}]}))).is_ok());
    }

    #[test]
    fn a_case_file_with_an_unknown_field_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("policyctl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("bad.yaml");
        std::fs::write(&f, "- name: x\n  expect: {action: allow}\n  exepct: {}\n").expect("write");
        let err = format!("{:#}", read_cases(&f).expect_err("an unknown field"));
        assert!(err.contains("bad.yaml") && err.contains("exepct"), "{err}");
    }
}
