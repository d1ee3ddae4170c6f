//! `apply` and `status`: the stored configuration made equal to a given one, the kubectl way.
//! Every subscription and policy is validated first (the policies by their agent kinds), the
//! changes are planned against each key's revision, and then stored in one step: one atomic
//! batch where the bucket takes them, otherwise key by key, each compared-and-set, with the
//! ones already written rolled back when one fails.

use std::collections::BTreeMap;

use bus::admin::{
    Applied, Apply, ChangeOp, Planned, PolicyAdd, PolicyAdded, PolicyRef, Section, Skipped, Status,
    MAX_CHANGES_PER_APPLY, TOO_MANY_CHANGES,
};
use bus::batch::{BatchError, Write};
use bus::config::{ConfigKey, WRITE_TIMEOUT};
use bus::{codec, ErrorCode, ErrorReply};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::admin::{
    check_subscribe, not_the_fleets, prepare_policies, reply, seen_here, unavailable,
};
use crate::prune::Prune;
use crate::Dispatcher;

#[path = "apply_read.rs"]
mod read;
use read::{given, stored, tombstone, Stored, LOOKUPS_AT_ONCE};

/// One planned write, with what to put back if a later one fails.
struct Step {
    planned: Planned,
    write: Write,
    old: Option<Bytes>,
}

fn bad(message: String) -> ErrorReply {
    ErrorReply::new(ErrorCode::BadRequest, message)
}

/// `sub.<event>.<kind>` → `<event>/<kind>`, `pol.<kind>.<id>` → `<kind>/<id>`.
fn name_of(key: &str) -> (Section, String) {
    match ConfigKey::parse(key) {
        Some(ConfigKey::Subscription { event, kind, .. }) => {
            (Section::Subscription, format!("{event}/{kind}"))
        }
        Some(ConfigKey::Policy { kind, id, .. }) => (Section::Policy, format!("{kind}/{id}")),
        None => (Section::Policy, key.to_string()),
    }
}

/// The given configuration, validated and encoded, by key; and the policies skipped under
/// `keep_going`.
async fn wanted(
    d: &Dispatcher,
    args: &Apply,
) -> Result<(BTreeMap<String, Bytes>, Vec<Skipped>), ErrorReply> {
    let mut out = BTreeMap::new();
    let mut skipped = Vec::new();
    for s in args.subscriptions.iter().flatten() {
        let at = format!("subscription {}/{}", s.event, s.agent);
        let kind = s.validate().map_err(|e| bad(format!("{at}: {e}")))?;
        if !args.force {
            check_subscribe(d, s, &kind)
                .await
                .map_err(|e| ErrorReply::new(e.code, format!("{at}: {}", e.message)))?;
        }
        let value = codec::encode("subscription", s)
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
        let key = ConfigKey::subscription(s.event.as_str(), kind.as_str());
        if out.insert(key, Bytes::from(value)).is_some() {
            return Err(bad(format!("{at} is given twice")));
        }
    }
    if let Some(policies) = args.policies.as_deref().filter(|p| !p.is_empty()) {
        let prepared = prepare_policies(d, policies, args.keep_going).await?;
        for (r, value) in prepared.docs {
            out.insert(ConfigKey::policy(&r.agent, &r.id), Bytes::from(value));
        }
        skipped = prepared.skipped;
    }
    let keys: Vec<&str> = out.keys().map(String::as_str).collect();
    not_the_fleets(d, &keys).await?;
    Ok((out, skipped))
}

/// The order writes go in, so that a reader that sees a key-by-key apply halfway never sees
/// a subscription before the policies it needs, or policies gone before their subscription:
/// policies added or changed, then subscriptions added or changed, then subscriptions
/// removed, then policies removed.
fn write_rank(p: &Planned) -> u8 {
    match (p.section, p.op) {
        (Section::Policy, ChangeOp::Add | ChangeOp::Change) => 0,
        (Section::Subscription, ChangeOp::Add | ChangeOp::Change) => 1,
        (Section::Subscription, ChangeOp::Remove) => 2,
        (Section::Policy, ChangeOp::Remove) => 3,
    }
}

