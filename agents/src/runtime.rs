//! The runtime every agent kind shares: it owns NATS (the kind's queue group, the services
//! API), the policy watch, request decoding and shutdown, and calls the kind's pure functions.

use std::future::Future;
use std::sync::{Arc, RwLock};

use async_nats::HeaderMap;
use bus::admin::Validated;
use bus::config::{self, ConfigKey};
use bus::event::EventName;
use bus::headers::Undo;
use bus::state::keys;
use bus::subject::{UNDO_TOKEN, VALIDATE_TOKEN};
use bus::watch;
use bus::{codec, headers, Effect, ErrorCode, ErrorReply, Event, Kind, Reason, State, Subjects};
use daemon::service::{Endpoint, EndpointSpec, Request, Service};
use tracing::Instrument;

use crate::kind::{self, parse_policy, AgentKind, Stored};
use crate::metrics::AgentMetrics;
use daemon::telemetry::Telemetry;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Daemon(#[from] daemon::DaemonError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot register with the NATS services API: {0}")]
    Service(String),
    #[error("cannot start the {kind} agent: {source}")]
    Attach {
        kind: String,
        #[source]
        source: kind::AttachError,
    },
}

/// The compiled policies, and those stored policies that failed to load. While any failed,
/// the agent denies: a policy it cannot read might have been a deny (fail closed).
struct Loaded<R> {
    rules: R,
    broken: Vec<(String, String)>,
    /// The policy set's fingerprint, for the verdict cache (see [`bus::cache::fingerprint`]).
    fingerprint: String,
}

struct Agent<K: AgentKind> {
    kind: K,
    kind_name: Kind,
    subjects: Subjects,
    loaded: RwLock<Arc<Loaded<K::Rules>>>,
    /// Requests being worked on, by event id and subject: a hedged copy of one of them that
    /// lands here is dropped (the original's answer serves the dispatcher), so hedging never
    /// makes one instance do the same work twice.
    working: bus::hedge::InProgress,
    /// The policies last loaded, to load again when the kind's validation changed (a new
    /// version of a WebAssembly module).
    last: std::sync::Mutex<watch::Snapshot>,
    metrics: Option<crate::metrics::KindMetrics>,
}

