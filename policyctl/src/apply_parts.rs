//! `apply` of more policy documents than one request holds (`MAX_POLICIES_PER_ADD`): a large
//! cluster's ClusterLink objects, say. Every part is validated first, with nothing stored; then
//! each part is stored in one atomic step; then one last step prunes, keeping every document
//! given. A failure while storing leaves the parts before it stored, and says so: the whole is
//! not one step, as an apply of up to 1 000 documents is.

use anyhow::bail;
use std::collections::HashSet;

use bus::admin::{
    Applied, Apply, ChangeOp, PolicyRef, Section, MAX_CHANGES_PER_APPLY, MAX_POLICIES_PER_ADD,
    TOO_MANY_CHANGES,
};
use bus::AdminClient;

use crate::declarative::{apply as apply_one, send, ApplyOptions, Inputs};
use crate::files::Doc;

/// `apply`, in one request when the documents fit, in parts when they do not; with the number
/// of steps that stored it.
pub async fn apply(
    admin: &AdminClient,
    inputs: &Inputs,
    options: ApplyOptions,
) -> anyhow::Result<(Applied, usize)> {
    let docs = inputs.policies.as_deref().unwrap_or_default();
    if docs.len() <= MAX_POLICIES_PER_ADD {
        // One step when it fits; a prune of more than one request changes goes in steps.
        match apply_one(admin, inputs, options.clone()).await {
            Err(e) if options.prune && format!("{e:#}").contains(TOO_MANY_CHANGES) => {}
            done => return done.map(|a| (a, 1)),
        }
    }
    // Prune goes last and alone, so it must name what it prunes: one source.
    let prune_source = match (options.prune, &options.prune_source) {
        (false, _) => None,
        (true, Some(s)) => Some(s.clone()),
        (true, None) => Some(one_source(docs)?),
    };
    let parts: Vec<&[Doc]> = docs.chunks(MAX_POLICIES_PER_ADD).collect();
    let request = |part: &[Doc], dry_run: bool, first: bool| Apply {
        subscriptions: if first {
            inputs.subscriptions.clone()
        } else {
            None
        },
        policies: Some(part.iter().map(|d| d.value.clone()).collect()),
        prune: false,
        dry_run,
        force: options.force,
        keep_going: options.keep_going,
        keep: Vec::new(),
        prune_source: None,
    };
    if !options.dry_run {
        // Every part validated before any is stored: a bad document stores nothing.
        for part in &parts {
            send(admin, &request(part, true, false), part).await?;
        }
    }
    let mut all: Option<Applied> = None;
    let mut steps = 0;
    for (n, part) in parts.iter().enumerate() {
        let applied = send(admin, &request(part, options.dry_run, n == 0), part)
            .await
            .map_err(|e| match n {
                0 => e,
                _ => anyhow::anyhow!(
                    "{e:#} (in part {} of {}; the {} parts before it were stored)",
                    n + 1,
                    parts.len(),
                    n
                ),
            })?;
        all = Some(merge(all, located(applied, part)));
        steps += 1;
        if !options.dry_run {
            eprintln!(
                "stored part {} of {} ({} documents)",
                n + 1,
                parts.len(),
                part.len()
            );
        }
    }
    let Some(mut all) = all else {
        bail!("no policy documents");
    };
    // Each part's `kept` listed the other parts' documents: only the last step's says.
    all.kept.clear();
    if let Some(source) = prune_source {
        let given: HashSet<PolicyRef> = docs
            .iter()
            .filter_map(|d| PolicyRef::of(&d.value).ok())
            .chain(inputs.refused.iter().filter_map(|r| r.keep.clone()))
            .collect();
        // What the prune removes, planned by a dry run (which may plan more than one request
        // changes), then removed in steps: each keeps the given documents and the rest of what
        // goes.
        let prune = |keep: Vec<PolicyRef>, dry_run: bool, subscriptions| Apply {
            subscriptions,
            policies: Some(Vec::new()),
            prune: true,
            dry_run,
            force: options.force,
            keep_going: options.keep_going,
            keep,
            prune_source: Some(source.clone()),
        };
        let plan = prune(given.iter().cloned().collect(), true, None);
        let gone: Vec<PolicyRef> = send(admin, &plan, &[])
            .await?
            .changes
            .iter()
            .filter(|c| c.op == ChangeOp::Remove && c.section == Section::Policy)
            .filter_map(|c| PolicyRef::from_name(&c.name))
            .collect();
        let removals: Vec<&[PolicyRef]> = match gone.is_empty() {
            true => vec![&[]],
            false => gone.chunks(MAX_CHANGES_PER_APPLY).collect(),
        };
        for step in removals {
            let now: HashSet<&PolicyRef> = step.iter().collect();
            let keep = given
                .iter()
                .chain(gone.iter().filter(|r| !now.contains(r)))
                .cloned()
                .collect();
            let last = prune(keep, options.dry_run, inputs.subscriptions.clone());
            let mut pruned = send(admin, &last, &[]).await?;
            // It was given no document: of what it kept, only what was not given is news.
            pruned.kept.retain(|k| {
                PolicyRef::from_name(&k.name)
                    .is_none_or(|r| !given.contains(&r) && !gone.contains(&r))
            });
            pruned.unchanged = 0;
            all = merge(Some(all), pruned);
            steps += 1;
        }
    }
    Ok((all, steps))
}

/// The one source of the given documents (`clusterlink`), for a prune that goes last.
fn one_source(docs: &[Doc]) -> anyhow::Result<String> {
    let mut sources = docs
        .iter()
        .map(|d| bus::origin::source_of(&d.value).map(str::to_owned));
    let first = sources.next().flatten();
    match first {
        Some(s) if sources.all(|o| o.as_deref() == Some(s.as_str())) => Ok(s),
        _ => bail!(
            "{} policy documents are applied in parts, and a prune then names one source: \
             give --prune-source, or apply each source's documents on their own",
            docs.len()
        ),
    }
}

/// A part's skipped documents, named by file and position now, while the part is known.
fn located(mut applied: Applied, part: &[Doc]) -> Applied {
    for s in &mut applied.skipped {
        s.error = crate::files::locate(&s.error, part);
    }
    applied
}

fn merge(all: Option<Applied>, next: Applied) -> Applied {
    let Some(mut all) = all else {
        return next;
    };
    all.changes.extend(next.changes);
    all.unchanged += next.unchanged;
    all.kept = next.kept;
    all.revision = next.revision;
    all.atomic &= next.atomic;
    all.skipped.extend(next.skipped);
    all
}
