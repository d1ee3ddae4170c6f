//! The dispatcher: takes events from hookpoints, runs their chains, answers with the merged
//! decision, publishes it on the tap, and serves the admin commands.
#![forbid(unsafe_code)]

pub mod admin;
mod apply;
pub mod chain;
mod commands;
mod decide;
mod fleet;
mod hub;
mod metrics;
mod modules;
mod peers;
mod prune;
mod replies;
mod sources;
pub mod table;
mod tap;
mod undo;
mod verdicts;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_nats::HeaderMap;
use bus::config::{self, ConfigKey};
use bus::limits::Limits;
use bus::roles::Role;
use bus::watch;
use bus::{headers, Subjects};
use daemon::service::{Endpoint, EndpointSpec, Request, Service};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::table::Table;

#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error(transparent)]
    Daemon(#[from] daemon::DaemonError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot register with the NATS services API: {0}")]
    Service(String),
    #[error("fleet: {0}")]
    Fleet(String),
}

/// Tunables that are not part of the contract.
#[derive(Clone)]
pub struct Options {
    /// Events handled at once by this instance; past it, new events wait in NATS.
    pub max_in_flight: usize,
    /// Admin commands handled at once; past it, they wait in NATS.
    pub max_admin_in_flight: usize,
    /// Bounds on an event payload, checked before it is decoded.
    pub limits: Limits,
    /// Bytes of one agent's answer (its `Policy-State` header or payload); a larger answer
    /// counts as a failed agent.
    pub max_patch_bytes: usize,
    /// Answers the verdict cache keeps at most; 0 turns it off.
    pub verdict_cache: usize,
    /// Bytes the verdict cache holds at most.
    pub verdict_cache_bytes: usize,
    /// Metrics and readiness, served on `--metrics-addr`.
    pub telemetry: Option<Arc<daemon::telemetry::Telemetry>>,
    /// The durable decision log's bounds; `None` keeps no log.
    pub decision_log: Option<bus::decisions::Retention>,
    /// At a site of a fleet: the hub's JetStream domain, whose configuration the site's
    /// config bucket takes beside its own (see `bus::fleet`).
    pub fleet_hub: Option<String>,
    /// At the hub of a fleet: the sites (their JetStream domains) whose standing and decision
    /// log the hub takes (see `hub`).
    pub fleet_sites: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_in_flight: 512,
            max_admin_in_flight: 16,
            limits: Limits::default(),
            max_patch_bytes: 512 * 1024,
            verdict_cache: 10_000,
            verdict_cache_bytes: bus::cache::DEFAULT_MAX_BYTES,
            telemetry: None,
            decision_log: None,
            fleet_hub: None,
            fleet_sites: Vec::new(),
        }
    }
}

pub struct Dispatcher {
    pub(crate) nats: async_nats::Client,
    /// JetStream: the config bucket (`store`), the modules and the decision log, reached as
    /// the dispatcher's store identity on a secured bus (`bus::store`), else over `nats`.
    pub(crate) jet: bus::store::Jet,
    pub(crate) subjects: Subjects,
    pub(crate) table: Table,
    pub(crate) store: async_nats::jetstream::kv::Store,
    pub(crate) options: Options,
    /// Events being decided here, by event id: a hookpoint's hedged copy that lands on the
    /// same dispatcher is dropped (the first run answers it), rather than run the chain twice,
    /// which would take a second conn-limit slot and count twice against a rate limit.
    pub(crate) working: bus::hedge::InProgress,
    pub(crate) verdicts: verdicts::Verdicts,
    /// Peers taken out of the candidates (see [`peers`]).
    pub(crate) removed_peers: peers::Removed,
    pub(crate) metrics: Option<metrics::DispatcherMetrics>,
    /// Whether decisions also go to the durable decision log.
    pub(crate) log_decisions: bool,
    /// At a site of a fleet: whether it has had the fleet's configuration, and its lag.
    pub(crate) fleet: Option<Arc<fleet::Fleet>>,
    /// At the hub of a fleet: the sites it follows.
    pub(crate) hub: Option<hub::Hub>,
}