impl<K: AgentKind> Agent<K>
where
    K::Policy: Clone,
{
    fn load(&self, snap: &watch::Snapshot) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = snap.clone();
        let mut valid = Vec::with_capacity(snap.values.len());
        let mut broken = Vec::new();
        // The fleet's keys (`fleet.pol…`) sort before the site's: a site policy whose id the
        // fleet also uses is shadowed, not loaded.
        let mut ids = std::collections::HashSet::new();
        for (key, doc) in &snap.values {
            let Some(ConfigKey::Policy { id, level, .. }) = ConfigKey::parse(key) else {
                continue;
            };
            if !ids.insert(id.clone()) {
                tracing::warn!(agent = self.kind.name(), policy.id = %id, %level,
                    "a site policy with the id of a fleet policy is shadowed by it");
                continue;
            }
            match parse_policy(&self.kind, doc) {
                Ok(policy) => valid.push(Stored { id, level, policy }),
                Err(e) => {
                    tracing::error!(agent = self.kind.name(), policy.id = %id, error = %e,
                        "stored policy does not load; denying until it is fixed or removed");
                    broken.push((id.clone(), e));
                }
            }
        }
        let count = valid.len();
        let fingerprint = bus::cache::fingerprint(
            snap.values
                .iter()
                .map(|(k, v)| (k.as_str(), bus::cache::digest(v))),
        );
        let loaded = Arc::new(Loaded {
            rules: self.kind.compile(valid),
            broken,
            fingerprint,
        });
        if let Some(m) = &self.metrics {
            m.loaded(count, loaded.broken.len(), snap.revision);
        }
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        tracing::info!(
            agent = self.kind.name(),
            policies = count,
            "policies loaded"
        );
    }

    /// Loads the last policies again.
    fn reload(&self) {
        let snap = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.load(&snap);
    }

    fn current(&self) -> Arc<Loaded<K::Rules>> {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The kind's answer, the `Policy-Cache` header when it may be cached, and what an undo
    /// would find (`Policy-Undo`).
    async fn decide(
        &self,
        op: &str,
        msg: &async_nats::Message,
    ) -> Result<(State, Option<String>, Undo), ErrorReply> {
        let bad = |m: String| ErrorReply::new(ErrorCode::BadRequest, m);
        let name = EventName::new(op).map_err(|e| bad(e.to_string()))?;
        let event = Event::decode(&name, &msg.payload).map_err(|e| bad(e.to_string()))?;
        let mut state = match headers::get(msg.headers.as_ref(), headers::POLICY_STATE) {
            Some(h) => State::from_header(h).map_err(|e| bad(e.to_string()))?,
            None => State::new(),
        };
        if headers::dry_run(msg.headers.as_ref()) {
            state.insert(keys::DRY_RUN, true);
        }
        let loaded = self.current();
        if let Some((id, err)) = loaded.broken.first() {
            if !event.is_report() && !matches!(event, Event::Other { .. }) {
                let reason = Reason::new(self.kind.name(), id, Effect::Deny)
                    .with_detail(format!("stored policy does not load: {err}"));
                return Ok((
                    kind::deny(reason),
                    None,
                    if K::UNDOES {
                        Undo::Nothing
                    } else {
                        Undo::Never
                    },
                ));
            }
        }
        let patch = self
            .kind
            .decide_async(&loaded.rules, &event, &state)
            .await
            .map_err(|e| ErrorReply::new(ErrorCode::AgentError, e))?;
        let cache = if K::TAKES {
            None
        } else {
            self.kind
                .cache_inputs(&loaded.rules, &event, &state)
                .map(|declared| declared.to_header(&loaded.fingerprint))
        };
        let undo = match (K::UNDOES, self.kind.holds(&patch)) {
            (false, _) => Undo::Never,
            (true, true) => Undo::Held,
            (true, false) => Undo::Nothing,
        };
        Ok((patch, cache, undo))
    }

    fn validate(&self, payload: &[u8]) -> Result<State, ErrorReply> {
        parse_policy(&self.kind, payload)
            .map(|_| State::new())
            .map_err(|e| ErrorReply::new(ErrorCode::InvalidPolicy, e))
    }

    /// Counts an answered request, when the process keeps metrics.
    fn count(&self, op: &str, outcome: &str) {
        if let Some(m) = &self.metrics {
            m.answered(op, outcome);
        }
    }

    /// Answers one request. `track` puts it in the in-progress set, so that a hedged copy
    /// arriving meanwhile is dropped; a request answered inline has no "meanwhile".
    async fn handle(self: Arc<Self>, req: Request, track: bool) {
        let _in_flight = self.metrics.as_ref().map(|m| m.started());
        let started = std::time::Instant::now();
        let msg = &req.message;
        let op = self
            .subjects
            .agent_op_of(&self.kind_name, &msg.subject)
            .unwrap_or_default();
        let mut reply_headers = HeaderMap::new();
        headers::propagate(msg.headers.as_ref(), &mut reply_headers);
        let validating = op == VALIDATE_TOKEN;
        if op == UNDO_TOKEN {
            let reply = match State::decode(&msg.payload) {
                Ok(decision) => match self.kind.undo(&self.current().rules, &decision).await {
                    Ok(()) => (
                        reply_headers,
                        codec::encode("undone", &Validated { ok: true })
                            .unwrap_or_default()
                            .into(),
                    ),
                    Err(e) => {
                        tracing::debug!(error = %e, "undo not confirmed");
                        ErrorReply::new(ErrorCode::AgentError, format!("undo not confirmed: {e}"))
                            .to_reply(reply_headers)
                    }
                },
                Err(e) => {
                    ErrorReply::new(ErrorCode::BadRequest, e.to_string()).to_reply(reply_headers)
                }
            };
            let failed = reply.0.get(headers::NATS_SERVICE_ERROR_CODE).is_some();
            self.count("undo", if failed { "error" } else { "ok" });
            // A failed send is logged by `respond`, with the event id.
            let _ = req.respond(reply.0, reply.1).await;
            return;
        }
        if bus::hedge::past_deadline(msg.headers.as_ref()) {
            // The dispatcher has given up on this one (a hedge answered it, or the timeout
            // passed): starting it now would only take what nobody will use.
            tracing::debug!(subject = %msg.subject, "request past its deadline: not started");
            self.count("decide", "dropped");
            req.dropped("past its deadline").await;
            return;
        }
        let _working = match headers::get(msg.headers.as_ref(), headers::POLICY_EVENT_ID) {
            Some(id) if track && msg.reply.is_some() && !validating => {
                let Some(working) = self.working.start(format!("{id} {}", msg.subject)) else {
                    tracing::debug!(subject = %msg.subject, "hedged copy of a request in progress: dropped");
                    self.count("decide", "dropped");
                    req.dropped("copy of a request in progress").await;
                    return;
                };
                Some(working)
            }
            _ => None,
        };
        let result = if validating {
            self.validate(&msg.payload).map(|s| (s, None, Undo::Never))
        } else {
            self.decide(op, msg).await
        };
        let op_name = if validating { "validate" } else { "decide" };
        match (&result, msg.reply.is_none()) {
            (Ok(_), true) => self.count("observe", "ok"),
            (Err(_), true) => self.count("observe", "error"),
            (Ok(_), false) => self.count(op_name, "ok"),
            (Err(_), false) => self.count(op_name, "error"),
        }
        if let (Some(m), false) = (&self.metrics, validating) {
            m.decided_in(started.elapsed());
        }
        if msg.reply.is_none() {
            // Sent to an observer: the kind has done its work (a release, say); nobody waits.
            if let Err(err) = result {
                tracing::warn!(subject = %msg.subject, error = %err, "rejected observed event");
            }
            return;
        }
        let (reply_headers, body) = match result {
            Ok(_) if validating => {
                let payload =
                    codec::encode("validated", &Validated { ok: true }).unwrap_or_default();
                (reply_headers, payload.into())
            }
            Ok((patch, cache, undo)) => match patch.to_header() {
                Ok(h) => {
                    reply_headers.insert(headers::name(headers::POLICY_STATE), h);
                    reply_headers.insert(headers::name(headers::POLICY_UNDO), undo.as_str());
                    if let Some(c) = cache {
                        reply_headers.insert(headers::name(headers::POLICY_CACHE), c);
                    }
                    tracing::debug!(action = patch.get_str(keys::ACTION), "decided");
                    (reply_headers, bytes::Bytes::new())
                }
                Err(e) => {
                    ErrorReply::new(ErrorCode::Internal, e.to_string()).to_reply(reply_headers)
                }
            },
            Err(err) => {
                tracing::warn!(subject = %msg.subject, event.id = headers::event_id(msg.headers.as_ref()).unwrap_or("-"), error = %err, "rejected request");
                err.to_reply(reply_headers)
            }
        };
        // A failed send is logged by `respond`, with the event id.
        let _ = req.respond(reply_headers, body).await;
    }
}