/// What an apply does, before anything is written.
struct Plan {
    /// Sorted: subscriptions first, then by name.
    steps: Vec<Step>,
    kept: Vec<Planned>,
    /// The keys given that equal the stored ones.
    unchanged: Vec<String>,
}

/// Compares the wanted values with the stored ones. A new key's expected revision is left at
/// 0: the caller looks up whether it had a delete marker.
fn plan(
    wanted: &BTreeMap<String, Bytes>,
    have: &BTreeMap<String, Stored>,
    removes: impl Fn(&str, &[u8]) -> bool,
) -> Plan {
    let (mut steps, mut kept, mut unchanged) = (Vec::new(), Vec::new(), Vec::new());
    let step = |op, key: &str, value: Option<&Bytes>, expected_revision, old: Option<&Bytes>| {
        let (section, name) = name_of(key);
        Step {
            planned: Planned { op, section, name },
            write: Write {
                key: key.to_string(),
                value: value.cloned(),
                expected_revision,
            },
            old: old.cloned(),
        }
    };
    for (key, value) in wanted {
        match have.get(key) {
            Some(s) if s.value == *value => unchanged.push(key.clone()),
            Some(s) => steps.push(step(
                ChangeOp::Change,
                key,
                Some(value),
                s.revision,
                Some(&s.value),
            )),
            None => steps.push(step(ChangeOp::Add, key, Some(value), 0, None)),
        }
    }
    for (key, s) in have {
        if wanted.contains_key(key) {
            continue;
        }
        let planned = step(ChangeOp::Remove, key, None, s.revision, Some(&s.value));
        if removes(key, &s.value) {
            steps.push(planned);
        } else {
            kept.push(planned.planned);
        }
    }
    steps.sort_by(|a, b| a.planned.cmp(&b.planned));
    kept.sort();
    Plan {
        steps,
        kept,
        unchanged,
    }
}

pub(crate) async fn apply(d: &Dispatcher, args: Apply) -> Result<Bytes, ErrorReply> {
    // No policy given and no source named: every stored policy would be in scope.
    if args.prune
        && args.prune_source.is_none()
        && args.policies.as_ref().is_some_and(Vec::is_empty)
    {
        return Err(bad(
            "prune with no policy documents would remove every stored policy: give the ones to \
             keep, or name the source to prune (prune_source)"
                .into(),
        ));
    }
    reply(&run(d, &args, Scope::Sections).await?.0)
}

/// `policy-add` is an apply that removes nothing: the same validation, one atomic batch (or
/// key by key where the bucket takes none), and one confirmation from every dispatcher for
/// the whole request rather than one a document.
pub(crate) async fn policy_add(d: &Dispatcher, add: PolicyAdd) -> Result<Bytes, ErrorReply> {
    if add.policies.is_empty() {
        return Err(ErrorReply::new(
            ErrorCode::InvalidPolicy,
            "no policy documents given",
        ));
    }
    let args = Apply {
        subscriptions: None,
        policies: Some(add.policies),
        prune: false,
        dry_run: false,
        force: false,
        keep_going: false,
        keep: Vec::new(),
        prune_source: None,
    };
    let (applied, unchanged) = run(d, &args, Scope::Given).await?;
    let stored = applied
        .changes
        .iter()
        .filter_map(|c| PolicyRef::from_name(&c.name))
        .collect();
    // Keys to names as the plan names them (`name_of`).
    let unchanged = unchanged
        .iter()
        .filter_map(|k| PolicyRef::from_name(&name_of(k).1))
        .collect();
    reply(&PolicyAdded { stored, unchanged })
}

/// What a run compares the given configuration with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Every stored key of the sections given: what `apply` prunes or lists as kept.
    Sections,
    /// The given keys alone: `policy-add` removes nothing and lists nothing else, so a bulk
    /// load reads what it writes, not the whole bucket.
    Given,
}

