//! At a site of a fleet (`--fleet-hub`, see `bus::fleet`): whether this site has ever had the
//! fleet's configuration, and how far behind the hub it is.
//!
//! A site that has never had it fails closed: its own documents alone might allow what the
//! fleet denies. So until the site has once held everything the hub had (the newest fleet
//! message it stores came from the hub's newest subscription or policy write), every event is
//! denied, saying why. That first sync is recorded in the site's own bucket
//! ([`bus::fleet::SYNCED_KEY`]), so a site restarted while cut off decides at once on what it
//! last had. Checking asks the hub, through the leaf connection, for its newest write: never
//! on a decision's path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::{self, stream};

use crate::Dispatcher;

/// How often the site compares what it has with the hub.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long one look at the hub may take: it is across a WAN, and may be cut off.
const HUB_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the source may stay behind, with the hub answering, before it is restarted.
/// nats-server 2.10 waits up to about 40 s before it tries a source again after a long cut;
/// 2.12 catches up in about a second by itself.
const STALLED_FOR: Duration = Duration::from_secs(3);
/// How long every look must find the hub's bucket made again before the site records it.
const RESET_AFTER: Duration = Duration::from_secs(5);

pub(crate) struct Fleet {
    hub: String,
    synced: AtomicBool,
    /// The hub's bucket is not the one this site's fleet documents came from: once seen,
    /// recorded in the site's bucket ([`bus::fleet::RESET_KEY`]) and reported until the site's
    /// bucket is made again (docs/fleet.md, A hub made again).
    reset: AtomicBool,
    view: Mutex<View>,
}

/// What the site knows of the hub, as of the last check.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct View {
    /// The hub revision of the newest fleet document this site holds (0: none).
    pub(crate) revision: u64,
    /// The hub's newest subscription or policy revision, when it last answered.
    pub(crate) hub_revision: Option<u64>,
    /// When the hub last answered.
    pub(crate) hub_seen: Option<Instant>,
}

/// Whether the hub has not answered for a while (a missed check or two are not news).
fn hub_lost(v: &View) -> bool {
    v.hub_seen
        .is_some_and(|t| t.elapsed() > CHECK_EVERY * 2 + HUB_TIMEOUT)
}

impl View {
    pub(crate) fn lag(&self) -> u64 {
        self.hub_revision
            .map_or(0, |h| h.saturating_sub(self.revision))
    }
}

