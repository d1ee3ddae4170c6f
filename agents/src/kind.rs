//! What an agent kind is: a policy type with validation and a pure decide function. The
//! runtime owns everything else (NATS, the config watch, the services API, shutdown), so a
//! kind is unit-testable without a server.

use std::future::Future;

use bus::{Event, Reason, State, Subjects};
use serde::de::DeserializeOwned;

/// What a kind that keeps state in NATS gets when the runtime has connected.
pub struct Attach<'a> {
    /// The messaging connection (the monitor reads the tap on it).
    pub nats: &'a async_nats::Client,
    /// The connection to JetStream: the role's store identity on a secured bus.
    pub store: &'a async_nats::Client,
    pub subjects: &'a Subjects,
    /// Replicas for any bucket the kind creates.
    pub kv_replicas: usize,
    /// Bytes any bucket the kind creates may hold. Keys come from the network (connection
    /// ids, attribute values), so the bucket refuses new writes when full rather than grow:
    /// the limiters then fail closed.
    pub max_bytes: i64,
    /// The process's in-flight work, which its drain waits for: a kind that goes on working
    /// for a request after answering it spawns that work here.
    pub tasks: &'a daemon::TaskTracker,
}

/// A kind's own failure to start (its bucket, its tasks).
pub type AttachError = Box<dyn std::error::Error + Send + Sync>;

impl Attach<'_> {
    /// Opens (or first creates) a bucket of the kind's shared state: one value per key, no
    /// history, entries dropped by JetStream after `max_age`.
    pub async fn state_bucket(
        &self,
        store: bus::store::Store,
        description: &str,
        max_age: std::time::Duration,
    ) -> Result<async_nats::jetstream::kv::Store, AttachError> {
        let bucket = match store {
            bus::store::Store::Conns => self.subjects.conn_bucket(),
            bus::store::Store::Rates => self.subjects.rate_bucket(),
            other => return Err(format!("{} is no agent's state", other.describe()).into()),
        };
        let config = async_nats::jetstream::kv::Config {
            bucket,
            description: description.into(),
            history: 1,
            max_age,
            max_bytes: self.max_bytes,
            num_replicas: self.kv_replicas.max(1),
            ..Default::default()
        };
        let jet = bus::store::Jet::reach(self.store, self.subjects, store).await?;
        Ok(bus::config::open_bucket(&jet, config, true).await?)
    }
}

/// A policy with the id it is stored under, and whether it is the fleet's or the site's (see
/// `bus::fleet`): ids are unique within a kind, a fleet policy shadowing a site's of the same
/// id, and a kind whose policies are ordered puts the fleet's first.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored<P> {
    pub id: String,
    pub level: bus::fleet::Level,
    pub policy: P,
}

impl<P> Stored<P> {
    /// A site's policy (what tests and a fleet-less engine have).
    pub fn site(id: impl Into<String>, policy: P) -> Self {
        Stored {
            id: id.into(),
            level: bus::fleet::Level::Site,
            policy,
        }
    }
}

