//! The admin commands on subscriptions and policies, stored in the config bucket, and what
//! every admin command shares (replies, errors, reading and validating the stored
//! configuration). A policy is validated by its agent kind before anything is stored.
//! `crate::commands` routes each command here, to `crate::apply` or to `crate::modules`.

use std::time::Duration;

use async_nats::HeaderMap;
use bus::admin::{
    Done, ListSubscriptions, Policies, PolicyList, PolicyRef, PolicyRemove, Subscribe,
    Subscription, Subscriptions, Unsubscribe,
};
use bus::client::{call, ClientError};
use bus::config::{ConfigKey, WRITE_TIMEOUT};
use bus::subject::{did_you_mean, SHIPPED_KINDS};
use bus::{codec, ErrorCode, ErrorReply, Kind, Value};
use bytes::Bytes;
use futures::StreamExt;

use crate::Dispatcher;

/// How long an agent may take to validate one policy document.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `subscribe` waits for a kind's instance to answer `$SRV.PING`.
const PING_WINDOW: Duration = Duration::from_millis(500);

pub(crate) use crate::replies::{reply, unavailable};

/// Refuses a site's write of a key the fleet holds (at a site of a fleet, `bus::fleet`): the
/// fleet's document would shadow it, and the operator would think it applied. One key is one
/// read; more are checked against one listing.
pub(crate) async fn not_the_fleets(d: &Dispatcher, keys: &[&str]) -> Result<(), ErrorReply> {
    if d.fleet.is_none() {
        return Ok(());
    }
    let fleet_key = |k: &str| format!("{}{k}", bus::fleet::FLEET_KEYS);
    let held: Vec<&str> = match keys {
        [] => Vec::new(),
        [key] => match d.store.get(fleet_key(key)).await.map_err(unavailable)? {
            Some(_) => vec![*key],
            None => Vec::new(),
        },
        _ => {
            let fleet = entries(d, bus::fleet::FLEET_KEYS).await?;
            keys.iter()
                .copied()
                .filter(|k| fleet.contains_key(&fleet_key(k)))
                .collect()
        }
    };
    let Some(first) = held.first() else {
        return Ok(());
    };
    let name = match ConfigKey::parse(first) {
        Some(ConfigKey::Policy { kind, id, .. }) => format!("policy `{kind}/{id}`"),
        Some(ConfigKey::Subscription { event, kind, .. }) => {
            format!("subscription `{event}/{kind}`")
        }
        None => format!("`{first}`"),
    };
    Err(ErrorReply::new(
        ErrorCode::BadRequest,
        format!(
            "{name} is the fleet's (applied at the hub{}): a site's document would be shadowed \
             by it; give it an id of its own, or change the fleet's with `policyctl --fleet`",
            match held.len() {
                1 => String::new(),
                n => format!("; {} more of this request are too", n - 1),
            }
        ),
    ))
}

/// Writes a key, then waits (briefly) until this dispatcher's table shows the write, so an
/// operator's next event through this instance already sees it.
async fn put(d: &Dispatcher, key: String, value: Vec<u8>) -> Result<(), ErrorReply> {
    let revision = tokio::time::timeout(WRITE_TIMEOUT, d.store.put(&key, value.into()))
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
    if key.starts_with("sub.") {
        seen_here(d, revision).await;
    } else {
        // A policy: no dispatcher serves a cached verdict of the old set once this returns.
        crate::verdicts::everywhere(d, revision).await;
    }
    Ok(())
}

/// Waits (briefly) until this dispatcher's table reflects bucket revision `revision`.
pub(crate) async fn seen_here(d: &Dispatcher, revision: u64) {
    let mut seen = d.table.revision();
    let _ = tokio::time::timeout(WRITE_TIMEOUT, seen.wait_for(|r| *r >= revision)).await;
}

fn bad_name(e: impl std::fmt::Display) -> ErrorReply {
    ErrorReply::new(ErrorCode::BadRequest, e.to_string())
}

