//! Running an event's chain.
//!
//! Order, exactly: stages run one after another in priority order (lower first). The agents of
//! one stage are called concurrently, and their answers are merged in the stage's order
//! (agent name), so a decision does not depend on which answered first. Each agent gets the
//! event's attributes as payload and the state so far in `Policy-State`; its answer is folded
//! in with [`bus::merge::merge`]. A deny ends the chain after its stage. Observe-only agents
//! are sent the event without waiting and never change the state.
//!
//! An agent that times out, has no live instance, answers with an error or answers with a
//! patch that cannot be merged has *failed*: with failure mode `closed` the decision is deny;
//! with `open` it is skipped, the skip is a reason (effect `skipped`) and the decision is
//! `degraded`. "No responders" is asked again until the timeout (an instance may be
//! reconnecting); only a kind with no instance for the whole timeout fails as `no-responders`.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bus::admin::FailureMode;
use bus::client::ClientError;
use bus::decision::failure;
use bus::headers::Undo;
use bus::merge::{merge, Flow, Holds};
use bus::state::keys;
use bus::tap::{AgentTiming, Outcome};
use bus::{headers, Effect, Event, Reason, State, Value};
use bytes::Bytes;

use crate::table::{Chain, Member};
use crate::undo::{owes_undo, Answer, Ended, Source};

/// What running a chain produced: the final state (before the dispatcher's own keys) and the
/// per-agent timings for the tap.
pub struct Run {
    pub state: State,
    pub degraded: bool,
    pub timings: Vec<AgentTiming>,
    /// Calls owed an `_undo` if the event ends denied: what each call's answer said it holds
    /// (`Policy-Undo`), or, for a call that failed, what the kind may hold (see [`owes_undo`]).
    /// Bit `i` for `timings[i]`: no allocation per event on the decision path. A call past
    /// the 64th is taken to be owed one, as any answered or failed call.
    pub owed: u64,
    /// A dry run that an agent answered as a real event: it must be undone.
    pub ignored_dry_run: bool,
}

struct Failure {
    outcome: Outcome,
    code: &'static str,
    detail: String,
}

fn patch_of(
    member: &Member,
    reply: Result<async_nats::Message, ClientError>,
    max_bytes: usize,
) -> Result<State, Failure> {
    let msg = reply.map_err(|e| match e {
        ClientError::Timeout { timeout, .. } => Failure {
            outcome: Outcome::Timeout,
            code: failure::TIMEOUT,
            detail: format!("no answer within {timeout:?}"),
        },
        ClientError::NoResponders { .. } => Failure {
            outcome: Outcome::NoResponders,
            code: failure::NO_RESPONDERS,
            detail: format!("no live {} agent", member.kind),
        },
        other => Failure {
            outcome: Outcome::Error,
            code: failure::ERROR,
            detail: other.to_string(),
        },
    })?;
    let header = headers::get(msg.headers.as_ref(), headers::POLICY_STATE);
    State::from_reply(header, &msg.payload, max_bytes).map_err(|detail| Failure {
        outcome: Outcome::Error,
        code: failure::ERROR,
        detail,
    })
}

pub struct Call<'a> {
    pub nats: &'a async_nats::Client,
    /// The event's name and its attributes as the hookpoint sent them, for the verdict cache.
    pub event: &'a str,
    pub attributes: &'a Value,
    pub verdicts: &'a crate::verdicts::Verdicts,
    pub payload: Bytes,
    /// Event id and trace context, copied onto every hop.
    pub trace: HeaderMap,
    /// Bytes of one agent's answer.
    pub max_patch_bytes: usize,
}