/// Tunables of the runtime that are not part of the contract.
#[derive(Clone)]
pub struct Options {
    /// Requests one instance handles at once; past it, new ones wait in NATS (and the
    /// dispatcher's hedges and timeouts see a busy instance as slow, not as a crash).
    pub max_in_flight: usize,
    /// Bytes a stateful kind's bucket may hold, when this instance creates it.
    pub state_max_bytes: i64,
    /// Who the agent is on the bus, when not `agent-<kind>`: a wasm host serves its kinds
    /// with its own credentials.
    pub role: Option<bus::roles::Role>,
    /// Loads the policies again when notified: a wasm host does on a new module version,
    /// whose `validate` may judge the stored policies otherwise.
    pub reload: Option<Arc<tokio::sync::Notify>>,
    /// Where the kind counts its requests and policies (`--metrics-addr`).
    pub metrics: Option<Arc<AgentMetrics>>,
    /// The process's readiness, when this kind is the process (not one kind of a wasm host).
    pub telemetry: Option<Arc<Telemetry>>,
    /// The kind's services API metadata: a wasm host says which module version it serves.
    pub service_metadata: Option<daemon::service::Metadata>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_in_flight: 1024,
            state_max_bytes: 256 * 1024 * 1024,
            role: None,
            reload: None,
            metrics: None,
            telemetry: None,
            service_metadata: None,
        }
    }
}

