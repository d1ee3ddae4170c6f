//! The tap record published on `<prefix>.tap.<event>` after each decision.

use serde::{Deserialize, Serialize};

use crate::state::{State, Value};

/// How one agent's call went, for latency histograms and debugging a slow chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Answered; its patch was merged.
    Answered,
    /// Timed out.
    Timeout,
    /// No live instance.
    NoResponders,
    /// Answered with an error, or with an answer that could not be merged.
    Error,
    /// Observe-only: sent without waiting. (Agents after a deny are not called and not listed.)
    Observed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentTiming {
    pub agent: String,
    pub priority: i32,
    pub latency_us: u64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TapRecord {
    pub event: String,
    pub event_id: String,
    /// The event's attributes as the agents saw them.
    pub attributes: Value,
    /// The decision as sent to the hookpoint.
    pub decision: State,
    /// From the dispatcher receiving the event to the decision being sent.
    pub total_us: u64,
    /// In chain order.
    pub agents: Vec<AgentTiming>,
    /// Unix time in milliseconds when the decision was made.
    pub at_ms: u64,
}