impl Call<'_> {
    fn headers(&self, state_header: &str) -> HeaderMap {
        let mut h = self.trace.clone();
        h.insert(headers::name(headers::POLICY_STATE), state_header);
        h
    }

    /// Calls one agent within its subscription's timeout, hedged (see [`bus::hedge`]), or
    /// answers from the verdict cache. `state` is the state sent, `state_header` its header
    /// form. The [`Answer`] says where the answer came from and what an undo owes it.
    async fn ask(
        &self,
        m: &Member,
        state: &State,
        state_header: &str,
    ) -> (Result<State, Failure>, Duration, Answer) {
        let kind = m.kind.as_str();
        if let Some(patch) = self
            .verdicts
            .lookup(kind, self.event, self.attributes, state)
        {
            let answer = Answer {
                source: Source::Cache,
                echoed: true,
                undo: Some(Undo::Never),
                hedged: false,
            };
            return (Ok(patch), Duration::ZERO, answer);
        }
        let start = Instant::now();
        let (reply, copies) = bus::hedge::ask_counted(
            self.nats,
            &m.subject,
            self.headers(state_header),
            self.payload.clone(),
            m.timeout,
            &m.latency,
        )
        .await;
        // An agent confirms a dry run by echoing its header (the shipped runtime does).
        let echoed = reply
            .as_ref()
            .is_ok_and(|msg| headers::dry_run(msg.headers.as_ref()));
        let cache = reply.as_ref().ok().and_then(|msg| {
            headers::get(msg.headers.as_ref(), headers::POLICY_CACHE).map(str::to_string)
        });
        let undo = reply
            .as_ref()
            .ok()
            .and_then(|msg| headers::get(msg.headers.as_ref(), headers::POLICY_UNDO))
            .and_then(Undo::parse);
        let patch = patch_of(m, reply, self.max_patch_bytes);
        if patch.is_ok() {
            // What a failed call of this kind may have left: nothing, if its answers are pure
            // or it says it never holds anything.
            let nothing = cache.is_some() || undo == Some(Undo::Never);
            m.takes_nothing
                .store(nothing, std::sync::atomic::Ordering::Relaxed);
        }
        let took = start.elapsed();
        let source = match cache {
            Some(_) if patch.is_ok() => Source::Pure,
            _ => Source::Agent,
        };
        if let (Ok(p), Some(h)) = (&patch, cache) {
            self.verdicts
                .store(kind, self.event, &h, self.attributes, state, p);
        }
        let answer = Answer {
            source,
            echoed,
            undo,
            hedged: copies > 1,
        };
        (patch, took, answer)
    }

    /// Runs the chain from `state`, whose header form `header` the caller already made.
    pub async fn run_chain(&self, chain: &Chain, mut state: State, header: String) -> Run {
        let mut timings = Vec::new();
        let mut owed = 0u64;
        let dry_run = headers::dry_run(Some(&self.trace));
        let mut ignored_dry_run = false;
        let mut degraded = false;
        let mut holds = Holds::default();
        let mut first = Some(header);
        for stage in &chain.stages {
            let encoded = match first.take() {
                Some(h) => Ok(h),
                None => state.to_header(),
            };
            let header = match encoded {
                Ok(h) => h,
                Err(e) => {
                    // Our own state always encodes; if not, fail closed rather than guess.
                    tracing::error!(error = %e, "cannot encode state");
                    deny(
                        &mut state,
                        Reason::new("dispatcher", "internal", Effect::Deny)
                            .with_detail(e.to_string()),
                    );
                    break;
                }
            };
            let (observers, callers): (Vec<&Member>, Vec<&Member>) =
                stage.members.iter().partition(|m| m.observe);
            // Observers watch what is decided; a dry run decides nothing.
            let observers = if dry_run { Vec::new() } else { observers };
            for m in observers {
                if let Err(e) = self
                    .nats
                    .publish_with_headers(
                        m.subject.clone(),
                        self.headers(&header),
                        self.payload.clone(),
                    )
                    .await
                {
                    tracing::warn!(agent = %m.kind, error = %e, "could not publish to observer");
                }
                timings.push(timing(m, Duration::ZERO, Outcome::Observed));
            }
            let answers = match callers.as_slice() {
                [] => Vec::new(),
                [one] => vec![self.ask(one, &state, &header).await],
                many => {
                    futures::future::join_all(many.iter().map(|m| self.ask(m, &state, &header)))
                        .await
                }
            };
            let mut stop = false;
            for (m, (answer, took, how)) in callers.iter().zip(answers) {
                let denied = answer.as_ref().is_ok_and(State::denies);
                let merged = answer.and_then(|patch| {
                    merge(&mut state, patch, m.kind.as_str(), &mut holds).map_err(|e| Failure {
                        outcome: Outcome::Error,
                        code: failure::ERROR,
                        detail: e.to_string(),
                    })
                });
                match merged {
                    Ok(flow) => {
                        let mut t = timing(m, took, Outcome::Answered);
                        t.cached = how.source == Source::Cache;
                        if dry_run && !how.echoed && how.source == Source::Agent {
                            // It may have taken something for real: the decision becomes a
                            // deny, and what it took is undone.
                            deny(
                                &mut state,
                                Reason::new("dispatcher", DRY_RUN_IGNORED, Effect::Deny)
                                    .with_detail(format!(
                                        "{} answered this dry run as a real event (an agent that does not know Policy-Dry-Run): what it took is undone",
                                        m.kind
                                    )),
                            );
                            ignored_dry_run = true;
                        }
                        if owes_undo(Ended::Answered { how, denied }) {
                            owed |= 1u64.checked_shl(timings.len() as u32).unwrap_or(0);
                        }
                        timings.push(t);
                        stop |= flow == Flow::Stop;
                    }
                    Err(f) => {
                        tracing::warn!(agent = %m.kind, code = f.code, detail = %f.detail, failure = m.failure.as_str(), "agent failed");
                        let nothing = m.takes_nothing.load(std::sync::atomic::Ordering::Relaxed);
                        if owes_undo(Ended::Failed {
                            outcome: f.outcome,
                            nothing,
                            hedged: how.hedged,
                        }) {
                            owed |= 1u64.checked_shl(timings.len() as u32).unwrap_or(0);
                        }
                        timings.push(timing(m, took, f.outcome));
                        let reason = Reason::new(m.kind.as_str(), f.code, Effect::Deny)
                            .with_detail(f.detail);
                        match m.failure {
                            FailureMode::Closed => {
                                deny(&mut state, reason);
                                stop = true;
                            }
                            FailureMode::Open => {
                                degraded = true;
                                push_reason(
                                    &mut state,
                                    Reason {
                                        effect: Effect::Skipped,
                                        ..reason
                                    },
                                );
                            }
                        }
                    }
                }
            }
            if stop {
                break;
            }
        }
        Run {
            state,
            degraded,
            timings,
            owed,
            ignored_dry_run,
        }
    }
}

