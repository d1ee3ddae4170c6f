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
pub fn agent_service(kind: &crate::Kind) -> String {
    format!("policy-agent-{kind}")
}

/// A header name for a map lookup or insert without allocating: a `&str` name is copied into
/// a new `String` (and validated) on every call, a cost paid per header per hop.
pub fn name(name: &'static str) -> async_nats::header::HeaderName {
    async_nats::header::HeaderName::from_static(name)
}

/// Copies the event id, trace context and dry-run flag from one hop's headers to the next.
pub fn propagate(from: Option<&async_nats::HeaderMap>, to: &mut async_nats::HeaderMap) {
    if let Some(from) = from {
        for n in [POLICY_EVENT_ID, TRACEPARENT, POLICY_DRY_RUN] {
            if let Some(v) = from.get(name(n)) {
                to.insert(name(n), v.clone());
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
    use super::*;

    #[test]
    fn header_names_survive_a_header_map() {
        let mut h = async_nats::HeaderMap::new();
        for name in [POLICY_STATE, POLICY_EVENT_ID, POLICY_ERROR, TRACEPARENT] {
            h.insert(name, "v");
            assert_eq!(get(Some(&h), name), Some("v"), "{name}");
        }
        let mut to = async_nats::HeaderMap::new();
        propagate(Some(&h), &mut to);
        assert_eq!(get(Some(&to), POLICY_EVENT_ID), Some("v"));
        assert_eq!(get(Some(&to), TRACEPARENT), Some("v"));
        assert_eq!(get(Some(&to), POLICY_STATE), None);
    }
}
