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

impl Outcome {
    /// The outcome's name in metrics, pages and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Timeout => "timeout",
            Outcome::NoResponders => "no-responders",
            Outcome::Error => "error",
            Outcome::Observed => "observed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentTiming {
    pub agent: String,
    pub priority: i32,
    pub latency_us: u64,
    pub outcome: Outcome,
    /// Answered from the dispatcher's verdict cache, without a call (absent when false, so
    /// readers of the first version of the tap read it unchanged).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
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
    /// The hookpoint's W3C `traceparent`, when it sent one: the decision's trace (absent
    /// otherwise, so readers of the first version of the tap read it unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// A tap record's bytes, built from parts the dispatcher has already encoded (the hookpoint's
/// attributes, the decision as sent), so publishing the tap costs no second encoding of them.
/// The bytes are exactly those of the [`TapRecord`] with the same content: a map with named
/// fields, in the struct's order. `attributes` and `decision` must each be one MessagePack
/// value (as a received payload and an encoded state are).
pub struct RawTapRecord<'a> {
    pub event: &'a str,
    pub event_id: &'a str,
    pub attributes: &'a [u8],
    pub decision: &'a [u8],
    pub total_us: u64,
    pub agents: &'a [AgentTiming],
    pub at_ms: u64,
    pub traceparent: Option<&'a str>,
}

impl RawTapRecord<'_> {
    pub fn encode(&self) -> Result<Vec<u8>, crate::codec::CodecError> {
        let mut out = Vec::with_capacity(
            64 + self.event.len()
                + self.event_id.len()
                + self.attributes.len()
                + self.decision.len()
                + self.agents.len() * 48,
        );
        fn put<T: Serialize + ?Sized>(
            out: &mut Vec<u8>,
            value: &T,
        ) -> Result<(), crate::codec::CodecError> {
            rmp_serde::encode::write_named(out, value).map_err(|source| {
                crate::codec::CodecError::Encode {
                    what: "tap record",
                    source,
                }
            })
        }
        // A fixmap of the record's seven fields (eight with a traceparent), each key then
        // its value.
        out.push(if self.traceparent.is_some() {
            0x88
        } else {
            0x87
        });
        put(&mut out, "event")?;
        put(&mut out, self.event)?;
        put(&mut out, "event_id")?;
        put(&mut out, self.event_id)?;
        put(&mut out, "attributes")?;
        out.extend_from_slice(self.attributes);
        put(&mut out, "decision")?;
        out.extend_from_slice(self.decision);
        put(&mut out, "total_us")?;
        put(&mut out, &self.total_us)?;
        put(&mut out, "agents")?;
        put(&mut out, self.agents)?;
        put(&mut out, "at_ms")?;
        put(&mut out, &self.at_ms)?;
        if let Some(t) = self.traceparent {
            put(&mut out, "traceparent")?;
            put(&mut out, t)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_record_is_byte_for_byte_the_typed_one() {
        let mut decision = State::new();
        decision.insert("action", "allow");
        decision.set_strings("dst_peers", &["p1", "p2"]);
        let attributes = Value::Map(vec![
            ("src_service".into(), "web".into()),
            (
                "dst_peers".into(),
                Value::Array(vec!["p1".into(), "p2".into()]),
            ),
        ]);
        let typed = TapRecord {
            event: "new-connection".into(),
            event_id: "e1".into(),
            attributes: attributes.clone(),
            decision: decision.clone(),
            total_us: 70_000,
            agents: vec![AgentTiming {
                agent: "acl".into(),
                priority: 10,
                latency_us: 312,
                outcome: Outcome::Answered,
                cached: false,
            }],
            at_ms: 1_790_000_000_000,
            traceparent: None,
        };
        let attributes = crate::codec::encode("a", &attributes).unwrap();
        let decision = decision.encode().unwrap();
        let raw = RawTapRecord {
            event: &typed.event,
            event_id: &typed.event_id,
            attributes: &attributes,
            decision: &decision,
            total_us: typed.total_us,
            agents: &typed.agents,
            at_ms: typed.at_ms,
            traceparent: None,
        }
        .encode()
        .unwrap();
        assert_eq!(raw, crate::codec::encode("t", &typed).unwrap());
        assert_eq!(crate::codec::decode::<TapRecord>("t", &raw).unwrap(), typed);
        // With a traceparent, the same.
        let traced = TapRecord {
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            ..typed
        };
        let raw = RawTapRecord {
            event: &traced.event,
            event_id: &traced.event_id,
            attributes: &attributes,
            decision: &decision,
            total_us: traced.total_us,
            agents: &traced.agents,
            at_ms: traced.at_ms,
            traceparent: traced.traceparent.as_deref(),
        }
        .encode()
        .unwrap();
        assert_eq!(raw, crate::codec::encode("t", &traced).unwrap());
    }
}
