//! Subject names, built from the deployment prefix. No other crate formats a subject.

use std::fmt;

use crate::error::InvalidName;

/// Checks a token against `[a-z0-9]+(-[a-z0-9]+)*`: event and agent-kind names are single
/// subject tokens, and kebab-case keeps them valid KV keys, metric labels and CLI words alike.
fn check_kebab(what: &'static str, s: &str) -> Result<(), InvalidName> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.split('-').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            what,
            name: s.to_string(),
            rule: "a kebab-case token: lowercase letters and digits separated by single '-'",
        })
    }
}

/// An agent kind (`acl`, `lb`, or any kind a third party writes): the queue group name and the
/// second token of its subjects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Kind(String);

impl Kind {
    pub fn new(s: &str) -> Result<Self, InvalidName> {
        check_kebab("agent kind", s)?;
        Ok(Kind(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The agent kinds shipped with policy-bus. Others join by subscription.
pub const SHIPPED_KINDS: [&str; 5] = ["acl", "lb", "conn-limit", "rate-limit", "monitor"];

/// The closest of `known` to a mistyped `word`, if one is close enough to be what was meant.
pub fn did_you_mean<'a>(word: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    known
        .into_iter()
        .filter(|k| *k != word)
        .map(|k| (strsim::levenshtein(word, k), k))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, k)| k)
}

pub(crate) fn check_event(s: &str) -> Result<(), InvalidName> {
    check_kebab("event", s)
}

/// The agent-side token used to ask a kind to validate a policy document. It starts with `_`,
/// which no event name can, so it never collides with an event subscription.
pub const VALIDATE_TOKEN: &str = "_validate";

/// The agent-side token the dispatcher uses, after a chain ended in deny, to tell each kind it
/// called that the event was denied, so that a kind that took something for it (a
/// conn-limit slot) gives it back. The payload is the final decision. Request/reply, so that
/// unlike the tap it is not lost when nobody happens to listen.
pub const UNDO_TOKEN: &str = "_undo";
/// The token of the wasm hosts' own subjects under `<prefix>.agent.`.
pub const WASM_TOKEN: &str = "_wasm";

/// Admin commands, each the last token of `<prefix>.admin.<command>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminCommand {
    Subscribe,
    Unsubscribe,
    Subscriptions,
    PolicyAdd,
    PolicyRemove,
    PolicyList,
    Apply,
    Status,
    AgentDeploy,
    AgentRemove,
    AgentList,
}

