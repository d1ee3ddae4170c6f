//! Connection limiter: at most `max_connections` live connections per policy, exactly, across
//! every instance.
//!
//! The rule that keeps it exact, and everything that enforces it, is in [`super::conn_slots`];
//! the store behind it in [`super::conn_store`] (the layout in `bus::slots`). This file maps
//! events to it: `new-connection` takes (or shares) a slot per matching policy for the
//! dispatcher's run, `connection-closed` and a `connection-status` that says closed free the
//! connection's slots, `open` renews them, and `_undo` (the event was denied) takes the run out.
//! The lease (`--lease`, default 1 h) drops a slot no close freed.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bus::event::{ConnectionState, Event, NewConnection};
use bus::state::keys;
use bus::{Effect, Reason, State, Value};
use serde::Deserialize;

use super::conn_slots::{Admission, Slots};
use super::conn_store::{JetStore, SlotStore};
use super::limit_match::{key_token, LimitMatch};
use crate::kind::{self, AgentKind, Attach, AttachError, Stored};

pub const NAME: &str = "conn-limit";
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnLimitPolicy {
    pub agent: String,
    pub id: String,
    #[serde(default, rename = "match")]
    pub matcher: LimitMatch,
    pub max_connections: NonZeroU32,
}

pub struct Compiled {
    id: String,
    /// Said in its reasons when the fleet's (see `bus::fleet`).
    level: bus::fleet::Level,
    matcher: LimitMatch,
    max: u32,
}

impl Compiled {
    fn reason(&self, effect: Effect) -> Reason {
        Reason::new(NAME, &self.id, effect).with_level(self.level)
    }
}

/// The state key where an admission records what it holds for its run: `{run, policies}`,
/// in the decision for the gateway and the monitor to see. Its presence in an answer is what
/// tells the dispatcher an undo has something to give back (`Policy-Undo: held`).
pub(crate) const STATE_KEY: &str = "conn_limit";

pub struct ConnLimiter {
    pub lease: Duration,
    slots: Option<Arc<Slots<JetStore>>>,
    /// Confirmations of admissions, run after their answers (see `conn_slots`).
    after: daemon::TaskTracker,
}

impl ConnLimiter {
    pub fn new(lease: Duration) -> Self {
        ConnLimiter {
            lease,
            slots: None,
            after: daemon::TaskTracker::new(),
        }
    }

    async fn new_connection(&self, rules: &[Compiled], e: &NewConnection, state: &State) -> State {
        let target = state.get_str(keys::TARGET_PEER);
        let matched: Vec<&Compiled> = rules
            .iter()
            .filter(|c| c.matcher.matches(e, target))
            .collect();
        if matched.is_empty() {
            return State::new();
        }
        let deny =
            |c: &Compiled, detail: String| kind::deny(c.reason(Effect::Deny).with_detail(detail));
        let (Some(slots), Some(conn)) = (&self.slots, e.connection_id.as_deref()) else {
            return deny(
                matched[0],
                "no connection_id or no slot store: cannot count".into(),
            );
        };
        if state.flag(keys::DRY_RUN) {
            return dry_run(&slots.store, &matched).await;
        }
        let (conn, run) = (
            key_token(conn),
            run_of(state).unwrap_or_else(bus::event::new_id),
        );
        let mut held: Vec<&str> = Vec::new();
        let mut took: Vec<String> = Vec::new();
        let mut reasons = Vec::new();
        let mut refused = None;
        for c in &matched {
            match slots.admit(&c.id, c.max, &conn, &run).await {
                Ok(a @ (Admission::Took | Admission::Held)) => {
                    held.push(&c.id);
                    if a == Admission::Took {
                        took.push(c.id.clone());
                    }
                    reasons.push(
                        c.reason(Effect::Allow).with_detail(format!(
                            "holds a slot; at most {} live connections",
                            c.max
                        )),
                    );
                }
                Ok(Admission::Full) => {
                    refused = Some((c, format!("limit of {} live connections reached", c.max)))
                }
                Err(why) => {
                    // The write may have landed, or land later: held until the run's undo
                    // says otherwise, and watched until then (see `Slots::settle`).
                    held.push(&c.id);
                    settle_later(slots, c.id.clone(), &conn, &run);
                    refused = Some((c, format!("slot store unavailable, failing closed: {why}")));
                }
            }
            if refused.is_some() {
                break;
            }
        }
        if !took.is_empty() {
            // After the answer (the drain waits for it).
            let (slots, conn, run) = (slots.clone(), conn.clone(), run.clone());
            self.after.spawn(async move {
                if let Err(e) = slots.confirm(&conn, &run, &took).await {
                    tracing::debug!(%conn, error = %e, "admission not confirmed; settling");
                    for policy in took {
                        settle_later(&slots, policy, &conn, &run);
                    }
                }
            });
        }
        // What this copy holds stays held, refused or not: another copy's allow may be the
        // answer used. A denied event's undo frees it (see `conn_slots`).
        let mut patch = match refused {
            Some((c, detail)) => deny(c, detail),
            None => {
                let mut p = State::new();
                p.insert(keys::REASONS, kind::reasons(reasons));
                p
            }
        };
        if !held.is_empty() {
            let policies = Value::Array(held.iter().map(|p| Value::from(*p)).collect());
            patch.insert(
                STATE_KEY,
                Value::Map(vec![
                    (Value::from("run"), Value::from(run.as_str())),
                    (Value::from("policies"), policies),
                ]),
            );
        }
        patch
    }