/// Plans and stores `args`; the reply, and the keys given that were stored already.
async fn run(
    d: &Dispatcher,
    args: &Apply,
    scope: Scope,
) -> Result<(Applied, Vec<String>), ErrorReply> {
    let (wanted, skipped) = wanted(d, args).await?;
    let prune = Prune::new(args, &skipped);
    let revision_before = bus::watch::stream_state(&d.store)
        .await
        .map_err(unavailable)?
        .last_sequence;
    let mut have = BTreeMap::new();
    let mut tombstones = BTreeMap::new();
    match scope {
        Scope::Sections => {
            if args.subscriptions.is_some() {
                have.extend(stored(d, "sub.").await?);
            }
            if args.policies.is_some() {
                have.extend(stored(d, "pol.").await?);
            }
        }
        Scope::Given => (have, tombstones) = given(d, wanted.keys()).await?,
    }

    let mut plan = plan(&wanted, &have, |key, value| prune.removes(key, value));
    // A dry run writes nothing, so it may plan more: `policyctl` plans a large prune so, then
    // stores it in steps.
    if !args.dry_run && plan.steps.len() > MAX_CHANGES_PER_APPLY {
        return Err(bad(format!(
            "{} {TOO_MANY_CHANGES}; the limit is {MAX_CHANGES_PER_APPLY}: apply in parts \
             (without --prune, or each part would remove the others)",
            plan.steps.len()
        )));
    }
    // Many new keys (a bulk load) are looked up together, not one round trip after another.
    // Collected first: a stream holding the closure would not be `Send` for every lifetime.
    let lookups: Vec<_> = plan
        .steps
        .iter()
        .map(|s| {
            let add = s.planned.op == ChangeOp::Add;
            let known = tombstones.get(&s.write.key).copied();
            (add, known, s.write.key.clone())
        })
        .map(|(add, known, key)| async move {
            match (add, known, scope) {
                (false, _, _) => Ok(None),
                (true, Some(revision), _) => Ok(Some(revision)),
                // Read with the plan: no marker then, none now (the write checks it).
                (true, None, Scope::Given) => Ok(Some(0)),
                (true, None, Scope::Sections) => tombstone(d, &key).await.map(Some),
            }
        })
        .collect();
    let revisions: Vec<Option<u64>> = futures::stream::iter(lookups)
        .buffered(LOOKUPS_AT_ONCE)
        .try_collect()
        .await?;
    for (s, revision) in plan.steps.iter_mut().zip(revisions) {
        if let Some(r) = revision {
            s.write.expected_revision = r;
        }
    }
    let Plan {
        steps,
        kept,
        unchanged,
    } = plan;

    let atomic = bus::batch::atomic(&d.store);
    let revision = if args.dry_run || steps.is_empty() {
        revision_before
    } else if atomic {
        let mut ordered: Vec<&Step> = steps.iter().collect();
        ordered.sort_by_key(|s| write_rank(&s.planned));
        let writes: Vec<Write> = ordered.iter().map(|s| s.write.clone()).collect();
        let revision = bus::batch::write_atomic(&d.jet, &d.store, &writes)
            .await
            .map_err(conflict_or)?;
        tracing::info!(
            changes = writes.len(),
            revision,
            "applied in one atomic batch"
        );
        revision
    } else {
        let mut ordered: Vec<&Step> = steps.iter().collect();
        ordered.sort_by_key(|s| write_rank(&s.planned));
        write_each(d, &ordered).await?
    };
    if !args.dry_run && !steps.is_empty() {
        seen_here(d, revision).await;
        if steps.iter().any(|s| s.planned.section == Section::Policy) {
            // No dispatcher serves a cached verdict of the old set once this returns.
            crate::verdicts::everywhere(d, revision).await;
        }
    }
    let applied = Applied {
        changes: steps.into_iter().map(|s| s.planned).collect(),
        unchanged: unchanged.len(),
        kept,
        revision_before,
        revision,
        dry_run: args.dry_run,
        atomic,
        skipped,
    };
    Ok((applied, unchanged))
}