impl Dispatcher {
    async fn handle_event(self: Arc<Self>, req: Request) {
        let started = Instant::now();
        if req.message.reply.is_none() {
            // Nobody would get the decision, and the chain would still take conn-limit slots
            // and rate budget that no close ever returns.
            tracing::warn!(
                subject = %req.message.subject,
                event.id = headers::event_id(req.message.headers.as_ref()).unwrap_or("-"),
                "event refused: sent without a reply subject (publish it as a request)"
            );
            req.refused("event sent without a reply subject");
            return;
        }
        if let Some(id) = headers::get(req.message.headers.as_ref(), headers::POLICY_EVENT_ID) {
            if !headers::valid_event_id(id) {
                let shown: String = id.chars().take(headers::MAX_EVENT_ID).collect();
                tracing::warn!(subject = %req.message.subject, event.id = %shown, "event refused: bad Policy-Event-Id");
                if let Some(m) = &self.metrics {
                    m.refused(bus::ErrorCode::BadRequest.as_str());
                }
                let reply = bus::ErrorReply::new(
                    bus::ErrorCode::BadRequest,
                    format!(
                        "Policy-Event-Id must be 1 to {} characters of A-Z a-z 0-9 - _ .",
                        headers::MAX_EVENT_ID
                    ),
                )
                .to_reply(HeaderMap::new());
                respond(req, reply).await;
                return;
            }
        }
        if bus::hedge::past_deadline(req.message.headers.as_ref()) {
            // The hookpoint has stopped waiting (another dispatcher answered its hedge, or its
            // timeout passed): a chain run now would only take slots and budget.
            tracing::debug!(subject = %req.message.subject, "event past its deadline: not decided");
            if let Some(m) = &self.metrics {
                m.dropped();
            }
            req.dropped("past its deadline").await;
            return;
        }
        let _in_flight = self.metrics.as_ref().map(|m| m.started());
        let _working = match headers::get(req.message.headers.as_ref(), headers::POLICY_EVENT_ID) {
            Some(id) if !id.is_empty() => {
                let Some(working) = self.working.start(format!("{id} {}", req.message.subject))
                else {
                    tracing::debug!(subject = %req.message.subject, "hedged copy of an event in progress: dropped");
                    if let Some(m) = &self.metrics {
                        m.dropped();
                    }
                    req.dropped("copy of an event in progress").await;
                    return;
                };
                Some(working)
            }
            _ => None,
        };
        match self.decide(&req.message, started).await {
            Ok(decided) => {
                respond(req, decided.reply).await;
                if let Some(tap) = decided.tap {
                    self.tap(tap).await;
                }
                if let Some(undo) = decided.undo {
                    self.undo(undo).await;
                }
            }
            Err(err) => {
                if let Some(m) = &self.metrics {
                    m.refused(err.code.as_str());
                }
                tracing::warn!(
                    subject = %req.message.subject,
                    event.id = headers::event_id(req.message.headers.as_ref()).unwrap_or("-"),
                    error = %err,
                    "event rejected"
                );
                let mut h = HeaderMap::new();
                headers::propagate(req.message.headers.as_ref(), &mut h);
                respond(req, err.to_reply(h)).await;
            }
        }
    }

    async fn handle_admin(self: Arc<Self>, req: Request) {
        let command = self
            .subjects
            .admin_of(&req.message.subject)
            .unwrap_or_default()
            .to_string();
        let answer = commands::handle(&self, &command, &req.message.payload)
            .await
            .and_then(|body| replies::fitting(&self.nats, body));
        let reply = match answer {
            Ok(body) => {
                tracing::info!(%command, "admin command done");
                (HeaderMap::new(), body)
            }
            Err(err) => {
                tracing::warn!(%command, error = %err, "admin command failed");
                err.to_reply(HeaderMap::new())
            }
        };
        respond(req, reply).await;
    }
}

async fn respond(req: Request, (headers, body): decide::Reply) {
    // A failed send is logged by `respond`, with the event id.
    let _ = req.respond(headers, body).await;
}

