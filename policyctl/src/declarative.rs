//! `policyctl diff DIR` and `policyctl export DIR`: the stored configuration against a
//! directory laid out as `load` reads it (`subscriptions.yaml`, then every other `*.yaml` as
//! policies), the kubectl way: `diff` exits 0 when they are equal, 1 when they differ and 2 on
//! an error, so scripts and CI can gate on it; `export` writes the stored set as files that
//! `diff` then finds equal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use bus::admin::{PolicyRef, Subscription};
use bus::AdminClient;
use serde_json::Value as Json;

use crate::explain::Exit;

/// What a directory or the store holds, keyed for comparison: subscriptions by `event/agent`,
/// policies by `agent/id`, each as JSON (maps sorted, so order never differs).
#[derive(Default)]
struct Set {
    subscriptions: BTreeMap<String, Json>,
    policies: BTreeMap<String, Json>,
}

fn sub_key(s: &Subscription) -> String {
    format!("{}/{}", s.event, s.agent)
}

fn from_subscriptions(set: &mut Set, subs: &[Subscription]) -> anyhow::Result<()> {
    for s in subs {
        set.subscriptions
            .insert(sub_key(s), serde_json::to_value(s)?);
    }
    Ok(())
}

fn from_policies<'a>(
    set: &mut Set,
    docs: impl Iterator<Item = &'a bus::Value>,
) -> anyhow::Result<()> {
    for d in docs {
        let r = PolicyRef::of(d).map_err(|e| anyhow::anyhow!("{e}"))?;
        set.policies
            .insert(format!("{}/{}", r.agent, r.id), serde_json::to_value(d)?);
    }
    Ok(())
}

/// The directory's set: its `subscriptions.yaml` (if any) and every other `*.yaml`.
fn read_dir(dir: &Path) -> anyhow::Result<Set> {
    let mut set = Set::default();
    let subs_file = dir.join("subscriptions.yaml");
    if subs_file.exists() {
        from_subscriptions(&mut set, &crate::files::read_subscriptions(&subs_file)?)?;
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml") && !p.ends_with("subscriptions.yaml")
        })
        .collect();
    files.sort();
    if !files.is_empty() {
        let docs = crate::files::read_policies(&files)?;
        from_policies(&mut set, docs.iter().map(|d| &d.value))?;
    }
    Ok(set)
}

async fn read_store(admin: &AdminClient) -> anyhow::Result<Set> {
    let mut set = Set::default();
    from_subscriptions(&mut set, &admin.subscriptions(None).await?)?;
    from_policies(&mut set, admin.policy_list(None).await?.iter())?;
    Ok(set)
}

/// Lines of the difference from the store to the directory: `+` what the directory adds, `-`
/// what it no longer has, `~` what it changes (with the stored and the new document).
fn differences(stored: &Set, wanted: &Set) -> Vec<String> {
    let mut out = Vec::new();
    for (what, have, want) in [
        ("subscription", &stored.subscriptions, &wanted.subscriptions),
        ("policy", &stored.policies, &wanted.policies),
    ] {
        for (key, w) in want {
            match have.get(key) {
                None => out.push(format!("+ {what} {key}: {w}")),
                Some(h) if h != w => {
                    out.push(format!("~ {what} {key}"));
                    out.push(format!("    stored:    {h}"));
                    out.push(format!("    directory: {w}"));
                }
                Some(_) => {}
            }
        }
        for (key, h) in have {
            if !want.contains_key(key) {
                out.push(format!("- {what} {key}: {h}"));
            }
        }
    }
    out
}

/// Prints how the directory differs from the store; exits 1 when it does.
pub async fn diff(admin: &AdminClient, dir: &Path) -> anyhow::Result<()> {
    let wanted = read_dir(dir).map_err(|e| Exit(2, format!("{e:#}")))?;
    let stored = read_store(admin)
        .await
        .map_err(|e| Exit(2, format!("cannot read the stored configuration: {e:#}")))?;
    let lines = differences(&stored, &wanted);
    for l in &lines {
        println!("{l}");
    }
    if lines.is_empty() {
        return Ok(());
    }
    let changes = lines.iter().filter(|l| !l.starts_with(' ')).count();
    Err(Exit(
        1,
        format!(
            "{changes} differences between the store and {}",
            dir.display()
        ),
    )
    .into())
}

/// Writes the stored set into `dir`: `subscriptions.yaml` and `policies.yaml`.
pub async fn export(admin: &AdminClient, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let subs = admin.subscriptions(None).await?;
    let policies = admin.policy_list(None).await?;
    let header = "# Exported by `policyctl export`: `policyctl diff` finds this directory equal to the store.\n";
    let subs_yaml = format!("{header}{}", serde_norway::to_string(&subs)?);
    std::fs::write(dir.join("subscriptions.yaml"), subs_yaml)
        .with_context(|| format!("cannot write {}", dir.join("subscriptions.yaml").display()))?;
    let mut docs = String::from(header);
    for (i, p) in policies.iter().enumerate() {
        if i > 0 {
            docs.push_str("---\n");
        }
        docs.push_str(&serde_norway::to_string(p)?);
    }
    std::fs::write(dir.join("policies.yaml"), docs)
        .with_context(|| format!("cannot write {}", dir.join("policies.yaml").display()))?;
    println!(
        "exported {} subscriptions and {} policies to {}",
        subs.len(),
        policies.len(),
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn differences_list_additions_changes_and_removals() {
        let mut stored = Set::default();
        stored
            .policies
            .insert("acl/a".into(), json!({"action": "allow"}));
        stored
            .policies
            .insert("acl/gone".into(), json!({"action": "deny"}));
        let mut wanted = Set::default();
        wanted
            .policies
            .insert("acl/a".into(), json!({"action": "deny"}));
        wanted
            .policies
            .insert("acl/new".into(), json!({"action": "allow"}));
        let lines = differences(&stored, &wanted);
        assert!(lines[0].starts_with("~ policy acl/a"), "{lines:?}");
        assert!(
            lines.iter().any(|l| l.starts_with("+ policy acl/new")),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("- policy acl/gone")),
            "{lines:?}"
        );
        assert!(differences(&wanted, &wanted).is_empty());
    }
}
