//! Header names. Generated once here so no other crate spells one.

/// Base64 (standard, padded) of a MessagePack map: the shared state between agents.
pub const POLICY_STATE: &str = "Policy-State";
/// The event id, echoed on every hop, in the decision and on the tap.
pub const POLICY_EVENT_ID: &str = "Policy-Event-Id";
/// When the dispatcher stops waiting for an agent's answer, in Unix milliseconds: an agent
/// does not start work on a request its caller has given up on (hedged calls leave such
/// duplicates queued at a frozen instance). Hosts' clocks are assumed NTP-close.
pub const POLICY_DEADLINE: &str = "Policy-Deadline";
/// On a reply that is not an answer: the request was a copy of one already being worked on,
/// or came past its deadline, and was dropped. The value says which. The reply exists only so
/// that the sender's client forgets the request (async-nats keeps an unanswered request's
/// entry for the life of the connection); the sender ignores it and waits for its other
/// copies.
pub const POLICY_DROPPED: &str = "Policy-Dropped";
/// On an agent's reply: the answer may be cached (see [`crate::cache`]).
pub const POLICY_CACHE: &str = "Policy-Cache";
/// On an agent's reply: whether the answer holds something for the event that an `_undo`
/// gives back if the event ends denied (see [`Undo`]). Absent (an agent that predates it): the
/// dispatcher treats the answer as it did before, and undoes it unless it denied itself.
pub const POLICY_UNDO: &str = "Policy-Undo";

/// The values of [`POLICY_UNDO`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undo {
    /// This answer holds something for the event's run: undo it if the event is denied.
    Held,
    /// This answer holds nothing; the kind may hold for other answers, so a failed or hedged
    /// call of it is still undone.
    Nothing,
    /// The kind never holds anything an undo would give back: no undo, even when it failed.
    Never,
}

impl Undo {
    pub fn as_str(self) -> &'static str {
        match self {
            Undo::Held => "held",
            Undo::Nothing => "none",
            Undo::Never => "never",
        }
    }

    pub fn parse(value: &str) -> Option<Undo> {
        match value {
            "held" => Some(Undo::Held),
            "none" => Some(Undo::Nothing),
            "never" => Some(Undo::Never),
            _ => None,
        }
    }
}

/// Short error code on an error reply (see [`crate::ErrorCode`]).
pub const POLICY_ERROR: &str = "Policy-Error";
/// `true` on an event whose decision must change nothing: every agent answers what it would
/// decide without writing anything (conn-limit takes no slot, rate-limit spends no token), and
/// the dispatcher sends no undo and no tap record. Copied onto every hop.
pub const POLICY_DRY_RUN: &str = "Policy-Dry-Run";
/// On a module check (`<prefix>.agent._wasm.check`): the kind the module is to be deployed
/// as, so that the wasm host can say whether it may serve that kind at all.
pub const POLICY_WASM_KIND: &str = "Policy-Wasm-Kind";
/// W3C trace context, propagated from the hookpoint through every hop.
pub const TRACEPARENT: &str = "traceparent";
/// NATS services API error headers, so standard tooling sees our errors as errors.
pub const NATS_SERVICE_ERROR: &str = "Nats-Service-Error";
pub const NATS_SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

/// Service names registered with the NATS services API (`$SRV.PING`, `INFO`, `STATS`).
pub const DISPATCHER_SERVICE: &str = "policy-dispatcher";
/// The services API name of `policy-agent wasm`, the host of WebAssembly agent kinds.
pub const WASM_HOST_SERVICE: &str = "policy-agent-wasm";
/// The services API name of an agent kind's instances: `policy-agent-<kind>`. It takes any
/// displayable kind name: taking `Kind` itself would tie headers to subjects, which tie back
/// through their errors.
pub fn agent_service(kind: impl std::fmt::Display) -> String {
    format!("policy-agent-{kind}")
}

/// A header name for a map lookup or insert without allocating: a `&str` name is copied into
/// a new `String` (and validated) on every call, a cost paid per header per hop.
pub fn name(name: &'static str) -> async_nats::header::HeaderName {
    async_nats::header::HeaderName::from_static(name)
}

/// Longest `Policy-Event-Id`: the engine's own are 22 characters.
pub const MAX_EVENT_ID: usize = 64;

