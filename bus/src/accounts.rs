//! The accounts of the secured bus, as data: `policyctl auth` renders them as a nats-server
//! configuration. Why accounts at all is in `crate::store`; in short, messaging and storage
//! never share one, no two stores share one, and each role's store identity has one of its own.
//!
//! | account | holds | imports |
//! | --- | --- | --- |
//! | `POLICY` | every role's messaging identity | nothing |
//! | `POLICY_STORE_<STORE>` | one stream, within [`Limits`] | nothing (exports only) |
//! | `POLICY_AS_<ROLE>` | that role's store identity | exactly the store paths the role uses |

use crate::roles::{Role, Use};
use crate::store::{store_api_prefix, Limits, Store};
use crate::subject::Subjects;

/// The account of every role's messaging identity.
pub const MESSAGING: &str = "POLICY";

/// One account of the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    /// A line on what it is for, as a comment in the rendered configuration.
    pub about: String,
    /// JetStream enabled, within these limits; `None`: no JetStream.
    pub jetstream: Option<Limits>,
    pub exports: Vec<Export>,
    pub imports: Vec<Import>,
    /// Whose identities log in here: the role, and whether it is its store identity.
    pub users: Vec<(Role, bool)>,
}

/// Something an account offers, to the named accounts only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub subject: String,
    pub service: bool,
    /// A service one request of which may get several answers (a pull, a batched get).
    pub streamed: bool,
    pub to: Vec<String>,
}

/// Something an account takes from another, under `local` in its own subject space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    pub service: bool,
    pub account: String,
    pub subject: String,
    pub local: String,
}

