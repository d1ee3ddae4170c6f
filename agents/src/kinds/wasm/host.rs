//! `policy-agent wasm`: serves every kind deployed as a WebAssembly module. It watches the
//! modules object store: a new kind gets its own runtime (queue group, policies, services API
//! name `policy-agent-<kind>`), a new version of a running kind is swapped in place (a call in
//! progress finishes on the version it started with), a removed kind is drained and stopped.
//! It also answers the dispatcher's `agent-deploy` check: does this module load here?

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use bus::admin::ModuleChecked;
use bus::headers::WASM_HOST_SERVICE as HOST_SERVICE;
use bus::roles::Role;
use bus::{codec, ErrorCode, ErrorReply, Kind};
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

use std::sync::Arc;

use super::abi::{Compiled, Limits, Sandbox};
use super::{Current, WasmKind};
use crate::runtime::{self, AgentError};

/// How often the host looks for the modules store before the first deploy creates it, and
/// again after its watch broke.
const RETRY: Duration = Duration::from_secs(2);
/// The queue group of the hosts' `_wasm.check` subscription: one host answers each check.
const CHECK_GROUP: &str = "wasm-host";

/// How long fetching a module from the store may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A kind this host serves.
struct Running {
    module: Current,
    /// The version served, which the kind's services API metadata says
    /// (`bus::modules::SERVED`), so a deploy can wait until every host serves it.
    digest: Arc<std::sync::RwLock<String>>,
    /// Tells the kind's runtime to load its policies again (a new version may validate them
    /// otherwise).
    reload: Arc<tokio::sync::Notify>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), AgentError>>,
}

/// What the host keeps: the kinds it serves, those it is draining, and what every kind
/// shares.
struct Kinds {
    running: HashMap<String, Running>,
    /// Removed kinds still draining: awaited at shutdown.
    draining: Vec<(String, tokio::task::JoinHandle<Result<(), AgentError>>)>,
    sandbox: Sandbox,
    calls: Arc<super::CallSlots>,
    common: daemon::Common,
    options: runtime::Options,
}

/// Runs the host until `shutdown`, then stops every kind, each draining its requests.
pub async fn run(
    common: daemon::Common,
    options: runtime::Options,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let subjects = common.subjects()?;
    // The server's refusals on this connection tell the check whether a kind may be served.
    let (client, mut refusals) = common
        .connect_watched(HOST_SERVICE, true, &Role::WasmHost)
        .await?;
    let store_client = common
        .connect_store(HOST_SERVICE, true, &Role::WasmHost, &client)
        .await?;
    let sandbox = Sandbox::new(limits);
    // A services API endpoint, so that `$SRV.PING.policy-agent-wasm` counts the hosts.
    let (_service, mut endpoints) = daemon::service::Service::start(
        &client,
        HOST_SERVICE,
        "policy-bus WebAssembly agent host",
        env!("CARGO_PKG_VERSION"),
        vec![daemon::service::EndpointSpec {
            name: "check",
            subject: subjects.wasm_check(),
            queue_group: CHECK_GROUP.into(),
        }],
    )
    .await
    .map_err(|e| AgentError::Service(e.to_string()))?;
    let mut checks = endpoints
        .pop()
        .ok_or_else(|| AgentError::Service("endpoint missing".into()))?;
    // The host's readiness is the host's: its kinds come and go without making it unready.
    let telemetry = options.telemetry.clone();
    if let Some(t) = &telemetry {
        t.ready.connected(&client);
        t.ready.loaded();
        t.ready.serving();
    }
    let options = runtime::Options {
        role: Some(Role::WasmHost),
        telemetry: None,
        ..options
    };
    let mut kinds = Kinds {
        running: HashMap::new(),
        draining: Vec::new(),
        sandbox: sandbox.clone(),
        calls: super::CallSlots::per_core(),
        common: common.clone(),
        options,
    };
    let mut watch = None;
    let mut retry = tokio::time::interval(RETRY);
    tokio::pin!(shutdown);
    tracing::info!(
        fuel = limits.fuel,
        max_memory = limits.max_memory,
        "wasm host ready"
    );
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(req) = checks.next() => {
                answer_check(&sandbox, &client, &mut refusals, &subjects, req).await
            }
            _ = retry.tick(), if watch.is_none() => {
                watch = open_watch(&store_client, &subjects, &common).await;
            }
            change = next_change(&mut watch), if watch.is_some() => match change {
                Some(Ok(info)) => {
                    let store = watch.as_ref().map(|(store, _)| store.clone());
                    if let Some(store) = store {
                        kinds.apply(&store, info).await;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "modules watch failed; reopening");
                    watch = None;
                }
                None => watch = None,
            },
        }
    }
    if let Some(t) = &telemetry {
        t.ready.stopping();
    }
    let mut stopping = std::mem::take(&mut kinds.draining);
    for (kind, running) in kinds.running.drain() {
        let _ = running.stop.send(());
        stopping.push((kind, running.task));
    }
    for (kind, task) in stopping {
        match task.await {
            Ok(Err(e)) => tracing::warn!(%kind, error = %e, "kind stopped with an error"),
            Err(e) => tracing::warn!(%kind, error = %e, "kind task failed"),
            Ok(Ok(())) => {}
        }
    }
    tracing::info!("wasm host stopped");
    Ok(())
}