fn timing(m: &Member, took: Duration, outcome: Outcome) -> AgentTiming {
    AgentTiming {
        agent: m.kind.to_string(),
        priority: m.priority,
        latency_us: took.as_micros().min(u128::from(u64::MAX)) as u64,
        outcome,
        cached: false,
    }
}

fn push_reason(state: &mut State, reason: Reason) {
    match state.0.get_mut(keys::REASONS) {
        Some(Value::Array(list)) => list.push(reason.to_value()),
        _ => state.insert(keys::REASONS, Value::Array(vec![reason.to_value()])),
    }
}

fn deny(state: &mut State, reason: Reason) {
    state.set_action(bus::Action::Deny);
    push_reason(state, reason);
}

/// The reason policy of a deny the dispatcher makes because an agent routed a connection to a
/// peer that is not among the candidates left.
pub const INVALID_TARGET_PEER: &str = "invalid-target-peer";

/// A `target_peer` must be one of the final `dst_peers`: an agent at the ACL's priority, or one
/// that answered before a later agent narrowed the candidates, must not route a connection to
/// a peer the chain removed. Such a decision is a deny, never an allow to that peer.
fn check_target_peer(s: &mut State) {
    let Some(target) = s.get_str(keys::TARGET_PEER) else {
        return;
    };
    let candidates = s.get_strings(keys::DST_PEERS);
    if candidates.as_ref().is_some_and(|c| c.contains(&target)) {
        return;
    }
    let detail = match candidates {
        Some(c) => format!(
            "target_peer {target:?} is not one of the candidates left [{}]",
            c.join(", ")
        ),
        None => format!("target_peer {target:?} was set but the event offered no dst_peers"),
    };
    tracing::warn!(%detail, "decision denied: an agent picked a peer that is not a candidate");
    deny(
        s,
        Reason::new("dispatcher", INVALID_TARGET_PEER, Effect::Deny).with_detail(detail),
    );
}