/// Runs a dispatcher until `shutdown` resolves, then stops taking events and finishes those
/// in flight.
pub async fn run(
    common: &daemon::Common,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DispatcherError> {
    tokio::pin!(shutdown);
    // A dispatcher still waiting for NATS or its bucket stops on a signal too.
    let serving = tokio::select! {
        serving = start(common, options) => serving?,
        _ = &mut shutdown => {
            tracing::info!("stopped before it was ready");
            return Ok(());
        }
    };
    serving.serve(shutdown).await;
    Ok(())
}

/// A dispatcher that has loaded its subscriptions and subscribed its endpoints.
struct Serving {
    dispatcher: Arc<Dispatcher>,
    nats: async_nats::Client,
    events: Endpoint,
    admin: Endpoint,
    /// The config watch (subscriptions; policies, for the verdict cache), the task
    /// confirming policy changes to other dispatchers, and at a site of a fleet the one
    /// following the hub.
    watchers: Vec<tokio::task::JoinHandle<()>>,
    options: Options,
    /// Answers the services API for as long as the dispatcher runs.
    _service: Service,
}

async fn start(common: &daemon::Common, options: Options) -> Result<Serving, DispatcherError> {
    let subjects = common.subjects()?;
    let nats = common
        .connect(headers::DISPATCHER_SERVICE, true, &Role::Dispatcher)
        .await?;
    if let Some(t) = &options.telemetry {
        t.ready.connected(&nats);
    }
    let store_nats = common
        .connect_store(headers::DISPATCHER_SERVICE, true, &Role::Dispatcher, &nats)
        .await?;
    let store = config::open_waiting(
        &store_nats,
        &subjects,
        config::Opening {
            replicas: common.kv_replicas,
            access: config::Access::Owner,
            fleet_hub: options.fleet_hub.as_deref(),
        },
    )
    .await?;
    let jet = bus::store::Jet::reach(&store_nats, &subjects, bus::store::Store::Config).await?;
    // The decision log is for audits after the fact: a dispatcher that cannot open it still
    // decides, and says so.
    let log_decisions = match options.decision_log {
        None => false,
        Some(retention) => {
            match bus::decisions::ensure(&store_nats, &subjects, common.kv_replicas, retention)
                .await
            {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the decision log stream; deciding without it");
                    false
                }
            }
        }
    };
    let (fleet, hub) = fleet::open(
        &options,
        &jet,
        &subjects,
        &store,
        common.kv_replicas,
        log_decisions,
    )
    .await?;
    let dispatcher = Arc::new(Dispatcher {
        nats: nats.clone(),
        jet,
        subjects: subjects.clone(),
        table: Table::default(),
        store: store.clone(),
        options: options.clone(),
        working: Default::default(),
        verdicts: verdicts::Verdicts::new(options.verdict_cache, options.verdict_cache_bytes),
        removed_peers: Default::default(),
        metrics: options
            .telemetry
            .as_deref()
            .map(metrics::DispatcherMetrics::new),
        log_decisions,
        fleet,
        hub,
    });

    // One watch of the bucket feeds both the chain table (subscriptions) and the verdict
    // cache's fingerprints (policies), each loaded before the first event is taken: a new
    // instance never answers `no-subscribers` for an event that has them, and never stores an
    // answer under a policy set it has not seen. One consumer, not two, for JetStream to
    // recreate after a node is lost.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let watcher = {
        let d = dispatcher.clone();
        let mut subs = watch::Snapshot::default();
        let is_sub =
            |key: &str| matches!(ConfigKey::parse(key), Some(ConfigKey::Subscription { .. }));
        tokio::spawn(watch::watch(
            store.clone(),
            vec![">".to_string()],
            move |update| {
                let subs_changed = match &update {
                    watch::Update::Loaded(snap) => {
                        subs = watch::Snapshot {
                            values: snap
                                .values
                                .iter()
                                .filter(|(k, _)| is_sub(k))
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect(),
                            revisions: Default::default(),
                            revision: snap.revision,
                        };
                        true
                    }
                    watch::Update::Changed(changes) => {
                        let mut any = false;
                        for c in changes.iter().filter(|c| is_sub(c.key())) {
                            subs.apply(c);
                            any = true;
                        }
                        any
                    }
                };
                let revision = match &update {
                    watch::Update::Loaded(snap) => snap.revision,
                    watch::Update::Changed(changes) => {
                        changes.last().map_or(subs.revision, |c| c.revision())
                    }
                };
                if subs_changed {
                    d.table.load(&d.subjects, &subs);
                }
                d.table.reached(revision);
                if let Some(m) = &d.metrics {
                    m.config(revision, subs.values.len());
                }
                // Before the verdicts: the revision they confirm covers the peers too.
                d.removed_peers.apply(&update);
                d.verdicts.apply(update);
            },
            Some(ready_tx),
        ))
    };
    let _ = ready_rx.await;
    if let Some(t) = &options.telemetry {
        t.ready.loaded();
    }
    // Subscribed before this dispatcher answers `$SRV.PING`, so one that is counted confirms.
    let asks = nats
        .subscribe(subjects.dispatchers_seen())
        .await
        .map_err(|e| {
            DispatcherError::Service(format!(
                "cannot subscribe to {}: {e}",
                subjects.dispatchers_seen()
            ))
        })?;
    let confirming = tokio::spawn(verdicts::confirm(dispatcher.clone(), asks));
    let mut watchers = vec![watcher, confirming];
    watchers.extend(fleet::spawn(&dispatcher));

    let endpoint = |name, subject| EndpointSpec {
        name,
        subject,
        queue_group: "dispatcher".into(),
    };
    let (service, mut endpoints) = Service::start(
        &nats,
        headers::DISPATCHER_SERVICE,
        "policy-bus dispatcher",
        env!("CARGO_PKG_VERSION"),
        vec![
            endpoint("events", subjects.events_wildcard()),
            endpoint("admin", subjects.admin_wildcard()),
        ],
    )
    .await
    .map_err(|e| DispatcherError::Service(e.to_string()))?;
    let (Some(admin), Some(events)) = (endpoints.pop(), endpoints.pop()) else {
        return Err(DispatcherError::Service("endpoints missing".into()));
    };
    if let Some(t) = &options.telemetry {
        t.ready.serving();
    }
    tracing::info!(events = %subjects.events_wildcard(), admin = %subjects.admin_wildcard(), "ready");
    Ok(Serving {
        dispatcher,
        nats,
        events,
        admin,
        watchers,
        options,
        _service: service,
    })
}

