//! The kubectl way of configuring: `policyctl apply` makes the stored configuration equal a
//! set of files (validated whole, stored in one step), `diff` shows how they differ and exits
//! 0 when they are equal, 1 when they differ and 2 on an error, so scripts and CI can gate on
//! it; `export` writes the stored set as files that `diff` then finds equal.
//!
//! Files and folders are read alike everywhere: a file named `subscriptions.*` holds
//! subscriptions, every other `*.yaml`, `*.yml` or `*.json` policies (a document that is a list
//! holds several, so `policy list --json` output can be applied back). A section with no file
//! is left alone: applying policies alone never removes a subscription.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bus::admin::{Applied, ChangeOp, PolicyRef, Subscription};
use bus::AdminClient;
use serde_json::Value as Json;

use crate::explain::Exit;
use crate::files::Doc;

/// What the given files and folders hold; `None`: no file of that section was given.
pub struct Inputs {
    pub subscriptions: Option<Vec<Subscription>>,
    pub policies: Option<Vec<Doc>>,
    /// Documents set aside before sending (only when read for `--keep-going`).
    pub refused: Vec<crate::files::Refused>,
    /// Top-level documents in the policy files, an empty list among them.
    pub documents: usize,
}

fn is_config_file(p: &Path) -> bool {
    p.extension()
        .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
}

fn is_subscriptions_file(p: &Path) -> bool {
    p.file_stem().is_some_and(|s| s == "subscriptions")
}

/// Reads files and folders (a folder's configuration files, not its subfolders). With
/// `keep_going`, a document refused on its own is set aside in `refused` instead of failing.
pub fn read_inputs(paths: &[PathBuf], keep_going: bool) -> anyhow::Result<Inputs> {
    let mut files = Vec::new();
    for path in paths {
        if path == Path::new(crate::files::STDIN) {
            files.push(path.clone());
        } else if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_config_file(p))
                .collect();
            found.sort();
            files.extend(found);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            bail!("{}: no such file or folder", path.display());
        }
    }
    // A folder and a file in it name that file twice: read it once.
    if paths
        .iter()
        .filter(|p| *p == Path::new(crate::files::STDIN))
        .count()
        > 1
    {
        bail!("standard input (-) can be read once");
    }
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.canonicalize().unwrap_or_else(|_| f.clone())));
    let (subs, policies): (Vec<PathBuf>, Vec<PathBuf>) =
        files.into_iter().partition(|p| is_subscriptions_file(p));
    if subs.is_empty() && policies.is_empty() {
        bail!(
            "no configuration files (*.yaml, *.yml, *.json) in {}",
            shown(paths)
        );
    }
    let subscriptions = match subs.is_empty() {
        true => None,
        false => {
            let mut all = Vec::new();
            for f in &subs {
                all.extend(crate::files::read_subscriptions(f)?);
            }
            Some(all)
        }
    };
    let read = match policies.is_empty() {
        true => None,
        false => Some(crate::files::read_policy_docs_skipping(&policies)?),
    };
    let (policies, refused, documents) = match read {
        None => (None, Vec::new(), 0),
        Some(read) => {
            if let (false, Some(r)) = (keep_going, read.refused.first()) {
                bail!("{}", r.message);
            }
            (Some(read.docs), read.refused, read.documents)
        }
    };
    Ok(Inputs {
        subscriptions,
        policies,
        refused,
        documents,
    })
}

fn shown(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| match p == Path::new(crate::files::STDIN) {
            true => "standard input".to_string(),
            false => p.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the files or the store hold, keyed for comparison: subscriptions by `event/agent`,
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
        set.policies.insert(r.name(), serde_json::to_value(d)?);
    }
    Ok(())
}

fn from_inputs(inputs: &Inputs) -> anyhow::Result<Set> {
    let mut set = Set::default();
    if let Some(subs) = &inputs.subscriptions {
        from_subscriptions(&mut set, subs)?;
    }
    if let Some(docs) = &inputs.policies {
        from_policies(&mut set, docs.iter().map(|d| &d.value))?;
    }
    Ok(set)
}