/// A refused batch changed nothing; most often someone else changed a key meanwhile.
fn conflict_or(e: BatchError) -> ErrorReply {
    let message = match &e {
        BatchError::Refused(why) if why.contains("wrong last sequence") => format!(
            "the stored configuration changed while this apply was planned ({why}); nothing was \
             stored: apply again"
        ),
        _ => e.to_string(),
    };
    ErrorReply::new(ErrorCode::Internal, message)
}

/// Key by key, for a bucket that takes no atomic batch: each write is compared-and-set
/// against the revision it was planned from, and when one fails the ones already written are
/// put back as they were, newest first, each compared-and-set against the revision it was
/// written at (so a rollback never overwrites someone else's later change).
async fn write_each(d: &Dispatcher, steps: &[&Step]) -> Result<u64, ErrorReply> {
    let mut done: Vec<(&Step, u64)> = Vec::with_capacity(steps.len());
    for s in steps {
        let written = match tokio::time::timeout(
            WRITE_TIMEOUT,
            bus::batch::write_one(&d.jet, &d.store, &s.write),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(BatchError::Unknown(
                "no answer from JetStream in time".into(),
            )),
        };
        let e = match written {
            Ok(revision) => {
                done.push((s, revision));
                continue;
            }
            Err(e) => e,
        };
        let what = format!(
            "{} {} {}",
            s.planned.op.mark(),
            s.planned.section.as_str(),
            s.planned.name
        );
        let maybe = match &e {
            BatchError::Unknown(_) => {
                " It may or may not have been stored itself: `policyctl diff` shows whether."
                    .to_string()
            }
            BatchError::Refused(_) => String::new(),
        };
        let message = match roll_back(d, &done).await {
            Ok(()) => format!(
                "storing {what} failed ({e}); the {} changes stored before it were rolled \
                 back.{maybe} Apply again",
                done.len()
            ),
            Err(names) => format!(
                "storing {what} failed ({e}), and rolling back failed for {}: the stored \
                 configuration is part old, part new; `policyctl diff` shows where, and \
                 applying again completes it.{maybe}",
                names.join(", ")
            ),
        };
        return Err(ErrorReply::new(ErrorCode::Internal, message));
    }
    Ok(done.last().map_or(0, |(_, r)| *r))
}

/// Puts back what `done` wrote, newest first; the names it could not put back.
async fn roll_back(d: &Dispatcher, done: &[(&Step, u64)]) -> Result<(), Vec<String>> {
    let mut failed = Vec::new();
    for (s, revision) in done.iter().rev() {
        let undo = Write {
            key: s.write.key.clone(),
            value: s.old.clone(),
            expected_revision: *revision,
        };
        let put_back = tokio::time::timeout(
            WRITE_TIMEOUT,
            bus::batch::write_one(&d.jet, &d.store, &undo),
        )
        .await;
        if !matches!(put_back, Ok(Ok(_))) {
            failed.push(s.planned.name.clone());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed)
    }
}

pub(crate) async fn status(d: &Dispatcher) -> Result<Bytes, ErrorReply> {
    let revision = bus::watch::stream_state(&d.store)
        .await
        .map_err(unavailable)?
        .last_sequence;
    // Deleted keys keep a marker in the stream: only the live ones are counted, within the
    // operator's (default) timeout.
    let keys = crate::admin::entries_within(d, &["sub.", "pol."], WRITE_TIMEOUT).await?;
    let count = |prefix: &str| keys.keys().filter(|k| k.starts_with(prefix)).count();
    reply(&Status {
        revision,
        subscriptions: count("sub."),
        policies: count("pol."),
        atomic_apply: bus::batch::atomic(&d.store),
        fleet: d.fleet.as_deref().map(crate::fleet::Fleet::status),
        sites: match &d.hub {
            Some(hub) => {
                let bucket = d.subjects.config_bucket();
                let newest = crate::fleet::newest_revision(&d.store.stream, &bucket)
                    .await
                    .map_err(unavailable)?;
                hub.status(newest).await
            }
            None => Vec::new(),
        },
    })
}

#[cfg(test)]
#[path = "apply_tests.rs"]
mod tests;