/// Whether `id` may be an event id: 1 to [`MAX_EVENT_ID`] characters of `A-Z a-z 0-9 - _ .`.
/// It keys hedged copies, log lines and records on every hop, so a hookpoint's choice is
/// bounded where it arrives (the dispatcher answers a bad one `bad-request`).
pub fn valid_event_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_EVENT_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `v` is a W3C `traceparent` the engine passes on: version `00`'s exact shape,
/// `00-<32 hex>-<16 hex>-<2 hex>`, lowercase, with a trace id and a parent id not all zero.
/// Anything else is dropped where it arrives, as the W3C recommendation says to treat an
/// invalid one (the decision goes on without it).
pub fn valid_traceparent(v: &str) -> bool {
    // Checked in place: it is on every hop of every event.
    let b = v.as_bytes();
    let hex = |s: &[u8]| {
        s.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    let zero = |s: &[u8]| s.iter().all(|c| *c == b'0');
    b.len() == 55
        && b.starts_with(b"00-")
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(&b[3..35])
        && hex(&b[36..52])
        && hex(&b[53..55])
        && !zero(&b[3..35])
        && !zero(&b[36..52])
}

/// The event id of a message, if it has a valid one.
pub fn event_id(headers: Option<&async_nats::HeaderMap>) -> Option<&str> {
    get(headers, POLICY_EVENT_ID).filter(|id| valid_event_id(id))
}

/// Copies the event id, trace context and dry-run flag from one hop's headers to the next;
/// an event id or a trace context that is not valid is not passed on.
pub fn propagate(from: Option<&async_nats::HeaderMap>, to: &mut async_nats::HeaderMap) {
    if let Some(from) = from {
        for n in [POLICY_EVENT_ID, TRACEPARENT, POLICY_DRY_RUN] {
            if let Some(v) = from.get(name(n)) {
                let ok = match n {
                    POLICY_EVENT_ID => valid_event_id(v.as_str()),
                    TRACEPARENT => valid_traceparent(v.as_str()),
                    _ => true,
                };
                if ok {
                    to.insert(name(n), v.clone());
                }
            }
        }
    }
}

/// Whether the headers mark a dry run (`Policy-Dry-Run: true`).
pub fn dry_run(headers: Option<&async_nats::HeaderMap>) -> bool {
    get(headers, POLICY_DRY_RUN).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The value of a header as a `&str`, if present.
pub fn get<'a>(headers: Option<&'a async_nats::HeaderMap>, n: &'static str) -> Option<&'a str> {
    headers?.get(name(n)).map(|v| v.as_str())
}

#[cfg(test)]
mod tests {
    #[test]
    fn event_ids_and_trace_contexts_are_bounded() {
        assert!(super::valid_event_id("as3qufpjHsstCqJwVQGDZ2"));
        assert!(super::valid_event_id("gw-1.e_2"));
        for bad in ["", "has space", "semi;colon", &"a".repeat(65), "é"] {
            assert!(!super::valid_event_id(bad), "{bad:?}");
        }
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(super::valid_traceparent(good));
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            &format!("{good}{}", "0".repeat(10_000)),
        ] {
            assert!(!super::valid_traceparent(bad), "{bad:?}");
        }
        let mut from = async_nats::HeaderMap::new();
        from.insert(super::POLICY_EVENT_ID, "x".repeat(100).as_str());
        from.insert(super::TRACEPARENT, "junk");
        let mut to = async_nats::HeaderMap::new();
        super::propagate(Some(&from), &mut to);
        assert!(to.get(super::POLICY_EVENT_ID).is_none());
        assert!(to.get(super::TRACEPARENT).is_none());
    }

    use super::*;

    #[test]
    fn header_names_survive_a_header_map() {
        let mut h = async_nats::HeaderMap::new();
        for name in [POLICY_STATE, POLICY_EVENT_ID, POLICY_ERROR, TRACEPARENT] {
            h.insert(name, "v");
            assert_eq!(get(Some(&h), name), Some("v"), "{name}");
        }
        let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert(TRACEPARENT, trace);
        let mut to = async_nats::HeaderMap::new();
        propagate(Some(&h), &mut to);
        assert_eq!(get(Some(&to), POLICY_EVENT_ID), Some("v"));
        assert_eq!(get(Some(&to), TRACEPARENT), Some(trace));
        assert_eq!(get(Some(&to), POLICY_STATE), None);
    }
}
