//! The dispatcher: takes events from hookpoints, runs their chains, answers with the merged
//! decision, publishes it on the tap, and serves the admin commands.
#![forbid(unsafe_code)]

pub mod admin;
pub mod chain;
pub mod table;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use bus::config::{self, ConfigKey};
use bus::event::{new_id, Event, EventName};
use bus::limits::Limits;
use bus::roles::Role;
use bus::state::keys;
use bus::tap::{Outcome, TapRecord};
use bus::{codec, headers, ErrorCode, ErrorReply, Subjects};
use bytes::Bytes;
use daemon::service::{Endpoint, EndpointSpec, Request, Service};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::chain::{finalize, Call};
use crate::table::Table;

#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error(transparent)]
    Daemon(#[from] daemon::DaemonError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot register with the NATS services API: {0}")]
    Service(String),
}

/// Tunables that are not part of the contract.
#[derive(Debug, Clone)]
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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_in_flight: 4096,
            max_admin_in_flight: 16,
            limits: Limits::default(),
            max_patch_bytes: 512 * 1024,
        }
    }
}

pub struct Dispatcher {
    pub(crate) nats: async_nats::Client,
    pub(crate) subjects: Subjects,
    pub(crate) table: Table,
    pub(crate) store: async_nats::jetstream::kv::Store,
    pub(crate) options: Options,
    /// Events being decided here, by event id: a hookpoint's hedged copy that lands on the
    /// same dispatcher is dropped (the first run answers it), rather than run the chain twice,
    /// which would take a second conn-limit slot and count twice against a rate limit.
    pub(crate) working: bus::hedge::InProgress,
}

type Reply = (HeaderMap, Bytes);

/// How long an undo no kind instance confirmed is asked again, in the background.
const UNDO_RETRY_FOR: Duration = Duration::from_secs(120);

/// How long a kind has to confirm an undo, hedged like any agent call.
const UNDO_TIMEOUT: Duration = Duration::from_secs(1);