impl Fleet {
    /// The site's standing as recorded in its bucket, read before it serves, so that a site
    /// restarted while cut off decides at once on what it had. A read that fails a few times
    /// leaves the site denying until [`follow`] can read it.
    pub(crate) async fn open(hub: String, store: &async_nats::jetstream::kv::Store) -> Self {
        let (mut synced, mut reset) = (false, false);
        for attempt in 1..=3 {
            match store.get(bus::fleet::SYNCED_KEY).await {
                Ok(v) => {
                    synced = v.is_some();
                    reset = matches!(store.get(bus::fleet::RESET_KEY).await, Ok(Some(_)));
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "cannot read whether this site ever had the fleet's configuration");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Fleet {
            hub,
            synced: AtomicBool::new(synced),
            reset: AtomicBool::new(reset),
            view: Mutex::new(View::default()),
        }
    }

    /// Why this site may not decide yet: it has never had the fleet's configuration.
    pub(crate) fn unsynced(&self) -> Option<String> {
        if self.synced.load(Ordering::Acquire) {
            return None;
        }
        let view = self.view();
        let why = match view.hub_revision {
            Some(0) => "the hub has no fleet documents yet (apply them there with `policyctl --fleet apply`)".to_string(),
            Some(h) => format!("it has fleet revision {} of the hub's {h} so far", view.revision),
            None => "the hub has not been reached since this dispatcher started".to_string(),
        };
        Some(format!(
            "this site has never had the fleet's configuration from the hub (JetStream domain \
             `{}`): {why}; the site's own documents alone might allow what the fleet denies",
            self.hub
        ))
    }

    fn view(&self) -> View {
        *self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn status(&self) -> bus::fleet::FleetStatus {
        let v = self.view();
        bus::fleet::FleetStatus {
            hub: self.hub.clone(),
            synced: self.synced.load(Ordering::Acquire),
            revision: v.revision,
            hub_revision: v.hub_revision,
            lag: v.lag(),
            hub_reset: self.reset.load(Ordering::Acquire),
            hub_seen_ms_ago: v
                .hub_seen
                .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// The newest message under `subject` (a wildcard) in `stream`, if any.
async fn newest<I>(
    stream: &stream::Stream<I>,
    subject: String,
) -> Result<Option<jetstream::message::StreamMessage>, String> {
    match stream.direct_get_last_for_subject(subject).await {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// This dispatcher's part in a fleet, from its options: a site's standing (`--fleet-hub`), or
/// the hub's following of its sites (`--fleet-sites`).
pub(crate) async fn open(
    options: &crate::Options,
    jet: &bus::store::Jet,
    subjects: &bus::Subjects,
    store: &async_nats::jetstream::kv::Store,
    replicas: usize,
    log_decisions: bool,
) -> Result<(Option<Arc<Fleet>>, Option<crate::hub::Hub>), crate::DispatcherError> {
    let fleet = match &options.fleet_hub {
        Some(hub) => Some(Arc::new(Fleet::open(hub.clone(), store).await)),
        None => None,
    };
    let hub = match options.fleet_sites.is_empty() {
        true => None,
        false => {
            let sites = options.fleet_sites.clone();
            Some(crate::hub::Hub::open(jet, subjects, replicas, sites, log_decisions).await?)
        }
    };
    Ok((fleet, hub))
}

/// The tasks of this dispatcher's part in a fleet.
pub(crate) fn spawn(d: &Arc<Dispatcher>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(f) = &d.fleet {
        tasks.push(tokio::spawn(follow(d.clone(), f.clone())));
    }
    if d.hub.is_some() {
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            if let Some(hub) = &d.hub {
                hub.follow(&d.jet).await;
            }
        }));
    }
    tasks
}

/// The newest subscription or policy write of the config bucket `bucket` held by `stream`
/// (0: none): the configuration revision a fleet's sites must have.
pub(crate) async fn newest_revision<I>(
    stream: &stream::Stream<I>,
    bucket: &str,
) -> Result<u64, String> {
    let mut newest_write = 0;
    for filter in bus::fleet::document_filters(bucket) {
        if let Some(m) = newest(stream, filter).await? {
            newest_write = newest_write.max(m.sequence);
        }
    }
    Ok(newest_write)
}

/// Whether the hub's bucket was made again since this site took its newest fleet document,
/// hub revision `revision` of subject `subject` there: the hub's revisions went back below
/// it, or its message of that revision is another key's. (A message of that revision that is
/// gone says nothing: a later write of the same key replaces it.)
async fn made_again<I>(
    stream: &stream::Stream<I>,
    revision: u64,
    subject: Option<&str>,
    newest: u64,
) -> Result<bool, String> {
    if revision == 0 {
        return Ok(false);
    }
    if newest < revision {
        return Ok(true);
    }
    let Some(subject) = subject else {
        return Ok(false);
    };
    match stream.direct_get(revision).await {
        Ok(m) => Ok(m.subject.as_str() != subject),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// Records, for good, that the hub's bucket is not the one this site's fleet documents came
/// from. The site keeps deciding on what it has (dropping the fleet's denies would be worse);
/// an operator makes the site's bucket again to take the new hub's (docs/fleet.md).
async fn record_reset(d: &Dispatcher, fleet: &Fleet, revision: u64, hub_revision: u64) {
    tracing::error!(hub = %fleet.hub, revision, hub_revision, "the hub's bucket is not the one this site's fleet documents came from (made again: its revisions started over); this site keeps deciding on the fleet's documents it has and takes none of the new bucket's below revision {revision}: see docs/fleet.md, A hub made again");
    let value = revision.to_string().into_bytes();
    match d.store.put(bus::fleet::RESET_KEY, value.into()).await {
        Ok(_) => fleet.reset.store(true, Ordering::Release),
        Err(e) => tracing::warn!(error = %e, "cannot record that the hub's bucket was made again"),
    }
}

/// Keeps the site's view of the fleet, and opens the site to decisions once it has synced.
pub(crate) async fn follow(d: Arc<Dispatcher>, fleet: Arc<Fleet>) {
    // On the secured bus the store identity reaches the hub's API through its own import, as
    // its site (its server's JetStream domain) reaches it.
    let site = d.jet.client().server_info().domain;
    let hub_js = match (d.jet.api(), site) {
        (Some(_), Some(site)) => jetstream::with_prefix(
            d.jet.client().clone(),
            &bus::fleet::hub_api_import(&d.subjects, &site),
        ),
        (Some(_), None) => {
            tracing::error!("this site's nats-server has no JetStream domain: a fleet's site needs one (its name), and cannot reach the hub without it");
            jetstream::with_domain(d.jet.client().clone(), &fleet.hub)
        }
        (None, _) => jetstream::with_domain(d.jet.client().clone(), &fleet.hub),
    };
    let hub_bucket = d.subjects.fleet().config_bucket();
    // Since when the source is behind without moving, and the revision it is stuck at.
    let mut stalled: Option<(Instant, u64)> = None;
    // The revision this site last reported as applied, for the hub to source.
    let mut reported: Option<u64> = match d.store.get(bus::fleet::REVISION_KEY).await {
        Ok(Some(v)) => String::from_utf8_lossy(&v).trim().parse().ok(),
        _ => None,
    };
    // Since when every look at the hub has found its bucket made again.
    let mut reset_since: Option<Instant> = None;
    // Once more, in case the read when the dispatcher opened failed.
    if matches!(d.store.get(bus::fleet::RESET_KEY).await, Ok(Some(_))) {
        fleet.reset.store(true, Ordering::Release);
    }
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The first sync, recorded earlier: read until known (a restarted server's stream may
        // not answer at once; until then the site fails closed).
        if !fleet.synced.load(Ordering::Acquire) {
            match d.store.get(bus::fleet::SYNCED_KEY).await {
                Ok(Some(_)) => fleet.synced.store(true, Ordering::Release),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read whether this site ever had the fleet's configuration; denying until it can")
                }
            }
        }
        ticks.tick().await;
        let site = d.store.stream.clone();
        // The hub's subject of the newest fleet document here.
        let mut newest_held: Option<String> = None;
        let held = match site
            .direct_get_last_for_subject(bus::fleet::fleet_documents_filter(&d.subjects))
            .await
        {
            Ok(m) => {
                newest_held = bus::fleet::hub_subject(&d.subjects, &m.subject);
                Some((
                    m.sequence,
                    m.headers
                        .get(bus::fleet::SOURCE_HEADER)
                        .and_then(|v| bus::fleet::source_sequence(v.as_str())),
                ))
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => None,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read this site's fleet documents");
                continue;
            }
        };
        // A fleet document without the source's header was written at the site by someone
        // else: it proves nothing about the hub.
        let (held_at, revision) = match held {
            Some((seq, Some(revision))) => (seq, revision),
            Some((_, None)) => {
                tracing::warn!("the newest fleet document here did not come from the hub's source (written at the site?)");
                (0, 0)
            }
            None => (0, 0),
        };
        let hub = tokio::time::timeout(HUB_TIMEOUT, async {
            let stream = hub_js
                .get_stream_no_info(format!("KV_{hub_bucket}"))
                .await
                .map_err(|e| e.to_string())?;
            let newest = newest_revision(&stream, &hub_bucket).await?;
            // A failed look at the message says nothing of the bucket: the hub answered.
            let reset = made_again(&stream, revision, newest_held.as_deref(), newest)
                .await
                .unwrap_or(false);
            Ok::<_, String>((newest, reset))
        })
        .await;
        let hub_revision = match hub {
            Ok(Ok((r, reset))) => {
                // Seen on every look for a while: a replica of a clustered hub that answers a
                // direct get may be a moment behind the one the site sourced from.
                reset_since = match (reset, reset_since) {
                    (false, _) => None,
                    (true, None) => Some(Instant::now()),
                    (true, since) => since,
                };
                let lasting = reset_since.is_some_and(|t| t.elapsed() >= RESET_AFTER);
                if lasting && !fleet.reset.load(Ordering::Acquire) {
                    record_reset(&d, &fleet, revision, r).await;
                }
                Some(r)
            }
            Ok(Err(e)) => {
                tracing::debug!(hub = %fleet.hub, error = %e, "the hub did not answer");
                None
            }
            Err(_) => None,
        };
        let view = {
            let mut v = fleet.view.lock().unwrap_or_else(|e| e.into_inner());
            match (v.hub_seen.is_some(), hub_revision) {
                (_, Some(h)) if v.hub_revision.is_none() || hub_lost(&v) => {
                    tracing::info!(hub = %fleet.hub, hub_revision = h, revision, "the hub answers")
                }
                (true, None) if !hub_lost(&v) => {
                    tracing::warn!(hub = %fleet.hub, revision, "the hub does not answer: deciding on the fleet's configuration this site has")
                }
                _ => {}
            }
            v.revision = revision;
            if let Some(h) = hub_revision {
                v.hub_revision = Some(h);
                v.hub_seen = Some(Instant::now());
            }
            *v
        };
        if let Some(m) = &d.metrics {
            let unreachable = view.hub_seen.map_or(Duration::ZERO, |t| {
                if hub_revision.is_some() {
                    Duration::ZERO
                } else {
                    t.elapsed()
                }
            });
            m.fleet(
                fleet.synced.load(Ordering::Acquire),
                view.revision,
                view.lag(),
                unreachable,
                fleet.reset.load(Ordering::Acquire),
            );
        }
        // Behind, with the hub answering, and not moving: the server is waiting to try the
        // source again. Taking it away and putting it back starts it at once, from the last
        // message it stored (nats-server resumes a source from its `Nats-Stream-Source`
        // headers), so nothing is lost or taken twice.
        let behind = hub_revision.is_some_and(|h| revision < h);
        match (&mut stalled, behind) {
            (Some((since, at)), true) if *at == revision => {
                if since.elapsed() >= STALLED_FOR {
                    restart_source(&d, &fleet.hub).await;
                    stalled = None;
                }
            }
            (_, true) => stalled = Some((Instant::now(), revision)),
            (_, false) => stalled = None,
        }
        // Synced once the site holds the hub's newest write and this dispatcher has loaded it.
        // A hub with no documents yet is not a configuration to decide on.
        let caught_up = hub_revision.is_some_and(|h| h > 0 && revision >= h)
            && d.verdicts.revision() >= held_at;
        if caught_up && !fleet.synced.load(Ordering::Acquire) {
            let value = format!("{revision}").into_bytes();
            match d.store.put(bus::fleet::SYNCED_KEY, value.into()).await {
                Ok(_) => {
                    tracing::info!(hub = %fleet.hub, revision, "this site has the fleet's configuration: deciding");
                    fleet.synced.store(true, Ordering::Release);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record that this site has the fleet's configuration")
                }
            }
        }
        // What this site decides on now, for the hub to see: written when it changes.
        let applied = d.verdicts.revision() >= held_at;
        if applied && fleet.synced.load(Ordering::Acquire) && reported != Some(revision) {
            let value = revision.to_string().into_bytes();
            match d.store.put(bus::fleet::REVISION_KEY, value.into()).await {
                Ok(_) => reported = Some(revision),
                Err(e) => tracing::debug!(error = %e, "cannot record the fleet revision applied"),
            }
        }
    }
}

/// Restarts the site bucket's source (see the caller), putting back the expected one.
async fn restart_source(d: &Dispatcher, hub: &str) {
    let expected = [bus::fleet::site_source(&d.jet, &d.subjects, hub)];
    let name = format!("KV_{}", d.subjects.config_bucket());
    match crate::sources::restart(&d.jet, &name, &expected, |_| true).await {
        Ok(_) => {
            tracing::info!("the fleet's source stayed behind with the hub answering: restarted it")
        }
        Err(e) => tracing::warn!(error = %e, "cannot restart the fleet's source"),
    }
}
