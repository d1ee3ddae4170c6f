//! Agent kinds loaded at run time: a WebAssembly module, deployed with `policyctl agent
//! deploy`, decides for a kind the way a shipped kind's Rust code does. The runtime serves it
//! like any other kind (queue group, policies, dry runs, shutdown); this kind hands each event
//! to the module in a sandbox ([`abi`]), and [`host`] loads, swaps and unloads modules as the
//! object store changes.

pub mod abi;
pub mod host;
pub mod slots;

use std::sync::{Arc, RwLock};

use bus::state::field_str;
use bus::{Event, State, Value};

use crate::kind::{self, AgentKind, Stored};
use abi::{Compiled, Sandbox};
pub use slots::CallSlots;

/// The module a kind runs now. The host swaps it on a new deploy; a call in progress keeps
/// the version it started with, so a swap drops no event.
pub type Current = Arc<RwLock<Arc<Compiled>>>;

pub struct WasmKind {
    name: String,
    sandbox: Sandbox,
    module: Current,
    /// Calls running at once, across every kind of the host, each kind within its fair share:
    /// each may hold its memory cap and a blocking thread, so their number is bounded by the
    /// cores, not by the requests.
    calls: Arc<CallSlots>,
}

impl WasmKind {
    pub fn new(name: String, sandbox: Sandbox, module: Current, calls: Arc<CallSlots>) -> Self {
        WasmKind {
            name,
            sandbox,
            module,
            calls,
        }
    }

    fn current(&self) -> Arc<Compiled> {
        self.module
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    )
}

/// The input of `decide`: `{event, attributes, state, policies}`.
fn decide_input(event: &Event, state: &State, policies: &[Value]) -> Result<Vec<u8>, String> {
    let attributes: Value = event
        .encode()
        .and_then(|b| bus::codec::decode("event attributes", &b))
        .map_err(|e| e.to_string())?;
    let state = bus::codec::encode("state", state)
        .and_then(|b| bus::codec::decode::<Value>("state", &b))
        .map_err(|e| e.to_string())?;
    let input = map(vec![
        ("event", Value::from(event.name())),
        ("attributes", attributes),
        ("state", state),
        ("policies", Value::Array(policies.to_vec())),
    ]);
    bus::codec::encode("module input", &input).map_err(|e| e.to_string())
}

impl AgentKind for WasmKind {
    type Policy = Value;
    /// The kind's policy documents, by id: every call gets all of them.
    type Rules = Arc<Vec<Value>>;

    fn name(&self) -> &str {
        &self.name
    }

    /// A module runs in a blocking task, off the receive loop: a call that burns its whole
    /// fuel budget holds up no other request.
    const INLINE: bool = false;

    fn check(&self, policy: &Value) -> Result<(), String> {
        let agent = field_str(policy, "agent").ok_or("field `agent`: missing")?;
        let id = field_str(policy, "id").ok_or("field `id`: missing")?;
        kind::check_identity(&self.name, agent, id)?;
        let compiled = self.current();
        if !compiled.validates {
            return Ok(());
        }
        let doc = bus::codec::encode("policy", policy).map_err(|e| e.to_string())?;
        let out = self
            .sandbox
            .call(&compiled, "validate", &doc)
            .map_err(|e| format!("the module's validate failed: {e}"))?;
        let answer: Value = bus::codec::decode("validate answer", &out)
            .map_err(|e| format!("the module's validate answered no MessagePack map: {e}"))?;
        match field_str(&answer, "error") {
            Some(e) => Err(e.to_string()),
            None => Ok(()),
        }
    }

    fn compile(&self, policies: Vec<Stored<Value>>) -> Self::Rules {
        Arc::new(policies.into_iter().map(|s| s.policy).collect())
    }

    fn decide_async<'a>(
        &'a self,
        rules: &'a Self::Rules,
        event: &'a Event,
        state: &'a State,
    ) -> impl std::future::Future<Output = Result<State, String>> + Send + 'a {
        let compiled = self.current();
        let sandbox = self.sandbox.clone();
        let calls = self.calls.clone();
        async move {
            // The slot first: a request waiting for one holds no input yet, so what waits costs
            // the request as it came, not a copy per policy document.
            let _slot = calls.take(&self.name).await;
            let input = decide_input(event, state, rules)?;
            let out =
                tokio::task::spawn_blocking(move || sandbox.call(&compiled, "decide", &input))
                    .await
                    .map_err(|e| format!("the module's call did not finish: {e}"))?
                    .map_err(|e| e.to_string())?;
            State::decode(&out)
                .map_err(|e| format!("the module's answer is not a MessagePack map: {e}"))
        }
    }
}

#[cfg(test)]
mod tests;