impl Dispatcher {
    /// Decides one event. Errors are the caller's or the configuration's: a failed agent is
    /// not an error but a (deny or degraded) decision.
    async fn decide(
        &self,
        msg: &async_nats::Message,
        started: Instant,
    ) -> Result<(Reply, Option<chain::Undo>), ErrorReply> {
        let raw = self.subjects.event_of(&msg.subject).unwrap_or_default();
        let name = EventName::new(raw)
            .map_err(|e| ErrorReply::new(ErrorCode::UnknownEvent, e.to_string()))?;
        let Some(chain) = self.table.chain(name.as_str()) else {
            return Err(if name.is_contract() {
                ErrorReply::new(
                    ErrorCode::NoSubscribers,
                    format!("no agent is subscribed to {name}: policyctl subscribe {name} <agent> --priority N"),
                )
            } else {
                ErrorReply::new(
                    ErrorCode::UnknownEvent,
                    format!("unknown event {name:?}: not an event of the contract and no agent is subscribed to it"),
                )
            });
        };
        self.options
            .limits
            .check_event(&msg.payload)
            .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, format!("{name} event: {e}")))?;
        let mut event = Event::decode(&name, &msg.payload)
            .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))?;

        let mut trace = HeaderMap::new();
        headers::propagate(msg.headers.as_ref(), &mut trace);
        let event_id = match headers::get(msg.headers.as_ref(), headers::POLICY_EVENT_ID) {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => {
                let id = new_id();
                trace.insert(headers::POLICY_EVENT_ID, id.as_str());
                id
            }
        };
        tracing::Span::current().record("event.id", event_id.as_str());

        // Stateful agents key on the connection id, so it must exist before the chain runs. It
        // is written into the hookpoint's own payload, so attributes this version does not know
        // still reach the agents.
        let mut payload = msg.payload.clone();
        let mut connection_id = None;
        match &mut event {
            Event::NewConnection(nc) => {
                let id = match event_connection_id(nc) {
                    Some(id) => id,
                    None => {
                        let id = new_id();
                        payload = bus::event::set_attribute(
                            &msg.payload,
                            keys::CONNECTION_ID,
                            id.as_str().into(),
                        )
                        .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?
                        .into();
                        nc.connection_id = Some(id.clone());
                        id
                    }
                };
                connection_id = Some(id);
            }
            Event::ConnectionClosed(cc) if cc.connection_id.is_empty() => {
                return Err(ErrorReply::new(
                    ErrorCode::BadRequest,
                    "bad connection-closed event: connection_id is empty",
                ));
            }
            _ => {}
        }

        let mut state = event.initial_state();
        if let Some(id) = &connection_id {
            state.insert(keys::CONNECTION_ID, id.as_str());
        }
        // Agents may key on the event (conn-limit's slots do, so a hedged duplicate's slot is
        // freed with the original's); like the connection id, no patch can change it.
        state.insert(keys::EVENT_ID, event_id.as_str());
        state.insert(keys::RUN_ID, new_id().as_str());
        // The candidates travel to the agents once, in the state.
        let to_agents = bus::event::without_candidates(&payload)
            .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))?;
        let state_bytes = state
            .encode()
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?
            .len();
        // What each agent call carries: the payload, the state in base64, the headers. An event
        // the server could not carry to an agent is refused here, not blamed on the agent.
        let per_call = to_agents.len() + state_bytes.div_ceil(3) * 4 + 1024;
        let max = self.nats.server_info().max_payload;
        if max > 0 && per_call > max {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!(
                    "{name} event: with its candidates in the state, a call to an agent would be {per_call} bytes, more than the server's max_payload of {max}"
                ),
            ));
        }
        let mut run = if chain.broken.is_empty() {
            let call = Call {
                nats: &self.nats,
                payload: to_agents.into(),
                trace: trace.clone(),
                max_patch_bytes: self.options.max_patch_bytes,
            };
            call.run(&chain, state).await
        } else {
            chain::broken_chain(state, &chain.broken)
        };
        // A close is an acknowledgement, not a decision: if an agent subscribed to it failed
        // (conn-limit down, say), acking it would hide that its slots were not freed. The
        // hookpoint gets an error instead, and sends the close again.
        if let Event::ConnectionClosed(_) = &event {
            if let Some(failed) = run.timings.iter().find(|t| {
                matches!(
                    t.outcome,
                    Outcome::Timeout | Outcome::NoResponders | Outcome::Error
                )
            }) {
                let code = match failed.outcome {
                    Outcome::Timeout => ErrorCode::AgentTimeout,
                    _ => ErrorCode::AgentError,
                };
                return Err(ErrorReply::new(
                    code,
                    format!(
                        "the close was not confirmed by {} ({}): send it again",
                        failed.agent,
                        outcome_name(failed.outcome)
                    ),
                ));
            }
        }
        if !matches!(event, Event::ConnectionClosed(_))
            && bus::hedge::past_deadline(msg.headers.as_ref())
        {
            tracing::info!(event = %name, "decided after the hookpoint's deadline: denied and undone");
            chain::deny_late(&mut run);
        }
        finalize(&mut run, &event_id, &event);

        let body = run
            .state
            .encode()
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
        // The agents' keys all end up in the decision: if they made it larger than the server
        // carries, say so rather than leave the gateway waiting for a reply that cannot be sent.
        let max = self.nats.server_info().max_payload;
        if max > 0 && body.len() + 1024 > max {
            return Err(ErrorReply::new(
                ErrorCode::Internal,
                format!(
                    "the decision is {} bytes, more than the server's max_payload of {max}: the agents put too much in the state",
                    body.len()
                ),
            ));
        }
        let total_us = started.elapsed().as_micros() as u64;
        tracing::debug!(event = %name, action = run.state.get_str(keys::ACTION), total_us, "decided");
        let body = Bytes::from(body);
        let undo = chain::undo_for(&run, &body, &trace);
        self.tap(&name, &event_id, &payload, run, total_us, &trace)
            .await;
        Ok(((trace, body), undo))
    }

    /// Tells each kind that answered (or failed) on a denied event to give back what it took
    /// for it. After the reply, so the hookpoint does not wait; before the task ends, so a
    /// stopping dispatcher still sends it. What cannot be undone is left to the kind's lease.
    async fn undo(&self, undo: chain::Undo) {
        let failed = undo_calls(&self.nats, &self.subjects, &undo.kinds, &undo).await;
        if failed.is_empty() {
            return;
        }
        // A kind that cannot be reached now (NATS restarting, no instance) is asked again in
        // the background, for up to UNDO_RETRY_FOR, rather than left to its lease.
        let (nats, subjects) = (self.nats.clone(), self.subjects.clone());
        tokio::spawn(async move {
            let until = Instant::now() + UNDO_RETRY_FOR;
            let mut kinds = failed;
            while !kinds.is_empty() {
                tokio::time::sleep(Duration::from_millis(250)).await;
                kinds = undo_calls(&nats, &subjects, &kinds, &undo).await;
                if Instant::now() >= until {
                    for kind in &kinds {
                        tracing::warn!(agent = %kind, "could not undo what the agent took for a denied event; its lease will");
                    }
                    return;
                }
            }
        });
    }

    async fn tap(
        &self,
        name: &EventName,
        event_id: &str,
        payload: &[u8],
        run: chain::Run,
        total_us: u64,
        trace: &HeaderMap,
    ) {
        let attributes =
            codec::decode::<bus::Value>("event attributes", payload).unwrap_or(bus::Value::Nil);
        let record = TapRecord {
            event: name.to_string(),
            event_id: event_id.to_string(),
            attributes,
            decision: run.state,
            total_us,
            agents: run.timings,
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        match codec::encode("tap record", &record) {
            Ok(bytes) => {
                let subject = self.subjects.tap(name.as_str());
                if let Err(e) = self
                    .nats
                    .publish_with_headers(subject, trace.clone(), bytes.into())
                    .await
                {
                    tracing::warn!(error = %e, "could not publish tap record");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not encode tap record"),
        }
    }

    async fn handle_event(self: Arc<Self>, req: Request) {
        let started = Instant::now();
        if req.message.reply.is_none() {
            // Nobody would get the decision, and the chain would still take conn-limit slots
            // and rate budget that no close ever returns.
            tracing::warn!(
                subject = %req.message.subject,
                event.id = headers::get(req.message.headers.as_ref(), headers::POLICY_EVENT_ID).unwrap_or("-"),
                "event refused: sent without a reply subject (publish it as a request)"
            );
            req.refused("event sent without a reply subject");
            return;
        }
        if bus::hedge::past_deadline(req.message.headers.as_ref()) {
            // The hookpoint has stopped waiting (another dispatcher answered its hedge, or its
            // timeout passed): a chain run now would only take slots and budget.
            tracing::debug!(subject = %req.message.subject, "event past its deadline: not decided");
            req.refused("past its deadline");
            return;
        }
        let _working = match headers::get(req.message.headers.as_ref(), headers::POLICY_EVENT_ID) {
            Some(id) if !id.is_empty() => {
                let Some(working) = self.working.start(format!("{id} {}", req.message.subject))
                else {
                    tracing::debug!(subject = %req.message.subject, "hedged copy of an event in progress: dropped");
                    req.refused("copy of an event in progress");
                    return;
                };
                Some(working)
            }
            _ => None,
        };
        let (reply, undo) = match self.decide(&req.message, started).await {
            Ok(decided) => decided,
            Err(err) => {
                tracing::warn!(subject = %req.message.subject, error = %err, "event rejected");
                let mut h = HeaderMap::new();
                headers::propagate(req.message.headers.as_ref(), &mut h);
                (err.to_reply(h), None)
            }
        };
        respond(req, reply).await;
        if let Some(undo) = undo {
            self.undo(undo).await;
        }
    }

    async fn handle_admin(self: Arc<Self>, req: Request) {
        let command = self
            .subjects
            .admin_of(&req.message.subject)
            .unwrap_or_default()
            .to_string();
        let reply = match admin::handle(&self, &command, &req.message.payload).await {
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

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Timeout => "no answer in time",
        Outcome::NoResponders => "no live instance",
        Outcome::Error => "it answered with an error",
        Outcome::Answered | Outcome::Observed => "answered",
    }
}

/// The hookpoint's connection id; an empty one counts as absent.
fn event_connection_id(nc: &bus::event::NewConnection) -> Option<String> {
    nc.connection_id.clone().filter(|c| !c.is_empty())
}

/// Asks each kind to undo; returns the kinds that could not be reached.
async fn undo_calls(
    nats: &async_nats::Client,
    subjects: &Subjects,
    kinds: &[bus::Kind],
    undo: &chain::Undo,
) -> Vec<bus::Kind> {
    let calls = kinds.iter().map(|kind| {
        let subject = subjects.agent_undo(kind);
        let (trace, decision) = (undo.trace.clone(), undo.decision.clone());
        async move {
            let latency = bus::hedge::Latency::default();
            let r = bus::hedge::ask(nats, &subject, trace, decision, UNDO_TIMEOUT, &latency).await;
            (kind, r)
        }
    });
    let mut failed = Vec::new();
    for (kind, r) in futures::future::join_all(calls).await {
        if let Err(e) = r {
            tracing::debug!(agent = %kind, error = %e, "undo not confirmed yet");
            failed.push(kind.clone());
        }
    }
    failed
}

async fn respond(req: Request, (headers, body): Reply) {
    if let Err(e) = req.respond(headers, body).await {
        tracing::warn!(error = %e, "could not send reply");
    }
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
    watcher: tokio::task::JoinHandle<()>,
    options: Options,
    /// Answers the services API for as long as the dispatcher runs.
    _service: Service,
}

async fn start(common: &daemon::Common, options: Options) -> Result<Serving, DispatcherError> {
    let subjects = common.subjects()?;
    let nats = common
        .connect(headers::DISPATCHER_SERVICE, true, &Role::Dispatcher)
        .await?;
    let store =
        config::open_waiting(&nats, &subjects, common.kv_replicas, config::Access::Owner).await?;
    let dispatcher = Arc::new(Dispatcher {
        nats: nats.clone(),
        subjects: subjects.clone(),
        table: Table::default(),
        store: store.clone(),
        options: options.clone(),
        working: Default::default(),
    });

    // Subscriptions are loaded before the first event is taken, so a new instance never
    // answers `no-subscribers` for an event that has them.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let watcher = {
        let d = dispatcher.clone();
        tokio::spawn(config::follow(
            store,
            ConfigKey::all_subscriptions().to_string(),
            move |snap| d.table.load(&d.subjects, snap),
            Some(ready_tx),
        ))
    };
    let _ = ready_rx.await;

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
    tracing::info!(events = %subjects.events_wildcard(), admin = %subjects.admin_wildcard(), "ready");
    Ok(Serving {
        dispatcher,
        nats,
        events,
        admin,
        watcher,
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
            watcher,
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
                    let d = dispatcher.clone();
                    tracker.spawn(async move {
                        d.handle_event(req).await;
                        drop(permit);
                    }.instrument(span));
                }
            }
        }
        daemon::drain(&tracker, &nats).await;
        watcher.abort();
        tracing::info!("stopped");
    }
}
