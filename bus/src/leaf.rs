//! A fleet's leaf connections on the secured bus (see `crate::fleet`). No store account has a
//! user of the engine's, so each leaf connection binds one store account of a site to one of
//! the hub, and carries only the JetStream traffic of the sources between them:
//!
//! | link | site's account | hub's account | who sources | what |
//! | --- | --- | --- | --- | --- |
//! | `config` | `POLICY_STORE_CONFIG` | `POLICY_FLEET_<SITE>`, the site's own | the site | the fleet's documents, and the hub's revision (a direct get) |
//! | `status` | `POLICY_STORE_CONFIG` | `POLICY_STORE_SITES` | the hub | the site's standing (`site.…` keys) |
//! | `log` | `POLICY_STORE_LOG` | `POLICY_STORE_LOG` | the hub | the site's decision log |
//!
//! A site's `config` link binds an account of the site's own at the hub ([`site_account`]),
//! which imports from the hub's config account only what the site's source and its
//! dispatcher's direct gets use, and the deliveries of that site's source alone (under
//! [`down_prefix`]): a site sees no other site's consumers, replies or deliveries, so it
//! cannot name, let alone change, another site's consumer.
//!
//! The hub knows each link's identity (an nkey user that may only connect as a leaf node) and
//! gives it permissions that name exactly the subjects its sources use, in each direction: the
//! JetStream API of the one stream sourced, its flow control, API replies, and the deliveries
//! of the hub's own sources under a prefix of the site's ([`up_prefix`]). What a site may
//! send into the hub is never a store's subject (`$KV.…`, a log subject) nor the hub's
//! JetStream API beyond creating a consumer on, and reading, the fleet's documents: the site's
//! leaf identity cannot write, purge or delete anything at the hub through the API, and a
//! consumer's deliveries into its own stream are refused as a cycle. A site that forges its
//! deliveries' subjects (a `$JS.ACK…@subject` reply) does not pass for another: the hub reads a
//! site's records only when they came in through its source (`crate::fleet::came_through`).

use crate::roles::Permissions;
use crate::store::Store;
use crate::subject::Subjects;

/// One leaf connection of a site to its hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Link {
    /// The site sources the hub's config bucket (the fleet's documents).
    Config,
    /// The hub's sites bucket sources the site's standing.
    Status,
    /// The hub's decision log sources the site's.
    Log,
}

impl Link {
    pub const ALL: [Link; 3] = [Link::Config, Link::Status, Link::Log];

