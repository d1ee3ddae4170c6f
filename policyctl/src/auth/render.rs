//! Rendering the accounts of `bus::accounts`, with every identity's user and permissions, as
//! the nats-server configuration `accounts.conf` (and as the template for operators who run
//! their own NATS).

use std::fmt::Write as _;

use bus::accounts::{self, Account, Export, Import};
use bus::leaf::Link;
use bus::roles::{Permissions, Role};
use bus::store::Store;
use bus::Subjects;

use super::User;

/// What each identity is for, as a comment above its user.
fn purpose(role: &Role, store: bool) -> String {
    if store {
        return format!("{role}'s store identity");
    }
    match role {
        Role::Operator => "policyctl: admin commands, reading the tap, service pings".into(),
        Role::Gateway => "gateway hookpoints: send events (and policyctl emit/bench)".into(),
        Role::Dispatcher => {
            "policy-dispatcher: serve events and admin, call agents, publish the tap".into()
        }
        Role::Monitor => "policy-agent monitor: read the tap".into(),
        Role::WasmHost => {
            "policy-agent wasm: serve deployed WebAssembly kinds (never a shipped kind)".into()
        }
        Role::Agent(k) => format!("policy-agent {k}: its own queue group"),
    }
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

fn render_permissions(out: &mut String, p: &Permissions) {
    let _ = writeln!(out, "          permissions: {{");
    let _ = writeln!(
        out,
        "            publish: {{ allow: {} }}",
        list(&p.publish)
    );
    if p.deny_subscribe.is_empty() {
        let _ = writeln!(
            out,
            "            subscribe: {{ allow: {} }}",
            list(&p.subscribe)
        );
    } else {
        let _ = writeln!(
            out,
            "            subscribe: {{ allow: {}, deny: {} }}",
            list(&p.subscribe),
            list(&p.deny_subscribe)
        );
    }
    let _ = writeln!(out, "          }}");
}

/// A site's leaf identity at its fleet's hub (`bus::leaf`): the user, in the hub's account of
/// the link, that the site's leaf connection logs in as.
#[derive(Debug, Clone)]
pub struct LeafUser {
    pub site: String,
    pub link: Link,
    pub nkey: String,
    pub permissions: Permissions,
}

/// A hub's accounts for its sites' `config` links (`bus::leaf::site_account`): each imports
/// from the hub's config account what that site's source uses, which the config account
/// exports to it (to the site's account alone, for its deliveries).
fn with_site_accounts(
    subjects: &Subjects,
    mut accounts: Vec<Account>,
    leaves: &[LeafUser],
) -> Vec<Account> {
    let Some(sites_subjects) = bus::fleet::sites_of(subjects) else {
        return accounts;
    };
    let config = Store::Config.account();
    for leaf in leaves.iter().filter(|l| l.link == Link::Config) {
        let name = bus::leaf::site_account(&leaf.site);
        let imports = bus::leaf::site_account_imports(&sites_subjects, &leaf.site);
        if let Some(store) = accounts.iter_mut().find(|a| a.name == config) {
            for (service, streamed, subject, _) in &imports {
                match store.exports.iter_mut().find(|e| &e.subject == subject) {
                    Some(e) => e.to.push(name.clone()),
                    None => store.exports.push(Export {
                        subject: subject.clone(),
                        service: *service,
                        streamed: *streamed,
                        to: vec![name.clone()],
                    }),
                }
            }
        }
        accounts.push(Account {
            name: name.clone(),
            about: format!(
                "site {}'s account for its config link: the fleet's documents, and nothing of another site's",
                leaf.site
            ),
            jetstream: None,
            exports: Vec::new(),
            imports: imports
                .into_iter()
                .map(|(service, _, subject, local)| Import {
                    service,
                    account: config.to_string(),
                    subject,
                    local,
                })
                .collect(),
            users: Vec::new(),
        });
    }
    accounts
}

fn render_account(
    out: &mut String,
    subjects: &Subjects,
    account: &Account,
    users: &[User],
    roles: &[Role],
    leaves: &[LeafUser],
) {
    let _ = writeln!(out, "  # {}", account.about);
    let _ = writeln!(out, "  {}: {{", account.name);
    if let Some(l) = &account.jetstream {
        let _ = writeln!(
            out,
            "    jetstream: {{ max_mem: {}, max_file: {}, max_streams: {}, max_consumers: {} }}",
            l.max_mem, l.max_file, l.max_streams, l.max_consumers
        );
    }
    let here: Vec<&User> = users
        .iter()
        .filter(|(r, store, _)| account.users.contains(&(r.clone(), *store)))
        .collect();
    let leaves: Vec<&LeafUser> = leaves
        .iter()
        .filter(|l| l.link.hub_account(&l.site) == account.name)
        .collect();
    if !here.is_empty() || !leaves.is_empty() {
        let _ = writeln!(out, "    users: [");
        for leaf in leaves {
            let _ = writeln!(
                out,
                "      # site {}'s leaf connection ({}): {}",
                leaf.site,
                leaf.link,
                leaf.link.about()
            );
            let _ = writeln!(out, "      {{");
            let _ = writeln!(out, "          nkey: {}", leaf.nkey);
            let _ = writeln!(out, "          allowed_connection_types: [\"LEAFNODE\"]");
            render_permissions(out, &leaf.permissions);
            let _ = writeln!(out, "      }}");
        }
        for (role, store, nkey) in here {
            let _ = writeln!(out, "      # {role}: {}", purpose(role, *store));
            let _ = writeln!(out, "      {{");
            let _ = writeln!(out, "          nkey: {nkey}");
            let permissions = if *store {
                role.store_permissions(subjects)
            } else {
                role.permissions_among(subjects, roles)
            };
            render_permissions(out, &permissions);
            let _ = writeln!(out, "      }}");
        }
        let _ = writeln!(out, "    ]");
    }
    if !account.exports.is_empty() {
        let _ = writeln!(out, "    exports: [");
        for e in &account.exports {
            let kind = if e.service { "service" } else { "stream" };
            let streamed = if e.streamed {
                ", response_type: stream"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "      {{ {kind}: \"{}\"{streamed}, accounts: [{}] }}",
                e.subject,
                e.to.join(", ")
            );
        }
        let _ = writeln!(out, "    ]");
    }
    if !account.imports.is_empty() {
        let _ = writeln!(out, "    imports: [");
        for i in &account.imports {
            let kind = if i.service { "service" } else { "stream" };
            let to = if i.local != i.subject {
                format!(", to: \"{}\"", i.local)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "      {{ {kind}: {{ account: {}, subject: \"{}\" }}{to} }}",
                i.account, i.subject
            );
        }
        let _ = writeln!(out, "    ]");
    }
    let _ = writeln!(out, "  }}");
}

/// The accounts of `bus::accounts` for the roles that have a messaging identity in `users`,
/// with every identity's user in its account.
fn render_with(subjects: &Subjects, users: &[User], leaves: &[LeafUser], header: &str) -> String {
    let mut roles: Vec<Role> = users
        .iter()
        .filter(|(_, store, _)| !store)
        .map(|(r, _, _)| r.clone())
        .collect();
    roles.dedup();
    let mut out = String::new();
    out.push_str(header);
    let _ = writeln!(out, "accounts {{");
    for account in with_site_accounts(subjects, accounts::layout(subjects, &roles), leaves) {
        render_account(&mut out, subjects, &account, users, &roles, leaves);
    }
    let _ = writeln!(out, "}}");
    out
}

pub fn render(subjects: &Subjects, users: &[User], leaves: &[LeafUser]) -> String {
    let quoted: Vec<User> = users
        .iter()
        .map(|(r, store, k)| (r.clone(), *store, format!("\"{k}\"")))
        .collect();
    let header = format!(
        "# policy-bus accounts, users and permissions for prefix \"{}\", written by `policyctl\n\
         # auth`. nats.conf includes it; your own configuration may include it instead (with\n\
         # JetStream enabled at the server level). `policyctl auth add-agent <kind>` writes it\n\
         # again: reload the server then (nats-server --signal reload, or SIGHUP).\n",
        subjects.prefix()
    );
    let leaves: Vec<LeafUser> = leaves
        .iter()
        .map(|l| LeafUser {
            nkey: format!("\"{}\"", l.nkey),
            ..l.clone()
        })
        .collect();
    render_with(subjects, &quoted, &leaves, &header)
}

/// The environment variable the template reads an identity's public nkey from.
pub fn template_variable(role: &Role, store: bool) -> String {
    let name = role.name().to_uppercase().replace('-', "_");
    if store {
        format!("POLICY_NKEY_{name}_STORE")
    } else {
        format!("POLICY_NKEY_{name}")
    }
}

/// Every identity of `roles`: the messaging one, and the store one where the role has it.
pub fn identities(roles: &[Role]) -> Vec<(Role, bool)> {
    roles
        .iter()
        .flat_map(|r| {
            let store = r.store_account().is_some();
            [(r.clone(), false)]
                .into_iter()
                .chain(store.then(|| (r.clone(), true)))
        })
        .collect()
}

/// The permission set for operators who run their own NATS: the same accounts and users,
/// with each identity's public nkey read from an environment variable when the server starts.
pub fn template(subjects: &Subjects, roles: &[Role]) -> String {
    let ids = identities(roles);
    let users: Vec<User> = ids
        .iter()
        .map(|(r, store)| {
            (
                r.clone(),
                *store,
                format!("${}", template_variable(r, *store)),
            )
        })
        .collect();
    let vars: Vec<String> = ids
        .iter()
        .map(|(r, store)| template_variable(r, *store))
        .collect();
    let header = format!(
        "# policy-bus accounts, users and permissions for prefix \"{}\" (template; `policyctl\n\
         # auth template` writes it). Include it from your nats-server configuration, with\n\
         # JetStream enabled at the server level, and start the server with each identity's\n\
         # public nkey (`nk -gen user -pubout`, or a `.pub` file of `policyctl auth init`) in:\n\
         #   {}\n\
         # A role's messaging identity logs in to POLICY; its store identity (`_STORE`) to an\n\
         # account of its own that imports the JetStream stores it uses. A third-party agent\n\
         # kind gets both from `policyctl auth add-agent <kind>`.\n",
        subjects.prefix(),
        vars.join("\n#   ")
    );
    render_with(subjects, &users, &[], &header)
}