pub trait AgentKind: Send + Sync + 'static {
    /// The policy document, decoded strictly (unknown fields are errors: they are typos).
    type Policy: DeserializeOwned + Send + Sync + 'static;
    /// The compiled, immutable form the decide path reads; rebuilt on every policy change.
    type Rules: Send + Sync + 'static;

    /// The kind's name: its queue group and subject token.
    fn name(&self) -> &str;

    /// Whether `decide_async` finishes without waiting (no I/O): the runtime then answers
    /// each request in its receive loop, without a task, a span or the in-progress set, which
    /// cost more than such a decision (docs/performance.md). Kinds that do I/O set `false`,
    /// so that a slow store does not hold up the requests behind it.
    const INLINE: bool = true;

    /// Whether an answer may take something the kind keeps for the event (a slot, a token).
    /// Such a kind never says its answer may be cached: the dispatcher may give a cached
    /// answer again without calling the agent, and sends no `_undo` to a kind whose answer
    /// said so (docs/contract.md, Verdict cache).
    const TAKES: bool = false;

    /// Whether the kind has an undo: something an answer takes stays taken if the event is
    /// denied unless the dispatcher says so. A kind without one answers `Policy-Undo: never`,
    /// and is sent no `_undo` (rate-limit's spent tokens stay spent: a budget, not a hold).
    const UNDOES: bool = false;

    /// For a kind that undoes: whether this answer holds something for the event's run
    /// (`Policy-Undo: held`, else `none`).
    fn holds(&self, _patch: &State) -> bool {
        false
    }

    /// Checks what the types cannot (cross-field rules). The message names the field.
    fn check(&self, policy: &Self::Policy) -> Result<(), String>;

    fn compile(&self, policies: Vec<Stored<Self::Policy>>) -> Self::Rules;

    /// The state keys this agent sets for `event` (a patch, merged by the dispatcher). Pure
    /// kinds implement this; kinds that keep state in NATS implement `decide_async` instead.
    /// The default sets nothing, as an observer does.
    fn decide(&self, _rules: &Self::Rules, _event: &Event, _state: &State) -> State {
        State::new()
    }

    /// For a pure kind, what `decide`'s answer to this request depended on besides the
    /// event's name and the policy set, so that the dispatcher may answer the same inputs from
    /// memory until the kind's policies change (see [`bus::cache`]). The inputs must determine
    /// the answer: any request that agrees on them gets the same answer, and declares the same
    /// inputs. Process flags that change answers (acl's `--default`) must be the same on every
    /// instance, as they must be anyway. `None`, the default, is never cached.
    fn cache_inputs(
        &self,
        _rules: &Self::Rules,
        _event: &Event,
        _state: &State,
    ) -> Option<bus::cache::Declared> {
        None
    }

    /// What the runtime calls per request. Pure kinds keep this default; kinds that keep
    /// state in NATS (the limiters) do their I/O here, around their pure logic. An `Err` is
    /// work that could not be done and must not be acknowledged (a close whose slots could not
    /// be found yet): the agent answers with an error, and the sender sends it again. A
    /// decision that cannot be made is a deny with a reason, not an `Err`.
    fn decide_async<'a>(
        &'a self,
        rules: &'a Self::Rules,
        event: &'a Event,
        state: &'a State,
    ) -> impl Future<Output = Result<State, String>> + Send + 'a {
        std::future::ready(Ok(self.decide(rules, event, state)))
    }

    /// The event this agent answered was denied in the end (the final decision is given):
    /// give back what was taken for it. Called at least once per denied event that this kind
    /// answered or failed on, possibly after a duplicate; must be idempotent. Pure kinds take
    /// nothing and keep this default. An `Err` says the give-back is not confirmed: the agent
    /// answers with an error, and the dispatcher asks again.
    fn undo<'a>(
        &'a self,
        _rules: &'a Self::Rules,
        _decision: &'a State,
    ) -> impl Future<Output = Result<(), String>> + Send + 'a {
        std::future::ready(Ok(()))
    }

    /// Called once, after connecting and before the first request: a stateful kind opens its
    /// bucket and starts its background tasks here.
    fn attach(&mut self, _ctx: Attach<'_>) -> impl Future<Output = Result<(), AttachError>> + Send {
        std::future::ready(Ok(()))
    }
}

/// Decodes a policy document, naming the field that is wrong (`match.src_service: ...`).
pub fn parse_policy<K: AgentKind>(kind: &K, bytes: &[u8]) -> Result<K::Policy, String> {
    bus::codec::check_depth(bytes, bus::codec::MAX_DEPTH)
        .map_err(|e| format!("not valid MessagePack: {e}"))?;
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    let policy: K::Policy = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." || path.is_empty() {
            e.inner().to_string()
        } else {
            format!("field `{path}`: {}", e.inner())
        }
    })?;
    kind.check(&policy)?;
    Ok(policy)
}

/// The checks every policy document shares: it names this kind, and its id is a valid key.
pub fn check_identity(kind: &str, agent: &str, id: &str) -> Result<(), String> {
    if agent != kind {
        return Err(format!("field `agent`: expected {kind:?}, got {agent:?}"));
    }
    bus::admin::check_policy_id(id).map_err(|e| format!("field `id`: {e}"))
}

/// A patch that denies, with one reason.
pub fn deny(reason: Reason) -> State {
    let mut s = State::new();
    s.set_action(bus::Action::Deny);
    s.insert(
        bus::state::keys::REASONS,
        bus::Value::Array(vec![reason.to_value()]),
    );
    s
}

/// The reasons list of a patch.
pub fn reasons(list: impl IntoIterator<Item = Reason>) -> bus::Value {
    bus::Value::Array(list.into_iter().map(|r| r.to_value()).collect())
}