    pub fn name(self) -> &'static str {
        match self {
            Link::Config => "config",
            Link::Status => "status",
            Link::Log => "log",
        }
    }

    /// The store whose account the link binds at the site.
    pub fn site_store(self) -> Store {
        match self {
            Link::Config | Link::Status => Store::Config,
            Link::Log => Store::Log,
        }
    }

    /// The account the link binds at the hub: for `config`, the site's own.
    pub fn hub_account(self, site: &str) -> String {
        match self {
            Link::Config => site_account(site),
            Link::Status => Store::Sites.account().to_string(),
            Link::Log => Store::Log.account().to_string(),
        }
    }

    pub fn about(self) -> &'static str {
        match self {
            Link::Config => "the site takes the fleet's documents",
            Link::Status => "the hub takes the site's standing",
            Link::Log => "the hub takes the site's decision log",
        }
    }

    /// The permissions of the link's identity at the hub, as a leaf node's: `publish` is what
    /// the site may send into the hub's account, `subscribe` what the hub may send it. `sites`
    /// are the sites' subjects, `site` the site's JetStream domain.
    pub fn permissions(self, sites: &Subjects, site: &str) -> Permissions {
        // A JetStream API reply (`$JSC.R.…`) and a service import's (`_R_.…`) are random.
        let replies = || vec!["$JSC.R.>".to_string()];
        match self {
            Link::Config => {
                let stream = format!("KV_{}", sites.fleet().config_bucket());
                let api = site_api(site);
                // The site's own account: what crosses is only the site's.
                Permissions {
                    publish: vec![
                        format!("{api}.CONSUMER.CREATE.{stream}"),
                        format!("{api}.DIRECT.GET.{stream}"),
                        format!("{api}.DIRECT.GET.{stream}.>"),
                        format!("$JS.FC.{stream}.>"),
                    ],
                    subscribe: vec![
                        format!("{}.>", down_prefix(site)),
                        "$JSC.R.>".to_string(),
                        "_R_.>".to_string(),
                    ],
                    deny_subscribe: Vec::new(),
                }
            }
            Link::Status | Link::Log => {
                let stream = self.site_store().stream(sites);
                let api = format!("$JS.{site}.API");
                let mut publish = replies();
                publish.push(format!("{}.>", up_prefix(site)));
                Permissions {
                    publish,
                    subscribe: vec![
                        format!("{api}.CONSUMER.CREATE.{stream}"),
                        format!("{api}.CONSUMER.CREATE.{stream}.>"),
                        format!("$JS.FC.{stream}.>"),
                    ],
                    deny_subscribe: Vec::new(),
                }
            }
        }
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the hub's sources of a site have their messages delivered: a prefix of the site's
/// own, which that site's leaf identities alone may publish to at the hub.
pub fn up_prefix(site: &str) -> String {
    format!("$FLEET.{site}.up")
}

/// Where a site's source of the fleet's documents has them delivered, which the hub's config
/// account exports to that site's account alone.
pub fn down_prefix(site: &str) -> String {
    format!("$FLEET.{site}.down")
}

/// Where a site reaches the hub's JetStream API for the fleet's documents on the secured bus:
/// an import of its own account at the hub. (Not the hub's domain API, `$JS.<hub>.API`: the
/// hub's server maps that to `$JS.API` in every account, which in an account without
/// JetStream answers nothing.)
pub fn site_api(site: &str) -> String {
    format!("$FLEET.{site}.api")
}

/// The hub's account of a site's `config` link: `POLICY_FLEET_<SITE>`.
pub fn site_account(site: &str) -> String {
    format!("POLICY_FLEET_{}", site.to_uppercase().replace('-', "_"))
}

/// What a site's account at the hub imports from the hub's config account: `(service,
/// streamed, subject there, subject in the site's account)`. The JetStream API of the fleet's
/// bucket that the site's source and its dispatcher's direct gets use, under [`site_api`] as
/// the site sends it; flow control; and the site's own deliveries.
pub fn site_account_imports(sites: &Subjects, site: &str) -> Vec<(bool, bool, String, String)> {
    let stream = format!("KV_{}", sites.fleet().config_bucket());
    let api = |call: &str, streamed: bool| {
        (
            true,
            streamed,
            format!("$JS.API.{call}"),
            format!("{}.{call}", site_api(site)),
        )
    };
    let fc = format!("$JS.FC.{stream}.>");
    let down = format!("{}.>", down_prefix(site));
    vec![
        api(&format!("CONSUMER.CREATE.{stream}"), false),
        api(&format!("DIRECT.GET.{stream}"), true),
        api(&format!("DIRECT.GET.{stream}.>"), true),
        (true, false, fc.clone(), fc),
        (false, false, down.clone(), down),
    ]
}

/// Whether a hub on nats-server `version` (as `INFO` gives it) holds what a leaf node sends to
/// the leaf identity's permissions (2.12.7 and later). An older server forwards a leaf's
/// message wherever it has interest, without that check: the permissions still keep a site
/// running nats-server from sending anything else (the hub shows it no interest), but not a
/// site running a modified server.
pub fn hub_checks_leaf_messages(version: &str) -> bool {
    let mut parts = version
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let v = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    v >= (2, 12, 7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hubs_check_leaf_messages_from_2_12_7() {
        assert!(hub_checks_leaf_messages("2.12.8"));
        assert!(hub_checks_leaf_messages("2.12.7"));
        assert!(hub_checks_leaf_messages("2.14.0-RC.1"));
        assert!(!hub_checks_leaf_messages("2.12.6"));
        assert!(!hub_checks_leaf_messages("2.10.29"));
    }

    #[test]
    fn a_site_sends_the_hub_no_write_and_no_other_sites_deliveries() {
        let s = Subjects::default();
        for link in Link::ALL {
            let p = link.permissions(&s, "site-1");
            for subject in &p.publish {
                assert!(!subject.starts_with("$KV") && !subject.starts_with("policy."));
                assert!(!subject.contains("STREAM.") && !subject.contains("$JS.hub.API.>"));
                assert!(!subject.contains("site-2"), "{subject}");
            }
        }
        let status = Link::Status.permissions(&s, "site-1");
        assert!(status.publish.contains(&"$FLEET.site-1.up.>".to_string()));
        assert!(!status.publish.iter().any(|p| p == "$FLEET.>"));
        // The config link: its own account, its own deliveries, no named consumer.
        assert_eq!(Link::Config.hub_account("site-1"), "POLICY_FLEET_SITE_1");
        let config = Link::Config.permissions(&s, "site-1");
        assert!(config
            .subscribe
            .contains(&"$FLEET.site-1.down.>".to_string()));
        assert!(!config
            .publish
            .iter()
            .any(|p| p.contains("CREATE") && p.ends_with(".>")));
        let imports = site_account_imports(&s, "site-1");
        for (_, _, _, local) in &imports {
            assert!(
                config.publish.contains(&local.to_string())
                    || local.starts_with("$FLEET.site-1.down"),
                "{local}"
            );
        }
    }
}
