//! What a denied event owes its agents: which kinds to tell (from what each call's answer said
//! it holds, `Policy-Undo`), and telling them, after the reply, until they confirm.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bus::headers::Undo;
use bus::tap::{AgentTiming, Outcome};
use bus::{State, Subjects};
use bytes::Bytes;

use crate::Dispatcher;

/// How long an undo no kind instance confirmed is asked again, in the background.
const UNDO_RETRY_FOR: Duration = Duration::from_secs(120);

/// How long a kind has to confirm an undo (one copy per attempt).
const UNDO_TIMEOUT: Duration = Duration::from_secs(1);

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The agent, with nothing said about what it depends on.
    Agent,
    /// The agent, saying its answer may be cached: a pure answer, which takes nothing (the
    /// dispatcher may give it again without calling the agent at all).
    Pure,
    /// The dispatcher's verdict cache: no agent was called.
    Cache,
}

/// How an answer came, for what an undo owes it.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub source: Source,
    /// It echoed `Policy-Dry-Run` (or needed not: from the cache).
    pub echoed: bool,
    /// Its `Policy-Undo` (`None`: an agent that predates it).
    pub undo: Option<Undo>,
    /// More than one copy of the call was sent: another may have run, and taken something.
    pub hedged: bool,
}

/// How a call ended, for what an undo owes it.
#[derive(Debug, Clone, Copy)]
pub enum Ended {
    /// `denied`: the answer itself denied.
    Answered { how: Answer, denied: bool },
    /// `nothing`: the kind's answers say it holds nothing (pure, or `Policy-Undo: never`).
    /// `hedged`: more than one copy was sent (an earlier one may have reached an instance
    /// that took something, before the last found none).
    Failed {
        outcome: Outcome,
        nothing: bool,
        hedged: bool,
    },
}

/// Whether a call owes an `_undo` if the event ends denied: it answered that it holds
/// something; it answered that it holds nothing but was hedged (another copy may hold); it
/// predates `Policy-Undo` and did not deny itself unhedged; or it failed in a way that may
/// have left something taken (no answer in time, an error, or no instance left for a copy
/// after an earlier one was sent) and its kind may hold.
pub fn owes_undo(ended: Ended) -> bool {
    match ended {
        Ended::Answered { how, .. } if how.source != Source::Agent => false,
        Ended::Answered { how, denied } => match how.undo {
            Some(Undo::Held) => true,
            Some(Undo::Nothing) => how.hedged,
            Some(Undo::Never) => false,
            None => !denied || how.hedged,
        },
        Ended::Failed {
            outcome,
            nothing,
            hedged,
        } => {
            !nothing
                && (matches!(outcome, Outcome::Timeout | Outcome::Error)
                    || (outcome == Outcome::NoResponders && hedged))
        }
    }
}

/// What a denied event's agents must give back: who to ask, with the final decision.
pub struct UndoCall {
    pub kinds: Vec<bus::Kind>,
    pub decision: Bytes,
    pub trace: HeaderMap,
}

/// The kinds to tell that their event was denied: those the run owes an undo (see
/// [`owes_undo`]). `None` for an event that was not denied, or owes none.
pub fn undo_for(
    state: &State,
    timings: &[AgentTiming],
    owed: u64,
    decision: &Bytes,
    trace: &HeaderMap,
) -> Option<UndoCall> {
    if !state.denies() {
        return None;
    }
    let mut kinds: Vec<bus::Kind> = timings
        .iter()
        .enumerate()
        .filter(|(i, t)| match 1u64.checked_shl(*i as u32) {
            Some(bit) => owed & bit != 0,
            None => matches!(
                t.outcome,
                Outcome::Answered | Outcome::Timeout | Outcome::Error
            ),
        })
        .filter_map(|(_, t)| bus::Kind::new(&t.agent).ok())
        .collect();
    kinds.sort();
    kinds.dedup();
    (!kinds.is_empty()).then(|| UndoCall {
        kinds,
        decision: decision.clone(),
        trace: trace.clone(),
    })
}

impl Dispatcher {
    /// Tells each kind that answered (or failed) on a denied event to give back what it took
    /// for it. After the reply, so the hookpoint does not wait; before the task ends, so a
    /// stopping dispatcher still sends it. What cannot be undone is left to the kind's lease.
    pub(crate) async fn undo(&self, undo: UndoCall) {
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
            let mut pause = Duration::from_millis(250);
            while !kinds.is_empty() {
                tokio::time::sleep(pause).await;
                // A kind that answers "not confirmed" (its store away) is not asked 4 times a
                // second by every undo waiting on it.
                pause = (pause * 2).min(Duration::from_secs(5));
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
}

/// Asks each kind to undo; returns the kinds that could not be reached.
pub(crate) async fn undo_calls(
    nats: &async_nats::Client,
    subjects: &Subjects,
    kinds: &[bus::Kind],
    undo: &UndoCall,
) -> Vec<bus::Kind> {
    let calls = kinds.iter().map(|kind| {
        let subject = subjects.agent_undo(kind);
        let (trace, decision) = (undo.trace.clone(), undo.decision.clone());
        async move {
            // One copy per attempt, never hedged: an undo is asked again in the background if
            // it fails, and hedging it (with a fresh budget per call) multiplied the requests of
            // an overloaded engine's undo storm sixteen times.
            let latency = bus::hedge::Latency::new(UNDO_TIMEOUT, 1);
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
