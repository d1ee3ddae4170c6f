//! `agent-deploy`, `agent-remove`, `agent-list`: WebAssembly agent modules in the modules
//! object store. A module is stored only after a wasm host found that it loads, as a policy is
//! stored only after its kind validated it.

use std::time::Duration;

use async_nats::HeaderMap;
use bus::admin::{AgentDeploy, AgentRemove, Done, ModuleChecked, Modules, MAX_MODULE_BYTES};
use bus::client::{call, ClientError};
use bus::subject::SHIPPED_KINDS;
use bus::{codec, ErrorCode, ErrorReply, Kind};
use bytes::Bytes;
use futures::TryStreamExt;

use crate::replies::{reply, unavailable};
use crate::Dispatcher;

/// A host compiles a module before answering: text modules take a moment to parse.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Storing a module writes its chunks and reads them back.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);

fn bad(message: String) -> ErrorReply {
    ErrorReply::new(ErrorCode::BadRequest, message)
}

/// A kind a module may take: a valid kind name that is not a shipped kind's.
fn module_kind(name: &str) -> Result<Kind, ErrorReply> {
    let kind = Kind::new(name).map_err(|e| bad(e.to_string()))?;
    // `wasm` would take the hosts' own services API name, `policy-agent-wasm`.
    if SHIPPED_KINDS.contains(&kind.as_str()) || kind.as_str() == "wasm" {
        return Err(bad(format!(
            "agent kind `{kind}` is shipped with the engine; give the module a kind name of its own"
        )));
    }
    Ok(kind)
}

async fn store(
    d: &Dispatcher,
) -> Result<async_nats::jetstream::object_store::ObjectStore, ErrorReply> {
    let replicas = d.store.stream.cached_info().config.num_replicas;
    tokio::time::timeout(
        STORE_TIMEOUT,
        bus::modules::open(d.jet.client(), &d.subjects, replicas, true),
    )
    .await
    .map_err(|_| unavailable("no answer from JetStream in time"))?
    .map_err(unavailable)
}

/// Asks a live wasm host whether the module loads.
async fn check(d: &Dispatcher, kind: &Kind, module: &[u8], force: bool) -> Result<(), ErrorReply> {
    let mut headers = HeaderMap::new();
    headers.insert(
        bus::headers::name(bus::headers::POLICY_WASM_KIND),
        kind.as_str(),
    );
    let asked = call(
        &d.nats,
        d.subjects.wasm_check(),
        headers,
        Bytes::copy_from_slice(module),
        CHECK_TIMEOUT,
    )
    .await;
    match asked {
        Ok(msg) => codec::decode::<ModuleChecked>("module check", &msg.payload)
            .map(drop)
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string())),
        Err(ClientError::Remote(e)) => Err(ErrorReply::new(
            ErrorCode::InvalidPolicy,
            format!(
                "the module for agent kind `{kind}` does not load: {}",
                e.message
            ),
        )),
        Err(ClientError::NoResponders { .. }) if force => Ok(()),
        Err(ClientError::NoResponders { .. }) => Err(ErrorReply::new(
            ErrorCode::NotFound,
            "no live wasm host to check the module; start `policy-agent wasm` first, or deploy \
             with --force (force: true)",
        )),
        Err(e) => Err(ErrorReply::new(
            ErrorCode::AgentTimeout,
            format!("no wasm host checked the module in time: {e}"),
        )),
    }
}

pub(crate) async fn deploy(d: &Dispatcher, args: AgentDeploy) -> Result<Bytes, ErrorReply> {
    let kind = module_kind(&args.kind)?;
    if args.module.is_empty() || args.module.len() > MAX_MODULE_BYTES {
        return Err(bad(format!(
            "a module must be 1 to {MAX_MODULE_BYTES} bytes, this one is {}",
            args.module.len()
        )));
    }
    check(d, &kind, &args.module, args.force).await?;
    let store = store(d).await?;
    let meta = async_nats::jetstream::object_store::ObjectMetadata {
        name: kind.to_string(),
        description: Some(format!("policy-bus agent kind {kind}")),
        ..Default::default()
    };
    let mut bytes = args.module.as_slice();
    let put = store.put(meta, &mut bytes);
    let info = tokio::time::timeout(STORE_TIMEOUT, put)
        .await
        .map_err(|_| unavailable("no answer from JetStream in time"))?
        .map_err(unavailable)?;
    tracing::info!(%kind, size = info.size, digest = ?info.digest, "module deployed");
    reply(&bus::modules::describe(&info))
}

/// Whether a module is deployed as `kind` (a read that fails says no).
pub(crate) async fn deployed(d: &Dispatcher, kind: &Kind) -> bool {
    let Ok(store) = store(d).await else {
        return false;
    };
    let info = tokio::time::timeout(STORE_TIMEOUT, store.info(kind.as_str())).await;
    matches!(info, Ok(Ok(i)) if !i.deleted)
}

pub(crate) async fn remove(d: &Dispatcher, args: AgentRemove) -> Result<Bytes, ErrorReply> {
    let kind = module_kind(&args.kind)?;
    let store = store(d).await?;
    match store.info(kind.as_str()).await {
        Ok(info) if !info.deleted => {}
        _ => {
            return Err(ErrorReply::new(
                ErrorCode::NotFound,
                format!("no module is deployed as agent kind `{kind}`"),
            ))
        }
    }
    tokio::time::timeout(STORE_TIMEOUT, store.delete(kind.as_str()))
        .await
        .map_err(|_| unavailable("no answer from JetStream in time"))?
        .map_err(unavailable)?;
    tracing::info!(%kind, "module removed");
    reply(&Done { ok: true })
}

pub(crate) async fn list(d: &Dispatcher) -> Result<Bytes, ErrorReply> {
    let store = store(d).await?;
    let listed = async {
        store
            .list()
            .await
            .map_err(unavailable)?
            .try_collect::<Vec<_>>()
            .await
            .map_err(unavailable)
    };
    let mut modules: Vec<bus::admin::Module> = tokio::time::timeout(STORE_TIMEOUT, listed)
        .await
        .map_err(|_| unavailable("no answer from JetStream in time"))??
        .iter()
        .filter(|i| !i.deleted)
        .map(bus::modules::describe)
        .collect();
    modules.sort_by(|a, b| a.kind.cmp(&b.kind));
    reply(&Modules { modules })
}
