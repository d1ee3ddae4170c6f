//! Who may do what on the bus (DESIGN.md, "Who may do what"): one role per process kind, each
//! with the least NATS permissions it needs. `policyctl auth` renders these as a nats-server
//! configuration; every process connects with its role's inbox prefix so that its replies
//! (decisions, JetStream answers) are readable by that role alone.
//!
//! The JetStream API subjects are NATS's own; which of them a role may use was worked out from
//! what async-nats sends for each key-value operation the engine performs:
//!
//! | operation | subjects |
//! | --- | --- |
//! | open a bucket | `$JS.API.STREAM.INFO.KV_<b>` |
//! | create a bucket | `$JS.API.INFO`, `$JS.API.STREAM.CREATE.KV_<b>` |
//! | get, entry | `$JS.API.DIRECT.GET.KV_<b>.$KV.<b>.<key>` (`$JS.API.STREAM.MSG.GET.KV_<b>` without direct gets) |
//! | keys, watch | `$JS.API.CONSUMER.CREATE.KV_<b>[.<name>.<filter>]`, `$JS.API.CONSUMER.DELETE.KV_<b>.<name>` (an ordered consumer, delivered to the caller's inbox) |
//! | put, create, update, delete | publish `$KV.<b>.<key>` (the acknowledgement comes to the inbox) |
//!
//! Nothing grants `STREAM.UPDATE`, `STREAM.DELETE` or `STREAM.MSG.DELETE`: no process of the
//! engine needs them, so no credential of the engine can wipe a bucket. The one `STREAM.PURGE`
//! is the dispatcher's, on the modules object store alone: replacing or removing a module
//! purges its old chunks.

use std::fmt;

use crate::headers;
use crate::subject::{Kind, Subjects, SHIPPED_KINDS};

/// A process kind's identity on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// `policyctl`: admin commands, the tap, service pings.
    Operator,
    /// A gateway hookpoint: sends events and nothing else.
    Gateway,
    /// `policy-dispatcher`: serves events and admin, calls agents, writes the config bucket.
    Dispatcher,
    /// `policy-agent monitor`: reads the tap (and is the `monitor` agent kind).
    Monitor,
    /// `policy-agent wasm`: serves the kinds deployed as WebAssembly modules, whichever they
    /// are, but never a shipped kind's subjects.
    WasmHost,
    /// `policy-agent <kind>`, shipped or third-party.
    Agent(Kind),
}

impl Role {
    /// The role a `policy-agent <kind>` runs as.
    pub fn of_kind(kind: &Kind) -> Role {
        if kind.as_str() == "monitor" {
            Role::Monitor
        } else {
            Role::Agent(kind.clone())
        }
    }

    /// The roles of the shipped engine, in the order their files are written.
    pub fn shipped() -> Vec<Role> {
        let mut roles = vec![
            Role::Operator,
            Role::Gateway,
            Role::Dispatcher,
            Role::Monitor,
            Role::WasmHost,
        ];
        roles.extend(
            SHIPPED_KINDS
                .iter()
                .filter(|k| **k != "monitor")
                .filter_map(|k| Kind::new(k).ok())
                .map(Role::Agent),
        );
        roles
    }

    /// `operator`, `gateway`, `dispatcher`, `monitor`, `agent-<kind>`: the name of its files
    /// (`<name>.nk`) and of its user in the server configuration.
    pub fn name(&self) -> String {
        match self {
            Role::Operator => "operator".into(),
            Role::Gateway => "gateway".into(),
            Role::Dispatcher => "dispatcher".into(),
            Role::Monitor => "monitor".into(),
            Role::WasmHost => "wasm-host".into(),
            Role::Agent(k) => format!("agent-{k}"),
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "operator" => Some(Role::Operator),
            "gateway" => Some(Role::Gateway),
            "dispatcher" => Some(Role::Dispatcher),
            "monitor" => Some(Role::Monitor),
            "wasm-host" => Some(Role::WasmHost),
            other => Kind::new(other.strip_prefix("agent-")?)
                .ok()
                .map(|k| Role::of_kind(&k)),
        }
    }

    /// Where this role's replies arrive: `_INBOX.<prefix>.<role>`. Only the role may read it.
    pub fn inbox_prefix(&self, subjects: &Subjects) -> String {
        format!("_INBOX.{}.{}", subjects.prefix(), self.name())
    }