type Watch = (
    async_nats::jetstream::object_store::ObjectStore,
    async_nats::jetstream::object_store::Watch,
);

async fn open_watch(
    client: &async_nats::Client,
    subjects: &bus::Subjects,
    common: &daemon::Common,
) -> Option<Watch> {
    let store = match bus::modules::open(client, subjects, common.kv_replicas, false).await {
        Ok(store) => store,
        Err(e) => {
            tracing::debug!(error = %e, "no modules store yet");
            return None;
        }
    };
    match store.watch_with_history().await {
        Ok(w) => Some((store, w)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the modules store");
            None
        }
    }
}

async fn next_change(
    watch: &mut Option<Watch>,
) -> Option<Result<async_nats::jetstream::object_store::ObjectInfo, String>> {
    let (_, w) = watch.as_mut()?;
    w.next().await.map(|r| r.map_err(|e| e.to_string()))
}

/// Compiles a module and instantiates it once, on a blocking thread: a large module takes a
/// while to compile, and its start function runs.
async fn load(sandbox: &Sandbox, bytes: bytes::Bytes) -> Result<Compiled, String> {
    let sandbox = sandbox.clone();
    tokio::task::spawn_blocking(move || {
        let compiled = sandbox.compile(&bytes)?;
        sandbox.instantiate(&compiled)?;
        Ok::<_, super::abi::AbiError>(compiled)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// How long the check waits for the server to refuse a trial subscription: the refusal comes
/// right after the subscription, a round trip later.
const REFUSAL_WAIT: Duration = Duration::from_millis(300);

/// Whether this host may serve `kind` on this bus: on the secured bus, a native kind with a
/// role of its own (`policyctl auth add-agent`) is denied to the wasm host, and a module must
/// not take its name. A trial subscription under the kind's subjects (that no one publishes
/// to, so no request of the kind is taken) shows it: the server refuses it at once.
async fn may_serve(
    client: &async_nats::Client,
    refusals: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    subjects: &bus::Subjects,
    kind: &str,
) -> Result<(), String> {
    let kind = bus::Kind::new(kind).map_err(|e| e.to_string())?;
    while refusals.try_recv().is_ok() {}
    let trial = format!(
        "{}._check_{}",
        subjects.agent_wildcard(&kind).trim_end_matches(".>"),
        bus::event::new_id()
    );
    let sub = client
        .subscribe(trial.clone())
        .await
        .map_err(|e| e.to_string())?;
    client.flush().await.map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + REFUSAL_WAIT;
    let mut refused = false;
    while let Ok(Some(e)) = tokio::time::timeout_at(deadline, refusals.recv()).await {
        if e.contains("Permissions Violation for Subscription") && e.contains(&trial) {
            refused = true;
            break;
        }
    }
    drop(sub);
    if refused {
        return Err(format!(
            "`{kind}` is a native agent kind with a role of its own on this bus (policyctl auth \
             add-agent {kind}): a module cannot take its name; deploy it under another"
        ));
    }
    Ok(())
}

async fn answer_check(
    sandbox: &Sandbox,
    client: &async_nats::Client,
    refusals: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    subjects: &bus::Subjects,
    req: daemon::service::Request,
) {
    let kind = bus::headers::get(req.message.headers.as_ref(), bus::headers::POLICY_WASM_KIND)
        .map(str::to_string);
    if let Some(kind) = kind {
        if let Err(e) = may_serve(client, refusals, subjects, &kind).await {
            let reply =
                ErrorReply::new(ErrorCode::InvalidPolicy, e).to_reply(async_nats::HeaderMap::new());
            let _ = req.respond(reply.0, reply.1).await;
            return;
        }
    }
    let (headers, body) = match load(sandbox, req.message.payload.clone()).await {
        Ok(c) => match codec::encode(
            "module check",
            &ModuleChecked {
                validates: c.validates,
            },
        ) {
            Ok(b) => (async_nats::HeaderMap::new(), b.into()),
            Err(e) => ErrorReply::new(ErrorCode::Internal, e.to_string())
                .to_reply(async_nats::HeaderMap::new()),
        },
        Err(e) => {
            ErrorReply::new(ErrorCode::InvalidPolicy, e).to_reply(async_nats::HeaderMap::new())
        }
    };
    // A failed send is logged by `respond`.
    let _ = req.respond(headers, body).await;
}

impl Kinds {
    /// Starts, swaps or stops the kind a store change is about.
    async fn apply(
        &mut self,
        store: &async_nats::jetstream::object_store::ObjectStore,
        info: async_nats::jetstream::object_store::ObjectInfo,
    ) {
        let name = info.name.clone();
        if Kind::new(&name).is_err()
            || bus::subject::SHIPPED_KINDS.contains(&name.as_str())
            || name == "wasm"
        {
            tracing::warn!(object = %name, "the modules store holds an object that is no module kind's; ignored");
            return;
        }
        // A kind whose runtime ended (it could not start, say) is started again.
        if self
            .running
            .get(&name)
            .is_some_and(|r| r.task.is_finished())
        {
            if let Some(dead) = self.running.remove(&name) {
                tracing::warn!(kind = %name, "the kind's runtime had stopped; starting it again");
                self.draining.push((name.clone(), dead.task));
            }
        }
        if info.deleted {
            if let Some(running) = self.running.remove(&name) {
                tracing::info!(kind = %name, "module removed: draining and stopping the kind");
                let _ = running.stop.send(());
                self.draining.push((name, running.task));
            }
            return;
        }
        let digest = info.digest.clone().unwrap_or_default();
        let serving = |r: &Running| r.digest.read().unwrap_or_else(|e| e.into_inner()).clone();
        if self
            .running
            .get(&name)
            .is_some_and(|r| serving(r) == digest)
        {
            return;
        }
        let compiled = match fetch(store, &name).await {
            Ok(bytes) => load(&self.sandbox, bytes.into()).await,
            Err(e) => Err(e),
        };
        let compiled = match compiled {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(kind = %name, %digest, error = %e, "deployed module does not load here; the kind keeps its previous version, if any");
                return;
            }
        };
        if let Some(running) = self.running.get_mut(&name) {
            *running.module.write().unwrap_or_else(|e| e.into_inner()) = compiled;
            *running.digest.write().unwrap_or_else(|e| e.into_inner()) = digest.clone();
            running.reload.notify_one();
            tracing::info!(kind = %name, %digest, "new module version swapped in");
            return;
        }
        let module: Current = Arc::new(std::sync::RwLock::new(compiled));
        let kind = WasmKind::new(
            name.clone(),
            self.sandbox.clone(),
            module.clone(),
            self.calls.clone(),
        );
        let reload = Arc::new(tokio::sync::Notify::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let common = self.common.clone();
        let served = Arc::new(std::sync::RwLock::new(digest.clone()));
        let says = served.clone();
        let options = runtime::Options {
            reload: Some(reload.clone()),
            service_metadata: Some(Arc::new(move || {
                let digest = says.read().unwrap_or_else(|e| e.into_inner()).clone();
                [(bus::modules::SERVED.to_string(), digest)].into()
            })),
            ..self.options.clone()
        };
        let task = tokio::spawn(async move {
            runtime::run(kind, &common, options, async {
                let _ = stopped.await;
            })
            .await
        });
        tracing::info!(kind = %name, %digest, "module loaded: serving the kind");
        self.running.insert(
            name,
            Running {
                module,
                digest: served,
                reload,
                stop,
                task,
            },
        );
    }
}

async fn fetch(
    store: &async_nats::jetstream::object_store::ObjectStore,
    name: &str,
) -> Result<Vec<u8>, String> {
    let max = bus::admin::MAX_MODULE_BYTES;
    let read = async {
        let object = store.get(name).await.map_err(|e| e.to_string())?;
        // The dispatcher stores no larger module; a larger object is not read into memory.
        if object.info.size > max {
            return Err(format!(
                "the stored module is {} bytes, over the {max} a module may be",
                object.info.size
            ));
        }
        let mut bytes = Vec::new();
        object
            .take(max as u64 + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| e.to_string())?;
        if bytes.len() > max {
            return Err(format!(
                "the stored module is over the {max} bytes a module may be"
            ));
        }
        Ok(bytes)
    };
    tokio::time::timeout(FETCH_TIMEOUT, read)
        .await
        .map_err(|_| format!("no answer from JetStream within {FETCH_TIMEOUT:?}"))?
}