/// Runs an agent of `kind` until `shutdown` resolves, then drains in-flight requests.
pub async fn run<K: AgentKind>(
    kind: K,
    common: &daemon::Common,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError>
where
    K::Policy: Clone,
{
    let subjects = common.subjects()?;
    let kind_name = Kind::new(kind.name()).map_err(daemon::DaemonError::from)?;
    tokio::pin!(shutdown);
    let tracker = daemon::TaskTracker::new();
    // An agent still waiting for NATS or for the config bucket stops on a signal too.
    let startup = start(kind, common, &options, &subjects, &kind_name, &tracker);
    let (client, agent, watcher, mut endpoint, _service) = tokio::select! {
        started = startup => started?,
        _ = &mut shutdown => {
            tracing::info!(agent = %kind_name, "stopped before it was ready");
            return Ok(());
        }
    };

    let limit = Arc::new(tokio::sync::Semaphore::new(options.max_in_flight.max(1)));
    let mut drain = daemon::Drain::default();
    loop {
        // A permit before the next request: past the bound, requests wait in NATS.
        let next = async {
            let permit = limit.clone().acquire_owned().await;
            (permit, endpoint.next().await)
        };
        let deadline = drain.deadline();
        tokio::select! {
            biased;
            _ = &mut shutdown, if !drain.started() => {
                // Stop taking new requests; those the server already sent still come, and are
                // answered, before the endpoint ends.
                if let Some(t) = &options.telemetry {
                    t.ready.stopping();
                }
                drain.start(&client, &mut [&mut endpoint]).await;
            }
            _ = daemon::until(deadline) => {
                tracing::warn!("the endpoint did not end within the drain window");
                break;
            }
            (permit, req) = next => {
                let (Ok(permit), Some(req)) = (permit, req) else { break };
                let traced = daemon::traces::enabled();
                if K::INLINE && !traced {
                    // Answered here, in order: a pure decision takes less than a task would.
                    agent.clone().handle(req, false).await;
                    continue;
                }
                let span = tracing::info_span!("request", agent = %kind_name,
                    subject = %req.message.subject,
                    event.id = headers::event_id(req.message.headers.as_ref()).unwrap_or("-"));
                if traced {
                    // One span per hop, in the hookpoint's trace.
                    daemon::traces::follow(&span, req.message.headers.as_ref());
                    if K::INLINE {
                        agent.clone().handle(req, false).instrument(span).await;
                        continue;
                    }
                }
                let agent = agent.clone();
                tracker.spawn(async move {
                    agent.handle(req, true).await;
                    drop(permit);
                }.instrument(span));
            }
        }
    }
    daemon::drain(&tracker, &client).await;
    watcher.abort();
    tracing::info!(agent = %kind_name, "stopped");
    Ok(())
}

type Started<K> = (
    async_nats::Client,
    Arc<Agent<K>>,
    tokio::task::JoinHandle<()>,
    Endpoint,
    // Answers the services API for as long as the agent runs.
    Service,
);

/// Connects, opens the config bucket, attaches the kind, loads its policies and subscribes.
async fn start<K: AgentKind>(
    mut kind: K,
    common: &daemon::Common,
    options: &Options,
    subjects: &Subjects,
    kind_name: &Kind,
    tasks: &daemon::TaskTracker,
) -> Result<Started<K>, AgentError>
where
    K::Policy: Clone,
{
    let service_name = headers::agent_service(kind_name);
    let role = options
        .role
        .clone()
        .unwrap_or_else(|| bus::roles::Role::of_kind(kind_name));
    let client = common.connect(&service_name, true, &role).await?;
    if let Some(t) = &options.telemetry {
        t.ready.connected(&client);
    }
    let store_client = common
        .connect_store(&service_name, true, &role, &client)
        .await?;
    let store = config::open_waiting(
        &store_client,
        subjects,
        config::Opening::reader(common.kv_replicas),
    )
    .await?;
    kind.attach(kind::Attach {
        nats: &client,
        store: &store_client,
        subjects,
        kv_replicas: common.kv_replicas,
        max_bytes: options.state_max_bytes,
        tasks,
    })
    .await
    .map_err(|source| AgentError::Attach {
        kind: kind_name.to_string(),
        source,
    })?;

    let rules = kind.compile(Vec::new());
    let agent = Arc::new(Agent {
        kind,
        kind_name: kind_name.clone(),
        subjects: subjects.clone(),
        loaded: RwLock::new(Arc::new(Loaded {
            rules,
            broken: Vec::new(),
            fingerprint: bus::cache::fingerprint([]),
        })),
        working: Default::default(),
        last: Default::default(),
        metrics: options
            .metrics
            .as_ref()
            .map(|m| m.for_kind(kind_name.as_str())),
    });

    // Load the policies before taking any request, so a new instance never answers from an
    // empty rule set.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = {
        let agent = agent.clone();
        let store = store.clone();
        let filter = ConfigKey::policies_of(kind_name);
        let reload = options.reload.clone();
        let again = agent.clone();
        tokio::spawn(async move {
            let follow = watch::follow(store, filter, move |snap| agent.load(snap), Some(ready_tx));
            tokio::pin!(follow);
            loop {
                tokio::select! {
                    _ = &mut follow => break,
                    _ = async { reload.as_ref()?.notified().await; Some(()) }, if reload.is_some() => {
                        tracing::info!(agent = %again.kind_name, "loading the policies again");
                        again.reload();
                    }
                }
            }
        })
    };
    let _ = ready_rx.await;

    let (service, mut endpoints) = Service::start_with(
        &client,
        &service_name,
        &format!("policy-bus {kind_name} agent"),
        env!("CARGO_PKG_VERSION"),
        vec![EndpointSpec {
            name: "decide",
            subject: subjects.agent_wildcard(kind_name),
            queue_group: kind_name.to_string(),
        }],
        options.service_metadata.clone(),
    )
    .await
    .map_err(|e| AgentError::Service(e.to_string()))?;
    let endpoint = endpoints
        .pop()
        .ok_or_else(|| AgentError::Service("endpoint missing".into()))?;
    if let Some(t) = &options.telemetry {
        t.ready.loaded();
        t.ready.serving();
    }
    tracing::info!(agent = %kind_name, subject = %subjects.agent_wildcard(kind_name), "ready");
    Ok((client, agent, watcher, endpoint, service))
}