/// The stored set, in the sections the inputs have.
async fn read_store(admin: &AdminClient, inputs: &Inputs) -> anyhow::Result<Set> {
    let mut set = Set::default();
    if inputs.subscriptions.is_some() {
        from_subscriptions(&mut set, &admin.subscriptions(None).await?)?;
    }
    if inputs.policies.is_some() {
        from_policies(&mut set, admin.policy_list(None).await?.iter())?;
    }
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

/// Prints how the files differ from the store; exits 1 when they do.
pub async fn diff(admin: &AdminClient, paths: &[PathBuf]) -> anyhow::Result<()> {
    let inputs = read_inputs(paths, false).map_err(|e| Exit(2, format!("{e:#}")))?;
    let wanted = from_inputs(&inputs).map_err(|e| Exit(2, format!("{e:#}")))?;
    let stored = read_store(admin, &inputs)
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
            shown(paths)
        ),
    )
    .into())
}

/// How `apply` (and `load`, which never prunes) is asked.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    pub dry_run: bool,
    pub prune: bool,
    pub force: bool,
    /// Store what is valid and report the rest (`--keep-going`).
    pub keep_going: bool,
    /// Prune only what came from this source (`--prune-source`).
    pub prune_source: Option<String>,
}

/// Makes the stored configuration equal the files: validated whole by the dispatcher (every
/// policy by its agent kind) and stored in one step, or nothing is stored.
pub async fn apply(
    admin: &AdminClient,
    inputs: &Inputs,
    options: ApplyOptions,
) -> anyhow::Result<Applied> {
    let docs = inputs.policies.as_deref().unwrap_or_default();
    if options.prune && inputs.policies.is_some() && inputs.documents == 0 {
        bail!(
            "the policy input holds no document at all (did the command feeding it fail?), and \
             --prune never removes anything on an empty input; an empty list (`kind: List`, \
             `items: []`) with --prune-source prunes that source's documents"
        );
    }
    if options.prune
        && options.prune_source.is_none()
        && inputs.policies.as_ref().is_some_and(Vec::is_empty)
    {
        bail!(
            "the policy files hold no documents, and --prune would remove every stored policy; \
             remove policies with `policyctl policy remove`, give the ones to keep, or name \
             the source to prune (`--prune-source clusterlink`)"
        );
    }
    if docs.len() > bus::admin::MAX_POLICIES_PER_ADD {
        bail!(
            "{} policy documents: one request holds at most {}; a larger set goes in parts",
            docs.len(),
            bus::admin::MAX_POLICIES_PER_ADD
        );
    }
    let args = bus::admin::Apply {
        subscriptions: inputs.subscriptions.clone(),
        policies: inputs
            .policies
            .as_ref()
            .map(|docs| docs.iter().map(|d| d.value.clone()).collect()),
        prune: options.prune,
        dry_run: options.dry_run,
        force: options.force,
        keep_going: options.keep_going,
        keep: inputs
            .refused
            .iter()
            .filter_map(|r| r.keep.clone())
            .collect(),
        prune_source: options.prune_source.clone(),
    };
    send(admin, &args, docs).await
}

/// Sends one `apply`; an error names the document of `docs` it is about.
pub async fn send(
    admin: &AdminClient,
    args: &bus::admin::Apply,
    docs: &[Doc],
) -> anyhow::Result<Applied> {
    match admin.apply(args).await {
        Ok(applied) => Ok(applied),
        Err(bus::ClientError::Remote(e)) => {
            let message = crate::files::locate(&e.message, docs);
            // The dispatcher says itself what a failed write left; anything else failed
            // before a write.
            if message.contains("stored") {
                bail!("{message}")
            }
            bail!("{message}; nothing was stored")
        }
        Err(e) => Err(e.into()),
    }
}