impl AdminCommand {
    pub const ALL: [AdminCommand; 11] = [
        AdminCommand::Subscribe,
        AdminCommand::Unsubscribe,
        AdminCommand::Subscriptions,
        AdminCommand::PolicyAdd,
        AdminCommand::PolicyRemove,
        AdminCommand::PolicyList,
        AdminCommand::Apply,
        AdminCommand::Status,
        AdminCommand::AgentDeploy,
        AdminCommand::AgentRemove,
        AdminCommand::AgentList,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            AdminCommand::Subscribe => "subscribe",
            AdminCommand::Unsubscribe => "unsubscribe",
            AdminCommand::Subscriptions => "subscriptions",
            AdminCommand::PolicyAdd => "policy-add",
            AdminCommand::PolicyRemove => "policy-remove",
            AdminCommand::PolicyList => "policy-list",
            AdminCommand::Apply => "apply",
            AdminCommand::Status => "status",
            AdminCommand::AgentDeploy => "agent-deploy",
            AdminCommand::AgentRemove => "agent-remove",
            AdminCommand::AgentList => "agent-list",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// All subjects of one engine. Several engines share a NATS system by using different prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// A prefix is one or more dot-separated tokens of `[A-Za-z0-9_-]`, so that every subject
    /// built from it is a plain literal and the KV bucket name derived from it is valid.
    pub fn new(prefix: &str) -> Result<Self, InvalidName> {
        let ok = !prefix.is_empty()
            && prefix.split('.').all(|t| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !ok {
            return Err(InvalidName {
                what: "prefix",
                name: prefix.to_string(),
                rule: "dot-separated tokens of letters, digits, '-' and '_'",
            });
        }
        Ok(Subjects {
            prefix: prefix.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The engine at the hub of this engine's fleet: the prefix `<prefix>.fleet`, so that the
    /// hub's subjects and buckets are never a site's (see [`crate::fleet`]).
    pub fn fleet(&self) -> Subjects {
        Subjects {
            prefix: format!("{}.fleet", self.prefix),
        }
    }

    pub fn event(&self, event: &str) -> String {
        format!("{}.event.{event}", self.prefix)
    }
    pub fn events_wildcard(&self) -> String {
        format!("{}.event.>", self.prefix)
    }
    /// The event name carried by a subject received on [`Self::events_wildcard`].
    pub fn event_of<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject.strip_prefix(&self.prefix)?.strip_prefix(".event.")
    }

    pub fn agent(&self, kind: &Kind, event: &str) -> String {
        format!("{}.agent.{kind}.{event}", self.prefix)
    }
    pub fn agent_validate(&self, kind: &Kind) -> String {
        self.agent(kind, VALIDATE_TOKEN)
    }
    pub fn agent_undo(&self, kind: &Kind) -> String {
        self.agent(kind, UNDO_TOKEN)
    }
    /// Every agent kind's subjects: what the dispatcher calls.
    pub fn agents_wildcard(&self) -> String {
        format!("{}.agent.>", self.prefix)
    }
    pub fn agent_wildcard(&self, kind: &Kind) -> String {
        format!("{}.agent.{kind}.>", self.prefix)
    }
    /// The token after `<prefix>.agent.<kind>.` (an event name or [`VALIDATE_TOKEN`]).
    pub fn agent_op_of<'a>(&self, kind: &Kind, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(&self.prefix)?
            .strip_prefix(".agent.")?
            .strip_prefix(kind.as_str())?
            .strip_prefix('.')
    }

    pub fn admin(&self, command: AdminCommand) -> String {
        format!("{}.admin.{}", self.prefix, command.as_str())
    }
    pub fn admin_wildcard(&self) -> String {
        format!("{}.admin.>", self.prefix)
    }
    pub fn admin_of<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject.strip_prefix(&self.prefix)?.strip_prefix(".admin.")
    }

    pub fn tap(&self, event: &str) -> String {
        format!("{}.tap.{event}", self.prefix)
    }
    pub fn tap_wildcard(&self) -> String {
        format!("{}.tap.>", self.prefix)
    }

    /// A private echo subject for `policyctl bench`'s raw request/reply floor; the unique
    /// suffix keeps concurrent benches (and other engines) from answering each other.
    pub fn bench_echo(&self, unique: &str) -> String {
        format!("{}._bench.echo.{unique}", self.prefix)
    }

    /// Where a dispatcher that stored a policy change asks every dispatcher (a plain
    /// subscription, not the queue group) to confirm it has seen that bucket revision, so that
    /// none serves a verdict cached under the old policy set once the change is acknowledged.
    pub fn dispatchers_seen(&self) -> String {
        format!("{}._dispatcher.seen", self.prefix)
    }

    pub fn bench_wildcard(&self) -> String {
        format!("{}._bench.>", self.prefix)
    }

    /// The NATS services API ping subject of a service name (`$SRV.PING.<name>`): every live
    /// instance answers it, which is how tools and tests count instances.
    pub fn service_ping(name: &str) -> String {
        format!("$SRV.PING.{name}")
    }

    /// The NATS services API stats subject (`$SRV.STATS.<name>`): per-endpoint request counts
    /// of every live instance.
    pub fn service_stats(name: &str) -> String {
        format!("$SRV.STATS.{name}")
    }

    /// The JetStream key-value bucket holding subscriptions and policies. Bucket names cannot
    /// contain dots, so the prefix's dots become underscores.
    pub fn config_bucket(&self) -> String {
        format!("{}_config", self.prefix.replace('.', "_"))
    }

    /// The connection limiter's marker bucket (closes and undos), and the base of its slot
    /// streams' names and subjects (`crate::slots`).
    pub fn conn_bucket(&self) -> String {
        format!("{}_conns", self.prefix.replace('.', "_"))
    }

    /// At the hub of a fleet: each site's standing, sourced from the sites (`crate::fleet`).
    pub fn sites_bucket(&self) -> String {
        format!("{}_sites", self.prefix.replace('.', "_"))
    }

    /// The rate limiter's bucket: one GCRA state per limited key, shared by its instances.
    pub fn rate_bucket(&self) -> String {
        format!("{}_rates", self.prefix.replace('.', "_"))
    }

    /// Where the dispatcher publishes each decision for the durable decision log (the same
    /// record as the tap), when the log is on.
    pub fn decision_log(&self, event: &str) -> String {
        format!("{}.log.{event}", self.prefix)
    }
    pub fn decision_log_wildcard(&self) -> String {
        format!("{}.log.>", self.prefix)
    }
    /// At the hub of a fleet: where a site's decision records are kept once sourced (`*` for
    /// every site), under the hub's prefix.
    pub fn site_decision_log_wildcard(&self, site: &str) -> String {
        format!("{}.site.{site}.log.>", self.prefix)
    }
    /// The site a record of [`Self::site_decision_log_wildcard`] came from.
    pub fn site_of_decision_log<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(&self.prefix)?
            .strip_prefix(".site.")?
            .split('.')
            .next()
    }
    /// The JetStream stream that keeps the decision log, bounded by age and size.
    pub fn decisions_stream(&self) -> String {
        format!("{}_decisions", self.prefix.replace('.', "_"))
    }

    /// The object store of WebAssembly agent modules: one object per kind, named by it.
    pub fn modules_bucket(&self) -> String {
        format!("{}_modules", self.prefix.replace('.', "_"))
    }

    /// Where the dispatcher asks a wasm host whether a module would load, before storing it.
    /// `_wasm` can be no kind's name, so no agent's subjects overlap it.
    pub fn wasm_check(&self) -> String {
        format!("{}.agent.{WASM_TOKEN}.check", self.prefix)
    }
}

/// Where every reply of the engine goes: an inbox (`_INBOX.` and at least one more token).
pub const INBOX_PREFIX: &str = "_INBOX.";

/// Longest reply subject a responder answers: an inbox of the engine is about 80 bytes
/// (`_INBOX.<prefix>.<role>.<22>.<22>`); anything much longer is not one.
pub const MAX_REPLY_LEN: usize = 256;

/// Whether `reply` is an inbox a responder may answer to. A requester chooses its reply
/// subject freely, and a responder publishes there with its own rights: a reply aimed at a
/// bucket's key (`$KV.…`), an object (`$O.…`) or the JetStream API (`$JS.API.…`) would make the
/// responder write for the requester. Every responder of the engine answers only inboxes, and
/// refuses (and logs) a request with any other reply subject; the secured bus also lets each
/// role publish only on the inboxes of the roles that may ask it (`bus::roles`).
pub fn is_inbox(reply: &str) -> bool {
    reply.len() <= MAX_REPLY_LEN
        && reply.strip_prefix(INBOX_PREFIX).is_some_and(|rest| {
            !rest.is_empty()
                && rest.split('.').all(|t| {
                    !t.is_empty()
                        && t.bytes()
                            .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
                })
        })
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects {
            prefix: "policy".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_inboxes_are_replies() {
        for ok in ["_INBOX.policy.gateway.abc.1", "_INBOX.x"] {
            assert!(is_inbox(ok), "{ok}");
        }
        for bad in [
            "$KV.policy_config.sub.new-connection.acl",
            "$JS.API.STREAM.DELETE.KV_policy_config",
            "$O.policy_modules.M.geo",
            "policy.admin.policy-remove",
            "_INBOX.",
            "_INBOX",
            "_INBOX..x",
            "_INBOX.a.>",
            "_INBOX.a.*",
            "_INBOX.a b",
            "_inbox.a",
        ] {
            assert!(!is_inbox(bad), "{bad}");
        }
        assert!(!is_inbox(&format!("_INBOX.{}", "a".repeat(MAX_REPLY_LEN))));
    }

    #[test]
    fn subjects_follow_the_design() {
        let s = Subjects::default();
        let acl = Kind::new("acl").unwrap();
        assert_eq!(s.event("new-connection"), "policy.event.new-connection");
        assert_eq!(
            s.agent(&acl, "new-connection"),
            "policy.agent.acl.new-connection"
        );
        assert_eq!(s.agent_wildcard(&acl), "policy.agent.acl.>");
        assert_eq!(s.admin(AdminCommand::PolicyAdd), "policy.admin.policy-add");
        assert_eq!(s.tap("expose-service"), "policy.tap.expose-service");
        assert_eq!(s.config_bucket(), "policy_config");
        assert_eq!(Subjects::new("a.b").unwrap().config_bucket(), "a_b_config");
    }

    #[test]
    fn subjects_round_trip_their_tokens() {
        let s = Subjects::new("team-1.pb").unwrap();
        let lb = Kind::new("lb").unwrap();
        assert_eq!(s.event_of(&s.event("x-y")), Some("x-y"));
        assert_eq!(s.agent_op_of(&lb, &s.agent(&lb, "e")), Some("e"));
        assert_eq!(
            s.agent_op_of(&lb, &s.agent_validate(&lb)),
            Some(VALIDATE_TOKEN)
        );
        assert_eq!(
            s.admin_of(&s.admin(AdminCommand::Subscribe)),
            Some("subscribe")
        );
        for c in AdminCommand::ALL {
            assert_eq!(AdminCommand::parse(c.as_str()), Some(c));
        }
    }

    #[test]
    fn typos_get_a_suggestion() {
        assert_eq!(did_you_mean("acll", SHIPPED_KINDS), Some("acl"));
        assert_eq!(did_you_mean("conn-limt", SHIPPED_KINDS), Some("conn-limit"));
        assert_eq!(
            did_you_mean("new-conection", crate::event::CONTRACT_EVENTS),
            Some("new-connection")
        );
        assert_eq!(did_you_mean("billing", SHIPPED_KINDS), None);
    }

    #[test]
    fn names_are_validated() {
        assert!(Kind::new("conn-limit").is_ok());
        for bad in ["", "Acl", "a.b", "a--b", "-a", "a-", "a b", "_validate"] {
            assert!(Kind::new(bad).is_err(), "{bad:?} accepted");
            assert!(check_event(bad).is_err(), "{bad:?} accepted");
        }
        for bad in ["", "a..b", "a.*", "a.>", "a b"] {
            assert!(Subjects::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
