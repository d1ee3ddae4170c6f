//! Admin commands (`<prefix>.admin.<command>`): their arguments and replies.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, ErrorReply, InvalidName};
use crate::event::EventName;
use crate::state::Value;
use crate::subject::AdminCommand;
use crate::subject::Kind;

pub const DEFAULT_TIMEOUT_MS: u64 = 250;
/// Documents in one `policy-add`: each is validated by its agent before any is stored, so the
/// request holds the dispatcher's attention until all are; split larger sets.
pub const MAX_POLICIES_PER_ADD: usize = 1000;
/// Longer than this and a hookpoint would give up first; almost surely a typo.
pub const MAX_TIMEOUT_MS: u64 = 60_000;

/// What the chain does when an agent does not answer in time, has no live instance, or
/// answers with an error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// The decision is deny.
    #[default]
    Closed,
    /// The agent is skipped, the skip is recorded in `reasons` and the decision is `degraded`.
    Open,
}

impl FailureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::Closed => "closed",
            FailureMode::Open => "open",
        }
    }
}

/// A subscription of an agent kind to an event: the unit of chain configuration. Unknown
/// fields are refused (`timout_ms` is a typo, not a wish), in admin arguments, in files and in
/// the stored record alike; a stored record that does not decode fails its event closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    pub event: EventName,
    pub agent: String,
    /// Lower runs first; equal priorities run concurrently.
    pub priority: i32,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub failure: FailureMode,
    /// Observe-only: the agent gets the event (fire-and-forget) but never delays or changes
    /// the decision.
    #[serde(default)]
    pub observe: bool,
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

impl Subscription {
    pub fn kind(&self) -> Result<Kind, InvalidName> {
        Kind::new(&self.agent)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
    /// Checks what serde cannot: the agent is a valid kind and the timeout is sane.
    pub fn validate(&self) -> Result<Kind, String> {
        let kind = self.kind().map_err(|e| e.to_string())?;
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(format!(
                "timeout must be between 1ms and {MAX_TIMEOUT_MS}ms, got {}ms",
                self.timeout_ms
            ));
        }
        Ok(kind)
    }
}

/// The arguments of `subscribe`: a subscription, and whether to store it although the dispatcher
/// finds no live instance of the kind or does not know the event (a typo such as `acll` would
/// otherwise make every decision of the event deny).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    pub event: EventName,
    pub agent: String,
    pub priority: i32,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub failure: FailureMode,
    #[serde(default)]
    pub observe: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

impl Subscribe {
    pub fn new(sub: Subscription, force: bool) -> Self {
        let Subscription {
            event,
            agent,
            priority,
            timeout_ms,
            failure,
            observe,
        } = sub;
        Subscribe {
            event,
            agent,
            priority,
            timeout_ms,
            failure,
            observe,
            force,
        }
    }