/// Says, in the operator's words, that `key` holds nothing, with the closest stored name.
async fn not_stored(d: &Dispatcher, key: &str) -> ErrorReply {
    let (what, prefix, name) = match ConfigKey::parse(key) {
        Some(ConfigKey::Policy { kind, id, .. }) => ("policy", "pol.", format!("{kind}/{id}")),
        Some(ConfigKey::Subscription { event, kind, .. }) => {
            ("subscription", "sub.", format!("{event}/{kind}"))
        }
        None => ("key", "", key.to_string()),
    };
    let stored: Vec<String> = match list(d, prefix).await {
        Ok(entries) => entries
            .into_iter()
            .filter_map(|(k, _)| match ConfigKey::parse(&k)? {
                ConfigKey::Policy { kind, id, .. } => Some(format!("{kind}/{id}")),
                ConfigKey::Subscription { event, kind, .. } => Some(format!("{event}/{kind}")),
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    ErrorReply::new(
        ErrorCode::NotFound,
        format!("no {what} `{name}` is stored{}", suggestion(&name, &stored)),
    )
}

async fn delete(d: &Dispatcher, key: &str) -> Result<(), ErrorReply> {
    match d.store.get(key).await.map_err(unavailable)? {
        None => Err(not_stored(d, key).await),
        Some(_) => {
            tokio::time::timeout(WRITE_TIMEOUT, d.store.delete(key))
                .await
                .map_err(unavailable)?
                .map_err(unavailable)?;
            // The delete marker is the stream's newest message: wait until it is applied.
            if let Ok(state) = bus::watch::stream_state(&d.store).await {
                if key.starts_with("sub.") {
                    seen_here(d, state.last_sequence).await;
                } else {
                    crate::verdicts::everywhere(d, state.last_sequence).await;
                }
            }
            Ok(())
        }
    }
}

/// The values of every key under `prefix`, in key order.
async fn list(d: &Dispatcher, prefix: &str) -> Result<Vec<(String, Bytes)>, ErrorReply> {
    Ok(entries(d, prefix)
        .await?
        .into_iter()
        .map(|(k, (value, _))| (k, value))
        .collect())
}

/// Every stored key under `prefix` with its value and revision, in key order. While the
/// bucket's stream has no leader (a node was just lost) its reads hang: the operator gets a
/// prompt "unavailable" instead.
pub(crate) async fn entries(
    d: &Dispatcher,
    prefix: &str,
) -> Result<std::collections::BTreeMap<String, (Bytes, u64)>, ErrorReply> {
    entries_under(d, &[prefix]).await
}

/// [`entries`] under any of `prefixes`, in one listing of the bucket's keys.
pub(crate) async fn entries_under(
    d: &Dispatcher,
    prefixes: &[&str],
) -> Result<std::collections::BTreeMap<String, (Bytes, u64)>, ErrorReply> {
    entries_within(d, prefixes, LIST_TIMEOUT).await
}

/// [`entries_under`], answered within `within` or "unavailable".
pub(crate) async fn entries_within(
    d: &Dispatcher,
    prefixes: &[&str],
    within: std::time::Duration,
) -> Result<std::collections::BTreeMap<String, (Bytes, u64)>, ErrorReply> {
    let read = bus::bucket::entries(
        &d.store,
        prefixes,
        READS_AT_ONCE,
        bus::bucket::Read::AnyReplica,
    );
    tokio::time::timeout(within, read)
        .await
        .map_err(|_| unavailable("no answer from JetStream in time"))?
        .map_err(unavailable)
}

/// ` (did you mean `x`?)` when a known name is close to a mistyped one.
fn suggestion(word: &str, known: &[String]) -> String {
    did_you_mean(word, known.iter().map(String::as_str))
        .map(|k| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default()
}

/// Refuses what is almost surely a typo: an event neither in the contract nor subscribed, or
/// a kind nobody knows with no live instance (a chain with a kind nobody runs denies every
/// decision). A shipped kind, a deployed module's, or one already subscribed to some event, is known: its
/// subscription is stored before its instances start, as a GitOps or compose start-up order
/// needs, and its events are denied (`no-live-instance`) until one answers.
pub(crate) async fn check_subscribe(
    d: &Dispatcher,
    sub: &Subscription,
    kind: &Kind,
) -> Result<(), ErrorReply> {
    let events = d.table.events();
    if !sub.event.is_contract() && !events.iter().any(|e| e == sub.event.as_str()) {
        let mut known: Vec<String> = bus::event::CONTRACT_EVENTS
            .iter()
            .map(|e| e.to_string())
            .collect();
        known.extend(events);
        return Err(ErrorReply::new(
            ErrorCode::UnknownEvent,
            format!(
                "event `{}` is not an event of the contract and nothing is subscribed to it{}; \
                 subscribe with --force (force: true) to start a new event",
                sub.event,
                suggestion(sub.event.as_str(), &known)
            ),
        ));
    }
    let service = bus::headers::agent_service(kind);
    let live = bus::client::any_instance(&d.nats, &service, PING_WINDOW)
        .await
        .unwrap_or(false);
    let known_kind = || async {
        SHIPPED_KINDS.contains(&kind.as_str())
            || d.table.kinds().iter().any(|k| k == kind.as_str())
            || crate::modules::deployed(d, kind).await
    };
    if !live && !known_kind().await {
        let mut known: Vec<String> = SHIPPED_KINDS.iter().map(|k| k.to_string()).collect();
        known.extend(d.table.kinds());
        return Err(ErrorReply::new(
            ErrorCode::NotFound,
            format!(
                "no live instance of agent kind `{kind}` answers $SRV.PING.{service}{}; \
                 start `policy-agent {kind}` first, or subscribe with --force (force: true)",
                suggestion(kind.as_str(), &known)
            ),
        ));
    }
    Ok(())
}

pub(crate) async fn subscribe(d: &Dispatcher, args: Subscribe) -> Result<Bytes, ErrorReply> {
    let sub = args.subscription();
    let kind = sub
        .validate()
        .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e))?;
    if !args.force {
        check_subscribe(d, &sub, &kind).await?;
    }
    let value = codec::encode("subscription", &sub)
        .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
    let key = ConfigKey::subscription(sub.event.as_str(), kind.as_str());
    not_the_fleets(d, &[&key]).await?;
    put(d, key, value).await?;
    reply(&Done { ok: true })
}

pub(crate) async fn unsubscribe(d: &Dispatcher, u: Unsubscribe) -> Result<Bytes, ErrorReply> {
    let kind = Kind::new(&u.agent).map_err(bad_name)?;
    delete(d, &ConfigKey::subscription(u.event.as_str(), kind.as_str())).await?;
    reply(&Done { ok: true })
}

pub(crate) async fn subscriptions(
    d: &Dispatcher,
    q: ListSubscriptions,
) -> Result<Bytes, ErrorReply> {
    let prefix = match &q.event {
        Some(e) => format!("sub.{e}."),
        None => "sub.".to_string(),
    };
    // The site's and the fleet's, in one listing (a cluster that just lost a node answers
    // slowly: one listing fits the operator's timeout where two may not).
    let fleet = format!("{}{prefix}", bus::fleet::FLEET_KEYS);
    let mut levels = [Vec::new(), Vec::new()];
    for (key, (value, _)) in entries_under(d, &[&prefix, &fleet]).await? {
        let i = usize::from(key.starts_with(bus::fleet::FLEET_KEYS));
        match codec::decode::<Subscription>("subscription", &value) {
            Ok(s) => levels[i].push(s),
            Err(e) => tracing::warn!(%key, error = %e, "stored subscription does not decode"),
        }
    }
    for level in &mut levels {
        level.sort_by(|a: &Subscription, b| {
            (a.event.as_str(), a.priority, &a.agent).cmp(&(b.event.as_str(), b.priority, &b.agent))
        });
    }
    let [subscriptions, fleet] = levels;
    reply(&Subscriptions {
        subscriptions,
        fleet,
    })
}

/// Asks the agent kind whether a document is a valid policy of its kind.
async fn validate(
    d: &Dispatcher,
    index: usize,
    r: &PolicyRef,
    doc: &[u8],
) -> Result<(), ErrorReply> {
    let at = format!("document {} ({}/{})", index + 1, r.agent, r.id);
    let kind = Kind::new(&r.agent)
        .map_err(|e| ErrorReply::new(ErrorCode::InvalidPolicy, format!("{at}: {e}")))?;
    let subject = d.subjects.agent_validate(&kind);
    match call(
        &d.nats,
        subject,
        HeaderMap::new(),
        Bytes::copy_from_slice(doc),
        VALIDATE_TIMEOUT,
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(ClientError::Remote(e)) if e.code == ErrorCode::InvalidPolicy => Err(ErrorReply::new(
            ErrorCode::InvalidPolicy,
            format!("{at}: {}", e.message),
        )),
        Err(ClientError::NoResponders { .. }) => Err(ErrorReply::new(
            ErrorCode::AgentError,
            format!(
                "{at}: no live {} agent to validate it; start `policy-agent {}` first",
                r.agent, r.agent
            ),
        )),
        Err(ClientError::Timeout { .. }) => Err(ErrorReply::new(
            ErrorCode::AgentTimeout,
            format!(
                "{at}: the {} agent did not validate it within {VALIDATE_TIMEOUT:?}",
                r.agent
            ),
        )),
        Err(e) => Err(ErrorReply::new(ErrorCode::AgentError, format!("{at}: {e}"))),
    }
}

/// Entries read at once when a command lists the bucket: a bulk-loaded bucket holds
/// thousands, and each is a round trip.
const READS_AT_ONCE: usize = 256;
/// A listing of a large bucket takes a while; the CLI waits longer for the commands that list.
const LIST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(25);

/// Validations in flight at once for one request.
const VALIDATIONS_AT_ONCE: usize = 64;

/// Policies validated and encoded, and (under `keep_going`) the ones their kinds refused.
pub(crate) struct Prepared {
    pub docs: Vec<(PolicyRef, Vec<u8>)>,
    pub skipped: Vec<bus::admin::Skipped>,
}

/// Checks every document before any is stored: a bad one fails the request, or with
/// `keep_going` is set aside with its error. A kind that cannot be asked (no live instance,
/// no answer in time) fails the request either way: that is no document's fault.
pub(crate) async fn prepare_policies(
    d: &Dispatcher,
    policies: &[Value],
    keep_going: bool,
) -> Result<Prepared, ErrorReply> {
    if policies.len() > bus::admin::MAX_POLICIES_PER_ADD {
        return Err(ErrorReply::new(
            ErrorCode::InvalidPolicy,
            format!(
                "{} policy documents in one request; the limit is {}: split them",
                policies.len(),
                bus::admin::MAX_POLICIES_PER_ADD
            ),
        ));
    }
    let mut skipped = Vec::new();
    let mut skip = |document: usize, name: Option<String>, e: ErrorReply| {
        if !keep_going || e.code != ErrorCode::InvalidPolicy {
            return Err(e);
        }
        skipped.push(bus::admin::Skipped {
            document,
            name,
            error: e.message,
        });
        Ok(())
    };
    let mut docs: Vec<(usize, PolicyRef, Vec<u8>)> = Vec::with_capacity(policies.len());
    // Under `keep_going`, an id given twice skips every copy: which one was meant is unknown,
    // so the stored document stays as it is.
    let mut twice = std::collections::BTreeSet::new();
    // Each ref's index in `docs`: a bulk load holds thousands.
    let mut seen: std::collections::HashMap<PolicyRef, usize> =
        std::collections::HashMap::with_capacity(policies.len());
    for (i, doc) in policies.iter().enumerate() {
        let r = match PolicyRef::of(doc) {
            Ok(r) => r,
            Err(e) => {
                let e =
                    ErrorReply::new(ErrorCode::InvalidPolicy, format!("document {}: {e}", i + 1));
                skip(i + 1, None, e)?;
                continue;
            }
        };
        if let Some(&k) = seen.get(&r) {
            let message = format!(
                "document {}: {} is also document {}",
                i + 1,
                r.name(),
                docs[k].0
            );
            skip(
                i + 1,
                Some(r.name()),
                ErrorReply::new(ErrorCode::InvalidPolicy, message),
            )?;
            twice.insert(k);
            continue;
        }
        let bytes = codec::encode("policy", doc)
            .map_err(|e| ErrorReply::new(ErrorCode::InvalidPolicy, e.to_string()))?;
        seen.insert(r.clone(), docs.len());
        docs.push((i + 1, r, bytes));
    }
    // Every document is validated before any is stored: a bad file changes nothing. Many at
    // once: a bulk load waits on round trips to the agents, not on their work.
    // Collected first: a stream holding the closure would not be `Send` for every lifetime.
    let checks: Vec<_> = docs
        .iter()
        .map(|(position, r, bytes)| validate(d, *position - 1, r, bytes))
        .collect();
    let results: Vec<Result<(), ErrorReply>> = futures::stream::iter(checks)
        .buffered(VALIDATIONS_AT_ONCE)
        .collect()
        .await;
    let mut refused = vec![false; docs.len()];
    for k in twice {
        let (position, r, _) = &docs[k];
        let message = format!(
            "document {position}: {} is given again later: every copy is skipped",
            r.name()
        );
        let e = ErrorReply::new(ErrorCode::InvalidPolicy, message);
        skip(*position, Some(r.name()), e)?;
        refused[k] = true;
    }
    for (i, result) in results.into_iter().enumerate() {
        if refused[i] {
            continue;
        }
        if let Err(e) = result {
            let (position, r, _) = &docs[i];
            skip(*position, Some(r.name()), e)?;
            refused[i] = true;
        }
    }
    let docs = docs
        .into_iter()
        .zip(refused)
        .filter(|(_, refused)| !refused)
        .map(|((_, r, bytes), _)| (r, bytes))
        .collect();
    Ok(Prepared { docs, skipped })
}

pub(crate) async fn policy_remove(d: &Dispatcher, r: PolicyRemove) -> Result<Bytes, ErrorReply> {
    let kind = Kind::new(&r.agent).map_err(bad_name)?;
    bus::admin::check_policy_id(&r.id).map_err(bad_name)?;
    delete(d, &ConfigKey::policy(kind.as_str(), &r.id)).await?;
    reply(&Done { ok: true })
}

pub(crate) async fn policy_list(d: &Dispatcher, q: PolicyList) -> Result<Bytes, ErrorReply> {
    let prefix = match &q.agent {
        Some(a) => format!("pol.{}.", Kind::new(a).map_err(bad_name)?),
        None => "pol.".to_string(),
    };
    let fleet = format!("{}{prefix}", bus::fleet::FLEET_KEYS);
    let mut levels = [Vec::new(), Vec::new()];
    for (key, (value, _)) in entries_under(d, &[&prefix, &fleet]).await? {
        let i = usize::from(key.starts_with(bus::fleet::FLEET_KEYS));
        match codec::decode::<Value>("policy", &value) {
            Ok(v) => levels[i].push(v),
            Err(e) => tracing::warn!(%key, error = %e, "stored policy does not decode"),
        }
    }
    let [policies, fleet] = levels;
    reply(&Policies { policies, fleet })
}