impl Serving {
    /// Takes events and admin commands until `shutdown` resolves, then stops taking them and
    /// finishes (or, past the grace period or without NATS, abandons) those in flight.
    async fn serve(self, mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>) {
        let Serving {
            dispatcher,
            nats,
            mut events,
            mut admin,
            watchers,
            options,
            _service,
        } = self;
        let limit = Arc::new(Semaphore::new(options.max_in_flight.max(1)));
        let admin_limit = Arc::new(Semaphore::new(options.max_admin_in_flight.max(1)));
        let tracker = daemon::TaskTracker::new();
        let mut drain = daemon::Drain::default();
        let (mut events_open, mut admin_open) = (true, true);
        while events_open || admin_open {
            // Waiting for a permit before taking an event leaves excess events queued in NATS.
            let next_event = async {
                let permit = limit.clone().acquire_owned().await;
                (permit, events.next().await)
            };
            // Likewise for admin commands: a flood of them waits in NATS, not in memory.
            let next_admin = async {
                let permit = admin_limit.clone().acquire_owned().await;
                (permit, admin.next().await)
            };
            let deadline = drain.deadline();
            tokio::select! {
                biased;
                _ = &mut shutdown, if !drain.started() => {
                    // Stop taking new work; what the server already sent still comes, and is
                    // decided, before the endpoints end.
                    if let Some(t) = &options.telemetry {
                        t.ready.stopping();
                    }
                    drain.start(&nats, &mut [&mut events, &mut admin]).await;
                }
                _ = daemon::until(deadline) => {
                    tracing::warn!("the endpoints did not end within the drain window");
                    break;
                }
                (permit, req) = next_admin, if admin_open => {
                    let (Ok(permit), Some(req)) = (permit, req) else {
                        admin_open = false;
                        continue;
                    };
                    let d = dispatcher.clone();
                    tracker.spawn(async move {
                        d.handle_admin(req).await;
                        drop(permit);
                    });
                }
                (permit, req) = next_event, if events_open => {
                    let (Ok(permit), Some(req)) = (permit, req) else {
                        events_open = false;
                        continue;
                    };
                    let span = tracing::info_span!("event", event.id = tracing::field::Empty, subject = %req.message.subject);
                    if daemon::traces::enabled() {
                        daemon::traces::follow(&span, req.message.headers.as_ref());
                    }
                    let d = dispatcher.clone();
                    tracker.spawn(async move {
                        d.handle_event(req).await;
                        drop(permit);
                    }.instrument(span));
                }
            }
        }
        daemon::drain(&tracker, &nats).await;
        // Decision log records still on their way go out before the process does (over the
        // store identity's connection, when it has one; without NATS there is nothing to do).
        let store = dispatcher.jet.client();
        if store.connection_state() == async_nats::connection::State::Connected {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), store.flush()).await;
        }
        watchers.iter().for_each(|w| w.abort());
        tracing::info!("stopped");
    }
}