    /// The record to store (everything but `force`).
    pub fn subscription(&self) -> Subscription {
        Subscription {
            event: self.event.clone(),
            agent: self.agent.clone(),
            priority: self.priority,
            timeout_ms: self.timeout_ms,
            failure: self.failure,
            observe: self.observe,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unsubscribe {
    pub event: EventName,
    pub agent: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListSubscriptions {
    #[serde(default)]
    pub event: Option<EventName>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscriptions {
    pub subscriptions: Vec<Subscription>,
    /// At a site of a fleet: the fleet's subscriptions, which the site decides on and cannot
    /// change (see `crate::fleet`). Absent elsewhere; an older client ignores it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fleet: Vec<Subscription>,
}

/// `policy-add`: every document is validated by its agent kind before any is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyAdd {
    pub policies: Vec<Value>,
}

/// `apply`: makes the stored configuration equal the one given, the kubectl way. Everything
/// is validated before anything is stored, and the changes are stored in one step or not at
/// all. A section left out (`None`) is left alone, even with `prune`: applying a file of
/// policies never removes the subscriptions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Apply {
    #[serde(default)]
    pub subscriptions: Option<Vec<Subscription>>,
    #[serde(default)]
    pub policies: Option<Vec<Value>>,
    /// Also remove what is stored but not given, in the sections given.
    #[serde(default)]
    pub prune: bool,
    /// Validate and plan, store nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Store subscriptions of kinds with no live instance, or of events nobody knows yet.
    #[serde(default)]
    pub force: bool,
    /// Skip the policies their kinds refuse, store the rest, and list the skipped in
    /// [`Applied::skipped`] (a stored document of a skipped one's id is kept, never pruned).
    #[serde(default)]
    pub keep_going: bool,
    /// Stored policies to leave as they are, whatever `prune` says: the ones the client
    /// itself skipped (an object it could not translate).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<PolicyRef>,
    /// With `prune`: remove only stored policies whose `origin.source` is this, rather than the
    /// given documents' sources; so a source with no documents left can still be pruned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune_source: Option<String>,
}

/// A policy `apply` skipped under `keep_going`: its position among the given documents
/// (1-based), its `agent/id` when it had one, and why its kind refused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub document: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub error: String,
}

/// NATS stores an atomic batch of at most 1000 messages; one apply changes at most this many
/// keys.
pub const MAX_CHANGES_PER_APPLY: usize = 1000;
/// How the refusal of an apply over [`MAX_CHANGES_PER_APPLY`] changes ends, so that a client
/// can tell it and apply in steps (`policyctl` does, for a large prune).
pub const TOO_MANY_CHANGES: &str = "changes in one apply";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    Subscription,
    Policy,
}

impl Section {
    pub fn as_str(self) -> &'static str {
        match self {
            Section::Subscription => "subscription",
            Section::Policy => "policy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeOp {
    Add,
    Change,
    Remove,
}

impl ChangeOp {
    /// `+`, `~`, `-`: the marks `policyctl diff` prints.
    pub fn mark(self) -> char {
        match self {
            ChangeOp::Add => '+',
            ChangeOp::Change => '~',
            ChangeOp::Remove => '-',
        }
    }
}

/// One stored document an apply adds, changes or removes: a subscription named
/// `<event>/<agent>`, a policy `<agent>/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Planned {
    pub op: ChangeOp,
    pub section: Section,
    pub name: String,
}

/// The reply of `apply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// What changed (what would change, on a dry run), subscriptions first.
    pub changes: Vec<Planned>,
    /// Documents given that equal the stored ones.
    pub unchanged: usize,
    /// Stored documents not given, left in place because `prune` was not asked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<Planned>,
    /// The configuration revision before the apply, and after it (equal on a dry run or when
    /// nothing changed).
    pub revision_before: u64,
    pub revision: u64,
    pub dry_run: bool,
    /// Stored in one JetStream atomic batch (nats-server 2.12 and later): the server stored
    /// all of it at once. Otherwise stored key by key, each compared-and-set, and rolled back
    /// if one failed.
    pub atomic: bool,
    /// Under `keep_going`, the policies skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<Skipped>,
}

/// The reply of `status`: the configuration revision, which every change to the config bucket
/// bumps, and what is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub revision: u64,
    pub subscriptions: usize,
    pub policies: usize,
    /// Whether `apply` stores in one atomic batch on this bucket.
    pub atomic_apply: bool,
    /// At a site of a fleet: where it stands with the hub (absent elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::FleetStatus>,
    /// At the hub of a fleet: every site it follows (absent elsewhere).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<crate::fleet::SiteStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusArgs {}

/// A WebAssembly module's largest size: it travels in one NATS message (1 MiB by default) with
/// the request around it.
pub const MAX_MODULE_BYTES: usize = 960 * 1024;

/// `agent-deploy`: stores a WebAssembly module as agent kind `kind`, after a wasm host found it
/// loads (valid WebAssembly, binary or text, exporting the ABI, importing nothing). Every wasm
/// host then serves the kind, or swaps to this version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentDeploy {
    pub kind: String,
    #[serde(with = "serde_bytes")]
    pub module: Vec<u8>,
    /// Store it although no wasm host is live to check it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRemove {
    pub kind: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentListArgs {}

/// A deployed module, as the object store has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Module {
    pub kind: String,
    pub size: u64,
    /// `SHA-256=<base64url>`: tells versions apart.
    pub digest: String,
    /// When it was stored, RFC 3339.
    #[serde(default)]
    pub modified: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Modules {
    pub modules: Vec<Module>,
}

/// What a wasm host answers on `<prefix>.agent._wasm.check`: the module's exports, or why it
/// does not load (an `invalid-policy` error).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleChecked {
    /// Whether the module exports `validate`, so that its kind checks its policies itself.
    pub validates: bool,
}

/// An admin command with its arguments, decoded at the boundary.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    Subscriptions(ListSubscriptions),
    PolicyAdd(PolicyAdd),
    PolicyRemove(PolicyRemove),
    PolicyList(PolicyList),
    Apply(Apply),
    Status(StatusArgs),
    AgentDeploy(AgentDeploy),
    AgentRemove(AgentRemove),
    AgentList(AgentListArgs),
}