    /// What the role may publish and subscribe to. Subscribe entries may name a queue group
    /// (`subject group`), which nats-server then requires.
    pub fn permissions(&self, s: &Subjects) -> Permissions {
        let mut p = Permissions::default();
        p.subscribe.push(format!("{}.>", self.inbox_prefix(s)));
        match self {
            Role::Operator => {
                p.publish.push(s.admin_wildcard());
                for verb in ["PING", "INFO", "STATS"] {
                    p.publish.push(format!("$SRV.{verb}"));
                    p.publish.push(format!("$SRV.{verb}.>"));
                }
                p.subscribe.push(s.tap_wildcard());
                // `policyctl log`: an ordered pull consumer on the decision log.
                let stream = s.decisions_stream();
                p.publish.extend(read_stream(&stream));
                p.publish
                    .push(format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"));
            }
            Role::Gateway => {
                p.publish.push(s.events_wildcard());
                // `policyctl bench`'s private echo, the floor it measures the engine against.
                p.publish.push(s.bench_wildcard());
                p.subscribe.push(s.bench_wildcard());
                p.allow_responses = true;
            }
            Role::Dispatcher => {
                p.subscribe
                    .push(format!("{} dispatcher", s.events_wildcard()));
                p.subscribe
                    .push(format!("{} dispatcher", s.admin_wildcard()));
                p.subscribe.extend(service(headers::DISPATCHER_SERVICE));
                // Policy changes confirmed by every dispatcher (the verdict cache).
                p.subscribe.push(s.dispatchers_seen());
                p.publish.push(s.dispatchers_seen());
                p.publish.push(s.agents_wildcard());
                p.publish.push(s.tap_wildcard());
                // `subscribe` checks that a kind has a live instance.
                p.publish.push("$SRV.PING.>".into());
                p.publish.extend(write_bucket(&s.config_bucket()));
                p.publish.extend(write_modules(&s.modules_bucket()));
                // The decision log: create its stream, publish its records.
                let stream = s.decisions_stream();
                p.publish.push(format!("$JS.API.STREAM.INFO.{stream}"));
                p.publish.push(format!("$JS.API.STREAM.CREATE.{stream}"));
                p.publish.push(s.decision_log_wildcard());
                p.allow_responses = true;
            }
            Role::WasmHost => {
                // Any kind's queue group, as modules are deployed at run time; never a shipped
                // kind's subjects or services (the deny list wins over the allow list).
                p.subscribe.push(s.agents_wildcard());
                p.subscribe.extend(service("*"));
                for kind in SHIPPED_KINDS.iter().filter_map(|k| Kind::new(k).ok()) {
                    p.deny_subscribe.push(s.agent_wildcard(&kind));
                    p.deny_subscribe
                        .extend(service(&headers::agent_service(&kind)).into_iter().skip(1));
                }
                p.deny_subscribe
                    .extend(service(headers::DISPATCHER_SERVICE).into_iter().skip(1));
                p.publish.extend(read_bucket(&s.config_bucket()));
                p.publish
                    .extend(read_stream(&format!("OBJ_{}", s.modules_bucket())));
                p.allow_responses = true;
            }
            Role::Monitor | Role::Agent(_) => {
                let kind = match self {
                    Role::Agent(k) => k.clone(),
                    _ => Kind::new("monitor").expect("a valid kind"),
                };
                p.subscribe
                    .push(format!("{} {kind}", s.agent_wildcard(&kind)));
                p.subscribe.extend(service(&headers::agent_service(&kind)));
                p.publish.extend(read_bucket(&s.config_bucket()));
                match kind.as_str() {
                    "monitor" => p.subscribe.push(s.tap_wildcard()),
                    "conn-limit" => p.publish.extend(write_bucket(&s.conn_bucket())),
                    "rate-limit" => p.publish.extend(write_bucket(&s.rate_bucket())),
                    _ => {}
                }
                p.allow_responses = true;
            }
        }
        p
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A role's NATS permissions: allow lists, everything else denied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May answer requests it received (an agent's verdict, the dispatcher's decision),
    /// without any right to publish on the requester's inbox otherwise.
    pub allow_responses: bool,
    /// Subjects denied for subscribing although an allow entry matches them.
    pub deny_subscribe: Vec<String>,
}

/// The NATS services API subscriptions of one service (`$SRV.<verb>[.<name>[.<id>]]`).
fn service(name: &str) -> Vec<String> {
    vec![
        "$SRV.*".into(),
        format!("$SRV.*.{name}"),
        format!("$SRV.*.{name}.*"),
    ]
}

/// Reading a key-value bucket: open it, get keys, watch it.
fn read_bucket(bucket: &str) -> Vec<String> {
    read_stream(&format!("KV_{bucket}"))
}

/// Reading a key-value bucket's or an object store's stream: open it, get, watch.
fn read_stream(stream: &str) -> Vec<String> {
    vec![
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
        format!("$JS.API.CONSUMER.DELETE.{stream}.*"),
        format!("$JS.API.CONSUMER.INFO.{stream}.*"),
        format!("$JS.API.DIRECT.GET.{stream}"),
        format!("$JS.API.DIRECT.GET.{stream}.>"),
        format!("$JS.API.STREAM.MSG.GET.{stream}"),
    ]
}

/// Owning a key-value bucket: read it, create it, write its keys. Never update, purge or
/// delete the stream itself.
fn write_bucket(bucket: &str) -> Vec<String> {
    let mut subjects = read_bucket(bucket);
    subjects.extend([
        "$JS.API.INFO".into(),
        format!("$JS.API.STREAM.CREATE.KV_{bucket}"),
        format!("$KV.{bucket}.>"),
    ]);
    subjects
}

/// Owning the modules object store: read it, create it, write objects. Replacing or deleting
/// an object purges its old chunks (`STREAM.PURGE` with a subject filter), so this stream, and
/// only this one, may be purged.
fn write_modules(bucket: &str) -> Vec<String> {
    let stream = format!("OBJ_{bucket}");
    let mut subjects = read_stream(&stream);
    subjects.extend([
        format!("$JS.API.STREAM.CREATE.{stream}"),
        format!("$JS.API.STREAM.PURGE.{stream}"),
        format!("$O.{bucket}.>"),
    ]);
    subjects
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms(role: &str) -> Permissions {
        Role::parse(role)
            .expect("role")
            .permissions(&Subjects::default())
    }

    #[test]
    fn role_names_round_trip() {
        for r in Role::shipped() {
            assert_eq!(Role::parse(&r.name()), Some(r));
        }
        assert_eq!(
            Role::parse("agent-geo"),
            Some(Role::Agent(Kind::new("geo").unwrap()))
        );
        assert_eq!(Role::parse("agent-monitor"), Some(Role::Monitor));
        assert_eq!(Role::parse("agent-"), None);
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn only_the_dispatcher_writes_the_config_bucket() {
        for r in Role::shipped() {
            let p = r.permissions(&Subjects::default());
            let writes = p.publish.iter().any(|s| s.starts_with("$KV.policy_config"));
            assert_eq!(writes, r == Role::Dispatcher, "{r}");
        }
        assert!(perms("agent-conn-limit")
            .publish
            .contains(&"$KV.policy_conns.>".to_string()));
        assert!(!perms("agent-acl")
            .publish
            .iter()
            .any(|s| s.starts_with("$KV.")));
    }

    #[test]
    fn agents_serve_their_own_queue_group_only_and_the_gateway_only_sends_events() {
        let acl = perms("agent-acl");
        assert!(acl
            .subscribe
            .contains(&"policy.agent.acl.> acl".to_string()));
        assert!(!acl.subscribe.iter().any(|s| s.contains("agent.lb")));
        assert!(!acl.publish.iter().any(|s| s.starts_with("policy.")));
        let gw = perms("gateway");
        assert!(gw.publish.contains(&"policy.event.>".to_string()));
        assert!(!gw
            .publish
            .iter()
            .any(|s| s.contains(".admin.") || s.contains(".tap.") || s.contains(".agent.")));
        assert!(!gw.subscribe.iter().any(|s| s.contains("tap")));
        // The wasm host serves any kind but the shipped ones.
        let host = perms("wasm-host");
        assert!(host.subscribe.contains(&"policy.agent.>".to_string()));
        assert!(host
            .deny_subscribe
            .contains(&"policy.agent.acl.>".to_string()));
        assert!(host
            .deny_subscribe
            .contains(&"$SRV.*.policy-dispatcher".to_string()));
        assert!(!host
            .publish
            .iter()
            .any(|s| s.starts_with("$KV.") || s.starts_with("$O.")));
        // Only the dispatcher publishes on the tap.
        for r in Role::shipped() {
            let p = r.permissions(&Subjects::default());
            let taps = p.publish.iter().any(|s| s.contains(".tap."));
            assert_eq!(taps, r == Role::Dispatcher, "{r}");
        }
    }

    #[test]
    fn inboxes_are_per_role_and_per_engine() {
        let s = Subjects::new("team.pb").unwrap();
        assert_eq!(Role::Gateway.inbox_prefix(&s), "_INBOX.team.pb.gateway");
        assert!(Role::Gateway
            .permissions(&s)
            .subscribe
            .contains(&"_INBOX.team.pb.gateway.>".to_string()));
    }
}