    /// Every policy's id: a release looks under each (a policy whose `match` changed since
    /// the admission still holds the connection's slot).
    fn policies(rules: &[Compiled]) -> Vec<&str> {
        rules.iter().map(|c| c.id.as_str()).collect()
    }
}

/// [`Slots::settle`] in the background: for a write of unknown outcome, or an admission whose
/// confirmation could not read the markers.
fn settle_later(slots: &Arc<Slots<JetStore>>, policy: String, conn: &str, run: &str) {
    let (slots, conn, run) = (slots.clone(), conn.to_string(), run.to_string());
    tokio::spawn(async move { slots.settle(&policy, &conn, &run).await });
}

/// What an admission would come to, taking nothing: a dry run.
async fn dry_run(store: &impl SlotStore, matched: &[&Compiled]) -> State {
    let mut reasons = Vec::new();
    for c in matched {
        let used = match store.in_use(&c.id).await {
            Ok(n) => n,
            Err(e) => {
                return kind::deny(
                    c.reason(Effect::Deny)
                        .with_detail(format!("dry run: slot store unavailable: {e}")),
                )
            }
        };
        if used >= u64::from(c.max) {
            return kind::deny(c.reason(Effect::Deny).with_detail(format!(
                "dry run: limit of {} live connections reached",
                c.max
            )));
        }
        reasons.push(c.reason(Effect::Allow).with_detail(format!(
            "dry run: would take a slot ({used} of {} in use)",
            c.max
        )));
    }
    let mut patch = State::new();
    patch.insert(keys::REASONS, kind::reasons(reasons));
    patch
}

/// The dispatcher's run of the event, as a key token (the event id from a dispatcher that
/// sets no run id).
fn run_of(state: &State) -> Option<String> {
    state
        .get_str(keys::RUN_ID)
        .or_else(|| state.get_str(keys::EVENT_ID))
        .map(key_token)
}

impl AgentKind for ConnLimiter {
    const INLINE: bool = false;
    const TAKES: bool = true;
    const UNDOES: bool = true;