/// The lines `apply` prints: what was skipped, each change as `diff` marks it, then a
/// summary. `docs` names a document the dispatcher skipped by its file and position.
pub fn report(applied: &Applied, inputs: &Inputs, steps: usize) -> Vec<String> {
    let docs = inputs.policies.as_deref().unwrap_or_default();
    let mut out: Vec<String> = inputs
        .refused
        .iter()
        .map(|r| format!("skipped {}", r.message))
        .chain(
            applied
                .skipped
                .iter()
                .map(|s| format!("skipped {}", crate::files::locate(&s.error, docs))),
        )
        .collect();
    out.extend(
        applied
            .changes
            .iter()
            .map(|c| format!("{} {} {}", c.op.mark(), c.section.as_str(), c.name)),
    );
    let count = |op| applied.changes.iter().filter(|c| c.op == op).count();
    let counts = format!(
        "{} added, {} changed, {} removed, {} unchanged",
        count(ChangeOp::Add),
        count(ChangeOp::Change),
        count(ChangeOp::Remove),
        applied.unchanged
    );
    if applied.dry_run {
        out.push(format!(
            "dry run: {counts}; nothing stored (configuration revision {})",
            applied.revision
        ));
    } else if applied.changes.is_empty() {
        out.push(format!(
            "{counts}; configuration revision {}",
            applied.revision
        ));
    } else {
        let how = match (applied.atomic, steps) {
            (true, 1) => "in one atomic batch".to_string(),
            (true, n) => format!("in {n} steps, each one atomic batch"),
            (false, 1) => "key by key".to_string(),
            (false, n) => format!("key by key, in {n} steps"),
        };
        out.push(format!(
            "{counts}; configuration revision {} -> {} ({how})",
            applied.revision_before, applied.revision
        ));
    }
    if !applied.kept.is_empty() {
        let kept: Vec<String> = applied
            .kept
            .iter()
            .map(|c| format!("{} {}", c.section.as_str(), c.name))
            .collect();
        out.push(format!(
            "kept {} stored but not given (--prune removes those from the given documents' source): {}",
            kept.len(),
            kept.join(", ")
        ));
    }
    out
}

/// Writes the stored set into `dir`: `subscriptions.yaml` and `policies.yaml`.
pub async fn export(admin: &AdminClient, dir: &Path) -> anyhow::Result<()> {
    let subs = admin.subscriptions_by_level(None).await?;
    let policies = admin.policy_list_by_level(None).await?;
    let header = "# Exported by `policyctl export`: `policyctl diff` finds this directory equal to the store.\n";
    write_config(dir, header, &subs.subscriptions, &policies.policies)?;
    println!(
        "exported {} subscriptions and {} policies to {}",
        subs.subscriptions.len(),
        policies.policies.len(),
        dir.display()
    );
    // At a site of a fleet, the fleet's documents too, in a folder of their own: `apply` and
    // `diff` of `dir` read only its own files, and a site cannot store the fleet's.
    if !subs.fleet.is_empty() || !policies.fleet.is_empty() {
        let fleet = dir.join("fleet");
        let header = "# The fleet's configuration, as this site has it from the hub (`policyctl export`): read-only\n\
                      # here; change it at the hub with `policyctl --fleet`.\n";
        write_config(&fleet, header, &subs.fleet, &policies.fleet)?;
        println!(
            "exported the fleet's {} subscriptions and {} policies to {}",
            subs.fleet.len(),
            policies.fleet.len(),
            fleet.display()
        );
    }
    Ok(())
}

/// Writes `subscriptions.yaml` and `policies.yaml` into `dir`, each after `header`.
fn write_config(
    dir: &Path,
    header: &str,
    subs: &[bus::admin::Subscription],
    policies: &[bus::Value],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let subs_yaml = format!("{header}{}", serde_norway::to_string(subs)?);
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inputs_are_sorted_into_sections_and_a_missing_section_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("p.json");
        std::fs::write(
            &policies,
            r#"[{"agent": "acl", "id": "a", "action": "allow"}]"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not configuration").unwrap();
        let inputs = read_inputs(&[dir.path().to_path_buf()], false).unwrap();
        assert!(
            inputs.subscriptions.is_none(),
            "no subscriptions file: left alone"
        );
        assert_eq!(inputs.policies.as_ref().map(Vec::len), Some(1));
        let subs = dir.path().join("subscriptions.yml");
        std::fs::write(
            &subs,
            "- {event: new-connection, agent: acl, priority: 10}\n",
        )
        .unwrap();
        let inputs = read_inputs(std::slice::from_ref(&subs), false).unwrap();
        assert_eq!(inputs.subscriptions.as_ref().map(Vec::len), Some(1));
        assert!(inputs.policies.is_none());
        let empty = tempfile::tempdir().unwrap();
        let err = read_inputs(&[empty.path().to_path_buf()], false)
            .err()
            .unwrap();
        assert!(err.to_string().contains("no configuration files"), "{err}");
    }

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