/// Adds the dispatcher's keys to the final state. A connection nobody denied is allowed (once
/// its target peer is checked); a denied event offers no candidates and no target.
pub fn finalize(run: &mut Run, event_id: &str, event: &Event) {
    // Events answered with an `action`: allowed unless an agent denied.
    let is_connection = matches!(
        event,
        Event::NewConnection(_) | Event::RemoteServiceAdded(_)
    );
    let s = &mut run.state;
    if !s.denies() {
        check_target_peer(s);
    }
    let denied = s.denies();
    if denied {
        for key in keys::CANDIDATES {
            if s.get(key).is_some() {
                s.insert(key, Value::Array(Vec::new()));
            }
        }
        s.remove(keys::TARGET_PEER);
    } else if is_connection {
        s.set_action(bus::Action::Allow);
    }
    // `connection-closed` is acknowledged with its event id alone.
    let explained = !matches!(event, Event::ConnectionClosed(_));
    if explained && !s.get(keys::REASONS).is_some_and(Value::is_array) {
        s.insert(keys::REASONS, Value::Array(Vec::new()));
    }
    if run.degraded {
        s.insert(keys::DEGRADED, true);
    }
    s.insert(keys::EVENT_ID, event_id);
}

/// A run the dispatcher denies without calling any agent, naming `policy` and why: a site of a
/// fleet that never had the fleet's configuration (see `crate::fleet`).
pub fn refused_run(state: State, policy: &str, why: String) -> Run {
    let mut run = Run {
        state,
        degraded: false,
        timings: Vec::new(),
        owed: 0,
        ignored_dry_run: false,
    };
    deny(
        &mut run.state,
        Reason::new("dispatcher", policy, Effect::Deny).with_detail(why),
    );
    run
}

/// The decision for an event whose stored subscriptions do not all load: deny, naming each
/// broken record. A record nobody can read might have been the ACL's, so the chain does not run
/// without it (fail closed, as an agent does with a broken policy).
pub fn broken_chain(state: State, broken: &[crate::table::Broken]) -> Run {
    let mut run = Run {
        state,
        degraded: false,
        timings: Vec::new(),
        owed: 0,
        ignored_dry_run: false,
    };
    for b in broken {
        deny(
            &mut run.state,
            Reason::new("dispatcher", &b.key, Effect::Deny)
                .with_detail(format!("stored subscription does not load: {}", b.error)),
        );
    }
    run
}

/// The policy named in a dry run's deny when an agent did not confirm it was a dry run.
pub const DRY_RUN_IGNORED: &str = "dry-run-ignored";

/// The policy named in a decision made after the hookpoint's deadline.
pub const PAST_DEADLINE: &str = "past-deadline";

/// A run that ended after the hookpoint stopped waiting (its `Policy-Deadline` passed: it
/// timed out, or took another dispatcher's answer to its hedged copy) becomes a deny, so that
/// what the agents took for it is undone: an allow nobody received would hold a conn-limit
/// slot no close ever frees. If clock skew lets the hookpoint still read it, it reads a deny.
pub fn deny_late(run: &mut Run) {
    deny(
        &mut run.state,
        Reason::new("dispatcher", PAST_DEADLINE, Effect::Deny).with_detail(
            "decided after the hookpoint's deadline: it no longer waits for this answer, so nothing is kept for it",
        ),
    );
}

#[cfg(test)]
#[path = "chain_tests.rs"]
mod tests;