impl Request {
    /// Decodes `<prefix>.admin.<command>`'s payload: an unknown command is `not-found`, bad
    /// arguments (an unknown field among them) `bad-request`.
    pub fn decode(command: &str, payload: &[u8]) -> Result<Request, ErrorReply> {
        fn args<T: serde::de::DeserializeOwned>(
            command: &str,
            payload: &[u8],
        ) -> Result<T, ErrorReply> {
            crate::codec::decode_map("admin arguments", payload)
                .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, format!("{command}: {e}")))
        }
        let Some(cmd) = AdminCommand::parse(command) else {
            let known: Vec<&str> = AdminCommand::ALL.iter().map(|c| c.as_str()).collect();
            let hint = crate::subject::did_you_mean(command, known.iter().copied())
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            return Err(ErrorReply::new(
                ErrorCode::NotFound,
                format!(
                    "unknown admin command {command:?}{hint}; known: {}",
                    known.join(", ")
                ),
            ));
        };
        Ok(match cmd {
            AdminCommand::Subscribe => Request::Subscribe(args(command, payload)?),
            AdminCommand::Unsubscribe => Request::Unsubscribe(args(command, payload)?),
            AdminCommand::Subscriptions => Request::Subscriptions(args(command, payload)?),
            AdminCommand::PolicyAdd => Request::PolicyAdd(args(command, payload)?),
            AdminCommand::PolicyRemove => Request::PolicyRemove(args(command, payload)?),
            AdminCommand::PolicyList => Request::PolicyList(args(command, payload)?),
            AdminCommand::Apply => Request::Apply(args(command, payload)?),
            AdminCommand::Status => Request::Status(args(command, payload)?),
            AdminCommand::AgentDeploy => Request::AgentDeploy(args(command, payload)?),
            AdminCommand::AgentRemove => Request::AgentRemove(args(command, payload)?),
            AdminCommand::AgentList => Request::AgentList(args(command, payload)?),
        })
    }
}

/// Identifies a stored policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyRef {
    pub agent: String,
    pub id: String,
}

impl PolicyRef {
    /// Reads `agent` and `id` from a policy document; both must be usable as KV key tokens.
    pub fn of(doc: &Value) -> Result<PolicyRef, String> {
        let Value::Map(entries) = doc else {
            return Err("a policy document must be a map".into());
        };
        let field = |name: &str| -> Result<String, String> {
            entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(name))
                .and_then(|(_, v)| v.as_str())
                .map(str::to_owned)
                .ok_or_else(|| format!("field `{name}`: missing or not a string"))
        };
        let agent = field("agent")?;
        Kind::new(&agent).map_err(|e| format!("field `agent`: {e}"))?;
        let id = field("id")?;
        check_policy_id(&id).map_err(|e| format!("field `id`: {e}"))?;
        Ok(PolicyRef { agent, id })
    }

    /// `agent/id`: how replies (`Planned::name`, `Skipped::name`) and the CLI name a policy.
    pub fn name(&self) -> String {
        format!("{}/{}", self.agent, self.id)
    }

    /// The policy an `agent/id` name names.
    pub fn from_name(name: &str) -> Option<PolicyRef> {
        let (agent, id) = name.split_once('/')?;
        Some(PolicyRef {
            agent: agent.into(),
            id: id.into(),
        })
    }
}

/// Policy ids become KV key tokens: `[A-Za-z0-9_-]`, at most 128 characters.
pub fn check_policy_id(id: &str) -> Result<(), InvalidName> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            what: "policy id",
            name: id.to_string(),
            rule: "1 to 128 letters, digits, '-' or '_'",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyAdded {
    /// Documents written: new, or different from what was stored.
    pub stored: Vec<PolicyRef>,
    /// Documents identical to what was stored: not written again (no revision, no reload).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchanged: Vec<PolicyRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRemove {
    pub agent: String,
    pub id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyList {
    #[serde(default)]
    pub agent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policies {
    pub policies: Vec<Value>,
    /// At a site of a fleet: the fleet's policies (see [`Subscriptions::fleet`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fleet: Vec<Value>,
}

/// The reply of commands that only change something.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub ok: bool,
}

/// An agent's answer to a validation request: the error names the field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validated {
    pub ok: bool,
}

#[cfg(test)]
#[path = "admin_tests.rs"]
mod tests;