/// Every account for `roles`: the messaging account, the stores that some role uses, and an
/// identity account per role that uses a store.
pub fn layout(s: &Subjects, roles: &[Role]) -> Vec<Account> {
    let mut accounts = vec![Account {
        name: MESSAGING.into(),
        about: "every role's messaging identity: events, admin, agents, the tap, services".into(),
        jetstream: None,
        exports: Vec::new(),
        imports: Vec::new(),
        users: roles.iter().map(|r| (r.clone(), false)).collect(),
    }];
    for store in Store::ALL {
        let users: Vec<(&Role, Use)> = roles
            .iter()
            .flat_map(|r| {
                r.stores()
                    .into_iter()
                    .filter(move |(st, _)| *st == store)
                    .map(move |(_, how)| (r, how))
            })
            .collect();
        if users.is_empty() {
            continue;
        }
        let all: Vec<String> = users
            .iter()
            .filter_map(|(r, _)| r.store_account())
            .collect();
        let owners: Vec<String> = users
            .iter()
            .filter(|(_, how)| *how == Use::Own)
            .filter_map(|(r, _)| r.store_account())
            .collect();
        let mut exports: Vec<Export> = store
            .read_api(s)
            .into_iter()
            .map(|(a, streamed)| Export {
                subject: format!("$JS.API.{a}"),
                service: true,
                streamed,
                to: all.clone(),
            })
            .collect();
        exports.push(Export {
            subject: store.flow_control(s),
            service: true,
            streamed: false,
            to: all.clone(),
        });
        // Push consumers deliver to the inbox of the store identity that created them.
        exports.push(Export {
            subject: format!("_INBOX.{}.*.store.>", s.prefix()),
            service: false,
            streamed: false,
            to: all.clone(),
        });
        if !owners.is_empty() {
            exports.extend(
                store
                    .other_domain_reads(s)
                    .into_iter()
                    .map(|(subject, _)| Export {
                        subject,
                        service: true,
                        streamed: true,
                        to: owners.clone(),
                    }),
            );
            exports.extend(store.own_api(s).into_iter().map(|a| Export {
                subject: format!("$JS.API.{a}"),
                service: true,
                streamed: false,
                to: owners.clone(),
            }));
            exports.extend(
                store
                    .write_subjects(s)
                    .into_iter()
                    .map(|(subject, _)| Export {
                        subject,
                        service: true,
                        streamed: false,
                        to: owners.clone(),
                    }),
            );
        }
        accounts.push(Account {
            name: store.account().into(),
            about: format!("{}: its stream alone, no users", store.describe()),
            jetstream: Some(store.limits()),
            exports,
            imports: Vec::new(),
            users: Vec::new(),
        });
    }
    for role in roles {
        let Some(name) = role.store_account() else {
            continue;
        };
        let mut imports = Vec::new();
        for (store, how) in role.stores() {
            let from = store.account().to_string();
            let service = |subject: String, local: String| Import {
                service: true,
                account: from.clone(),
                subject,
                local,
            };
            let mut calls: Vec<String> = store.read_api(s).into_iter().map(|(a, _)| a).collect();
            if how == Use::Own {
                calls.extend(store.own_api(s));
            }
            imports.extend(calls.into_iter().map(|a| {
                let api = store_api_prefix(store, s);
                service(format!("$JS.API.{a}"), format!("{api}.{a}"))
            }));
            imports.push(service(store.flow_control(s), store.flow_control(s)));
            if how == Use::Own {
                imports.extend(
                    store
                        .write_subjects(s)
                        .into_iter()
                        .chain(store.other_domain_reads(s))
                        .map(|(subject, local)| service(subject, local)),
                );
            }
            let inbox = format!("{}.>", role.store_inbox_prefix(s));
            imports.push(Import {
                service: false,
                account: from,
                subject: inbox.clone(),
                local: inbox,
            });
        }
        let uses: Vec<String> = role
            .stores()
            .iter()
            .map(|(st, how)| {
                let verb = if *how == Use::Own { "owns" } else { "reads" };
                format!("{verb} {}", st.describe())
            })
            .collect();
        accounts.push(Account {
            name,
            about: format!("{role}'s store identity, alone: {}", uses.join("; ")),
            jetstream: None,
            exports: Vec::new(),
            imports,
            users: vec![(role.clone(), true)],
        });
    }
    accounts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(accounts: &'a [Account], name: &str) -> &'a Account {
        accounts
            .iter()
            .find(|a| a.name == name)
            .unwrap_or_else(|| panic!("no account {name}"))
    }

    #[test]
    fn stores_are_alone_and_only_their_owner_may_write_them() {
        let s = Subjects::default();
        let accounts = layout(&s, &Role::shipped());
        let mut names: Vec<&str> = accounts.iter().map(|a| a.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), accounts.len(), "account names repeat");
        // Messaging has no JetStream and imports nothing.
        let messaging = find(&accounts, MESSAGING);
        assert!(messaging.jetstream.is_none() && messaging.imports.is_empty());
        assert_eq!(messaging.users.len(), Role::shipped().len());
        for store in Store::ALL {
            let account = find(&accounts, store.account());
            assert!(account.users.is_empty() && account.imports.is_empty());
            assert_eq!(account.jetstream, Some(store.limits()));
            for e in &account.exports {
                let writes = e.subject.starts_with("$KV.")
                    || e.subject.starts_with("$O.")
                    || e.subject.starts_with("policy.log.")
                    || e.subject.contains("STREAM.CREATE")
                    || e.subject.contains("STREAM.PURGE");
                if writes {
                    let owner = match store {
                        Store::Config | Store::Modules | Store::Log | Store::Sites => {
                            "POLICY_AS_DISPATCHER"
                        }
                        Store::Conns => "POLICY_AS_AGENT_CONN_LIMIT",
                        Store::Rates => "POLICY_AS_AGENT_RATE_LIMIT",
                    };
                    assert_eq!(e.to, [owner], "{}", e.subject);
                }
                assert!(!e.to.iter().any(|a| a == MESSAGING), "{}", e.subject);
            }
        }
        // The config is read by everyone but the gateway, each from its own account.
        let config = find(&accounts, Store::Config.account());
        let info = config
            .exports
            .iter()
            .find(|e| e.subject == "$JS.API.STREAM.INFO.KV_policy_config")
            .expect("info export");
        assert!(info.to.contains(&"POLICY_AS_AGENT_ACL".to_string()));
        assert!(!info.to.contains(&"POLICY_AS_OPERATOR".to_string()));
    }

    /// Whether two subjects (with wildcards) can match a same subject.
    fn overlap(a: &str, b: &str) -> bool {
        let (a, b): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
        for i in 0..a.len().max(b.len()) {
            match (a.get(i), b.get(i)) {
                // `>` takes one token at least.
                (None, _) | (_, None) => return false,
                (Some(&">"), _) | (_, Some(&">")) => return true,
                (Some(x), Some(y)) if x == y || *x == "*" || *y == "*" => {}
                _ => return false,
            }
        }
        true
    }

    #[test]
    fn no_account_imports_two_services_one_subject_could_take() {
        assert!(overlap("a.*.c", "a.b.c") && overlap("a.>", "a.b.c") && !overlap("a.*", "a.b.c"));
        assert!(!overlap("a.b", "a.b.>") && overlap("a.*", "a.b"));
        let accounts = layout(&Subjects::default(), &Role::shipped());
        for account in &accounts {
            // Service imports: a request must have one importer to go to. (The store inboxes
            // are stream imports from every store, the same subject on purpose.)
            let services: Vec<&Import> = account.imports.iter().filter(|i| i.service).collect();
            for (i, x) in services.iter().enumerate() {
                for y in &services[i + 1..] {
                    assert!(
                        !overlap(&x.local, &y.local),
                        "{}: {} and {} overlap (nats-server 2.10 refuses such an account in operator mode)",
                        account.name,
                        x.local,
                        y.local
                    );
                }
            }
        }
    }

    #[test]
    fn a_store_identity_imports_what_its_role_uses_under_the_api_prefix() {
        let s = Subjects::default();
        let accounts = layout(&s, &Role::shipped());
        let acl = find(&accounts, "POLICY_AS_AGENT_ACL");
        assert_eq!(acl.users, [(Role::parse("agent-acl").unwrap(), true)]);
        assert!(acl
            .imports
            .iter()
            .all(|i| i.account == "POLICY_STORE_CONFIG"));
        assert!(acl
            .imports
            .iter()
            .any(|i| i.subject == "$JS.API.DIRECT.GET.KV_policy_config.>"
                && i.local == "policy._js.API.DIRECT.GET.KV_policy_config.>"));
        assert!(acl
            .imports
            .iter()
            .any(|i| !i.service && i.local == "_INBOX.policy.agent-acl.store.>"));
        assert!(!acl.imports.iter().any(|i| i.subject.starts_with("$KV.")));
        let dispatcher = find(&accounts, "POLICY_AS_DISPATCHER");
        assert!(dispatcher
            .imports
            .iter()
            .any(|i| i.subject == "$KV.policy_config.>"
                && i.local == "policy._js.API.$KV.policy_config.>"));
        assert!(dispatcher
            .imports
            .iter()
            .any(|i| i.subject == "policy.log.>" && i.account == "POLICY_STORE_LOG"));
        // The gateway uses no store, so it has no store identity.
        assert!(!accounts.iter().any(|a| a.name == "POLICY_AS_GATEWAY"));
    }
}
