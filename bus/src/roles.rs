//! Who may do what on the bus (docs/security.md): one role per process kind, each with the
//! least NATS permissions it needs. `policyctl auth` renders these as a nats-server
//! configuration (`crate::accounts` lays out its accounts).
//!
//! A role has up to two identities. Its *messaging* identity, in the account `POLICY` with
//! every other role's, sends and serves requests; every process connects with its role's
//! inbox prefix, and a role may publish on the inboxes of the roles that may ask it and on no
//! other (no `allow_responses`: that would let the asker choose where the answer goes). Its
//! *store* identity, alone in an account of its own, reaches the JetStream stores the role
//! reads or owns (`crate::store`), and nothing else.
//!
//! Nothing grants `STREAM.DELETE`: no credential of the engine can remove a store. An owner
//! may update its key-value stream (to put back its routing, `crate::streams::repair`); conn-limit
//! may update its slot streams (their limits follow its policies) and delete a message of them
//! (a released slot). The one `STREAM.PURGE` is the dispatcher's, on the modules object store
//! alone: replacing or removing a module purges its old chunks.

use std::fmt;

use crate::headers;
use crate::store::{store_api_prefix, Store};
use crate::subject::{Kind, Subjects, SHIPPED_KINDS};

/// How a role uses a store: reading it, or owning it (creating and writing it, and reading).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Read,
    Own,
}

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

    /// Where the role's replies arrive: `_INBOX.<prefix>.<role>`. Only the role may read it.
    pub fn inbox_prefix(&self, subjects: &Subjects) -> String {
        format!("_INBOX.{}.{}", subjects.prefix(), self.name())
    }

    /// Where its store identity's replies and consumer deliveries arrive.
    pub fn store_inbox_prefix(&self, subjects: &Subjects) -> String {
        format!("{}.store", self.inbox_prefix(subjects))
    }

    /// The roles that send this one requests, and so the only inboxes it may publish on.
    pub fn askers(&self) -> Vec<Role> {
        match self {
            // Events; admin commands and service pings; other dispatchers' confirmations.
            Role::Dispatcher => vec![Role::Gateway, Role::Operator, Role::Dispatcher],
            // The dispatcher's calls and checks; the operator's service pings.
            Role::Monitor | Role::WasmHost | Role::Agent(_) => {
                vec![Role::Dispatcher, Role::Operator]
            }
            // `policyctl bench`'s echo answers the gateway's own requests.
            Role::Gateway => vec![Role::Gateway],
            Role::Operator => Vec::new(),
        }
    }

    /// The stores the role reaches, and how.
    pub fn stores(&self) -> Vec<(Store, Use)> {
        match self {
            Role::Operator => vec![(Store::Log, Use::Read)],
            Role::Gateway => Vec::new(),
            Role::Dispatcher => vec![
                (Store::Config, Use::Own),
                (Store::Modules, Use::Own),
                (Store::Log, Use::Own),
                (Store::Sites, Use::Own),
            ],
            Role::Monitor => vec![(Store::Config, Use::Read)],
            Role::WasmHost => vec![(Store::Config, Use::Read), (Store::Modules, Use::Read)],
            Role::Agent(k) => {
                let mut stores = vec![(Store::Config, Use::Read)];
                match k.as_str() {
                    "conn-limit" => stores.push((Store::Conns, Use::Own)),
                    "rate-limit" => stores.push((Store::Rates, Use::Own)),
                    _ => {}
                }
                stores
            }
        }
    }

    /// The account its store identity lives in, alone: `POLICY_AS_<ROLE>`; none for a role
    /// that uses no store.
    pub fn store_account(&self) -> Option<String> {
        (!self.stores().is_empty())
            .then(|| format!("POLICY_AS_{}", self.name().to_uppercase().replace('-', "_")))
    }

    /// What its store identity may publish and subscribe to in its account: the store paths
    /// it imports there, no more.
    pub fn store_permissions(&self, s: &Subjects) -> Permissions {
        let mut p = Permissions::default();
        for (store, how) in self.stores() {
            let api = store_api_prefix(store, s);
            p.publish.extend(
                store
                    .read_api(s)
                    .into_iter()
                    .map(|(a, _)| format!("{api}.{a}")),
            );
            p.publish.push(store.flow_control(s));
            if how == Use::Own {
                p.publish
                    .extend(store.own_api(s).into_iter().map(|a| format!("{api}.{a}")));
                p.publish.extend(store.write_permissions(s));
                p.publish
                    .extend(store.other_domain_reads(s).into_iter().map(|(_, l)| l));
            }
        }
        if !p.publish.is_empty() {
            p.subscribe
                .push(format!("{}.>", self.store_inbox_prefix(s)));
        }
        p
    }

    /// [`Self::permissions`], knowing every role on the bus: the wasm host is also denied the
    /// subjects and services of every native kind with a role of its own (`policyctl auth
    /// add-agent`), so it can neither serve, read nor answer for one; a module cannot take a
    /// native kind's name.
    pub fn permissions_among(&self, s: &Subjects, roles: &[Role]) -> Permissions {
        let mut p = self.permissions(s);
        if *self == Role::WasmHost {
            for role in roles {
                if let Role::Agent(kind) = role {
                    if !SHIPPED_KINDS.contains(&kind.as_str()) {
                        p.deny_subscribe.push(s.agent_wildcard(kind));
                        p.deny_subscribe
                            .extend(service(&headers::agent_service(kind)).into_iter().skip(1));
                    }
                }
            }
        }
        p
    }

    /// What its messaging identity may publish and subscribe to. Subscribe entries may name a
    /// queue group (`subject group`), which nats-server then requires.
    pub fn permissions(&self, s: &Subjects) -> Permissions {
        let mut p = Permissions::default();
        p.subscribe.push(format!("{}.>", self.inbox_prefix(s)));
        // Answers go to the inboxes of the roles that ask, and nowhere else.
        p.publish.extend(
            self.askers()
                .iter()
                .map(|asker| format!("{}.>", asker.inbox_prefix(s))),
        );
        match self {
            Role::Operator => {
                p.publish.push(s.admin_wildcard());
                for verb in ["PING", "INFO", "STATS"] {
                    p.publish.push(format!("$SRV.{verb}"));
                    p.publish.push(format!("$SRV.{verb}.>"));
                }
                p.subscribe.push(s.tap_wildcard());
            }
            Role::Gateway => {
                p.publish.push(s.events_wildcard());
                // `policyctl bench`'s private echo, the floor it measures the engine against.
                p.publish.push(s.bench_wildcard());
                p.subscribe.push(s.bench_wildcard());
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
            }
            Role::Monitor | Role::Agent(_) => {
                let kind = match self {
                    Role::Agent(k) => k.clone(),
                    _ => Kind::new("monitor").expect("a valid kind"),
                };
                p.subscribe
                    .push(format!("{} {kind}", s.agent_wildcard(&kind)));
                p.subscribe.extend(service(&headers::agent_service(&kind)));
                if kind.as_str() == "monitor" {
                    p.subscribe.push(s.tap_wildcard());
                }
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

#[cfg(test)]
#[path = "roles_tests.rs"]
mod tests;