    type Policy = ConnLimitPolicy;
    type Rules = Vec<Compiled>;

    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, p: &ConnLimitPolicy) -> Result<(), String> {
        kind::check_identity(NAME, &p.agent, &p.id)
    }

    fn compile(&self, mut policies: Vec<Stored<ConnLimitPolicy>>) -> Vec<Compiled> {
        policies.sort_by(|a, b| a.id.cmp(&b.id));
        policies
            .into_iter()
            .map(|s| Compiled {
                id: s.id,
                level: s.level,
                max: s.policy.max_connections.get(),
                matcher: s.policy.matcher,
            })
            .collect()
    }

    async fn decide_async<'a>(
        &'a self,
        rules: &'a Vec<Compiled>,
        event: &'a Event,
        state: &'a State,
    ) -> Result<State, String> {
        let dry_run = state.flag(keys::DRY_RUN);
        let slots = match (&self.slots, event) {
            (_, Event::NewConnection(e)) => {
                return Ok(super::limit_match::hold_target(
                    rules.iter().map(|c| &c.matcher),
                    state,
                    self.new_connection(rules, e, state).await,
                ))
            }
            // A dry run frees nothing.
            _ if dry_run => return Ok(State::new()),
            (Some(slots), _) => slots,
            (None, _) => return Ok(State::new()),
        };
        match event {
            Event::ConnectionClosed(e) => {
                let policies = Self::policies(rules);
                slots
                    .close(&key_token(&e.connection_id), &policies)
                    .await
                    .map_err(|e| format!("the close's slots may not all be freed: {e}"))?;
            }
            // ClusterLink's connection status: `open` renews the lease of the connection's
            // slots, `closed` and `failed` free them as a close does.
            Event::ConnectionStatus(status) => {
                let token = key_token(&status.connection_id);
                let policies = Self::policies(rules);
                match status.state {
                    ConnectionState::Open => {
                        if let Err(e) = slots.renew(&token, &policies).await {
                            tracing::debug!(error = %e, "slots not renewed; the next report renews them");
                        }
                    }
                    ConnectionState::Closed | ConnectionState::Failed => slots
                        .close(&token, &policies)
                        .await
                        .map_err(|e| format!("the connection's slots may not all be freed: {e}"))?,
                }
            }
            _ => {}
        }
        Ok(State::new())
    }

    /// An answer holds slots for its run when it says so in the state.
    fn holds(&self, patch: &State) -> bool {
        patch.get(STATE_KEY).is_some()
    }

    /// The event was denied: the run leaves every slot of the connection (any copy of its
    /// admission, on any instance, under any policy).
    async fn undo<'a>(
        &'a self,
        rules: &'a Vec<Compiled>,
        decision: &'a State,
    ) -> Result<(), String> {
        let (Some(slots), Some(conn), Some(run)) = (
            &self.slots,
            decision.get_str(keys::CONNECTION_ID),
            run_of(decision),
        ) else {
            return Ok(());
        };
        let policies = Self::policies(rules);
        slots.undo(&key_token(conn), &run, &policies).await
    }

    async fn attach(&mut self, ctx: Attach<'_>) -> Result<(), AttachError> {
        // Markers live as long as they count: a close or undo per connection would otherwise
        // pile up for a lease. A bucket an older version made with the lease is brought down.
        let mut markers = ctx
            .state_bucket(
                bus::store::Store::Conns,
                "policy-bus connection limiter: closes and undos, for late copies of admissions",
                bus::slots::MARKER_FOR,
            )
            .await?;
        let jet = bus::store::Jet::reach(ctx.store, ctx.subjects, bus::store::Store::Conns).await?;
        let mut info = markers.stream.info().await?.config.clone();
        if info.max_age != bus::slots::MARKER_FOR {
            tracing::info!(bucket = %ctx.subjects.conn_bucket(), was = ?info.max_age, "markers kept 120 s");
            info.max_age = bus::slots::MARKER_FOR;
            jet.context().update_stream(info).await?;
        }
        let store = JetStore::new(
            &jet,
            ctx.subjects,
            self.lease,
            markers,
            // A marker read waits for the batch in flight, then its own, then may read the
            // key by itself: all three within the confirmation's timeout.
            super::conn_slots::REQUEST_TIMEOUT / 3,
        );
        self.after = ctx.tasks.clone();
        self.slots = Some(Arc::new(Slots::new(store)));
        Ok(())
    }
}
