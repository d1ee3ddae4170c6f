//! A fleet of sites: one hub whose configuration every site decides on, beside its own.
//!
//! The hub is an engine like any other, with the prefix `<prefix>.fleet` (so its buckets and
//! subjects are never a site's, even over a leaf connection that lets everything through), on
//! a NATS server (or cluster) with its own JetStream domain; what an operator applies there is
//! the fleet's configuration. Each site is an engine with the prefix `<prefix>` on a NATS
//! server that is a leaf node of the hub, with a domain of its own. A site's dispatcher, which
//! owns the site's config bucket, makes the bucket *source* the hub's subscriptions and
//! policies through the leaf connection, under the keys `fleet.sub.…` and `fleet.pol.…` (a
//! subject transform). So the fleet's documents are stored at every site, in
//! the order the hub wrote them: a site decides on its last copy when cut off from the hub,
//! and JetStream resumes the source where it stopped when the link comes back, with nothing
//! lost or applied twice. No decision waits on the hub.
//!
//! Precedence (the agents and the dispatcher apply it, see `docs/fleet.md`): a fleet document
//! wins over a site's with the same key; the ACL evaluates every fleet rule before any site
//! rule, so a site cannot shadow or remove a fleet deny (nor a fleet allow); limits of both
//! levels all apply, each counted at the site.

use std::fmt;

use async_nats::jetstream::stream::{External, Source, SubjectTransform};
use serde::{Deserialize, Serialize};

use crate::error::InvalidName;
use crate::subject::Subjects;

/// Where a stored document comes from. The fleet's come first wherever order matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Fleet,
    Site,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Fleet => "fleet",
            Level::Site => "site",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The key prefix of the fleet's documents in a site's config bucket.
pub const FLEET_KEYS: &str = "fleet.";

/// The key of a site's config bucket that records, once, that the site has had the fleet's
/// configuration (its value: the hub revision it had then). Until it exists, the site's
/// dispatcher denies every event: the site's own documents alone might allow what the fleet
/// denies. Not under [`FLEET_KEYS`]: the site writes it, not the source.
pub const SYNCED_KEY: &str = "site.fleet-synced";

/// The level of a config key, and the key as its level's writer stored it.
pub fn split_level(key: &str) -> (Level, &str) {
    match key.strip_prefix(FLEET_KEYS) {
        Some(rest) => (Level::Fleet, rest),
        None => (Level::Site, key),
    }
}

/// [`source`] as a site's process that reaches its store through `jet` makes it: on the
/// secured bus (a store identity), through the site's own account at the hub, named by the
/// site's server's JetStream domain.
pub fn site_source(jet: &crate::store::Jet, subjects: &Subjects, hub_domain: &str) -> Source {
    let site = jet.client().server_info().domain;
    let secured_as = jet.api().and(site.as_deref());
    source(subjects, hub_domain, secured_as)
}

/// The key-space of the hub's config bucket a site takes: subscriptions and policies. A
/// removed peer (`peer.…`) is a site's own gateway's news and stays at the hub.
const FLEET_DOCUMENTS: [&str; 2] = ["sub", "pol"];

/// A JetStream domain name, as nats-server takes it: one token of letters, digits, `-`, `_`.
pub fn check_domain(domain: &str) -> Result<(), InvalidName> {
    let ok = !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(()).ok_or_else(|| InvalidName {
        what: "JetStream domain",
        name: domain.to_string(),
        rule: "one token of letters, digits, '-' and '_'",
    })
}

/// Where a site's dispatcher reaches the hub's JetStream API on the secured bus: its store
/// identity imports the hub's direct gets, as its site `site` reaches them, under this prefix
/// (see [`crate::accounts`] and [`crate::leaf::site_api`]).
pub fn hub_api_import(subjects: &Subjects, site: &str) -> String {
    crate::store::other_domain_api(subjects, site)
}

/// The source a site's config bucket takes the fleet's documents from: the hub's config
/// bucket (`subjects.fleet()`'s) in the hub's JetStream domain, each key under `fleet.`. On the
/// secured bus (`secured_as`: the site's name, its domain) through the site's own account at
/// the hub, which imports the bucket's API under [`crate::leaf::site_api`] and exports the
/// site's deliveries under [`crate::leaf::down_prefix`] to it alone.
pub fn source(subjects: &Subjects, hub_domain: &str, secured_as: Option<&str>) -> Source {
    let (hub, site) = (subjects.fleet().config_bucket(), subjects.config_bucket());
    let external = match secured_as {
        Some(name) => Some(External {
            api_prefix: crate::leaf::site_api(name),
            delivery_prefix: Some(crate::leaf::down_prefix(name)),
        }),
        None => external(hub_domain),
    };
    Source {
        name: format!("KV_{hub}"),
        external,
        subject_transforms: FLEET_DOCUMENTS
            .iter()
            .map(|tag| SubjectTransform {
                source: format!("$KV.{hub}.{tag}.>"),
                destination: format!("$KV.{site}.{FLEET_KEYS}{tag}.>"),
            })
            .collect(),
        ..Default::default()
    }
}

/// The subjects a site's leaf connection to the hub must carry neither way: the engine's own
/// (`<prefix>.>`, which holds the hub's `<prefix>.fleet.>`: no event, admin command or answer
/// crosses, so no decision waits on the hub), the stores' (`$KV`, `$O`, `$SLOT`: a write never
/// lands in the other side's stream) and the services API (`$SRV`: instances are counted per
/// site). What crosses is JetStream's own traffic for the sources, under `$JS.<domain>.API`.
pub fn leaf_denies(subjects: &Subjects) -> Vec<String> {
    let mut deny = vec![format!("{}.>", subjects.prefix())];
    // A store write under another domain's API (`$JS.<domain>.API.$KV.…`) is one too: the
    // server maps it to the store's subject there.
    deny.extend(
        [
            "$KV.>",
            "$O.>",
            "$SLOT.>",
            "$SRV.>",
            "$JS.*.API.$KV.>",
            "$JS.*.API.$O.>",
        ]
        .map(String::from),
    );
    deny
}

/// The key of a site's config bucket with the hub revision of the newest fleet document the
/// site has applied; the hub sources it (see [`site_status_source`]).
pub const REVISION_KEY: &str = "site.fleet-revision";

/// The key of a site's config bucket that records, for good, that the hub's bucket is not the
/// one the site's fleet documents came from (its value: the site's revision then). Until the
/// site's bucket is made again the site reports it; the hub sources it as it does
/// [`REVISION_KEY`].
pub const RESET_KEY: &str = "site.fleet-hub-reset";

/// The header nats-server puts on a sourced message: `<stream>[:<hash>] <sequence> …`, the
/// sequence being the message's in the stream it came from (at a site: the hub revision).
pub const SOURCE_HEADER: &str = "Nats-Stream-Source";

/// Whether a sourced message came in through the source whose (one) subject transform has
/// `destination`, by its [`SOURCE_HEADER`] value (`<source> <sequence> <filters>
/// <destinations> …`). The hub's server writes that header from the source the message came
/// in on, whatever subject the delivering site gave it: a site that forges its deliveries'
/// subjects (the `$JS.ACK…@<subject>` of a reply) cannot make a record look like another
/// site's, so the hub reads a site's records only when this holds (see `crate::leaf`).
pub fn came_through(header: Option<&str>, destination: &str) -> bool {
    header.is_some_and(|h| h.split(' ').nth(3) == Some(destination))
}

/// The destination of the hub's source of a site's standing ([`site_status_source`]).
pub fn site_status_destination(hub: &Subjects, site: &str) -> String {
    format!("$KV.{}.{site}.>", hub.sites_bucket())
}

/// The sequence, in the stream it came from, of a sourced message's [`SOURCE_HEADER`] value.
pub fn source_sequence(header: &str) -> Option<u64> {
    header.split_whitespace().nth(1)?.parse().ok()
}

/// The subject at the hub of a fleet document a site holds under `subject` (the source's
/// transform, undone), if it is one.
pub fn hub_subject(sites: &Subjects, subject: &str) -> Option<String> {
    let key = subject.strip_prefix(&format!("$KV.{}.{FLEET_KEYS}", sites.config_bucket()))?;
    Some(format!("$KV.{}.{key}", sites.fleet().config_bucket()))
}

/// The key filters of a config bucket's subscriptions and policies (the fleet's documents, at
/// the hub).
pub fn document_filters(bucket: &str) -> [String; 2] {
    FLEET_DOCUMENTS.map(|tag| format!("$KV.{bucket}.{tag}.>"))
}

/// The filter of every fleet document a site's config bucket holds.
pub fn fleet_documents_filter(sites: &Subjects) -> String {
    format!("$KV.{}.{FLEET_KEYS}>", sites.config_bucket())
}

/// The key, in the hub's sites bucket, of a site's [`REVISION_KEY`].
pub fn site_revision_key(site: &str) -> String {
    let key = REVISION_KEY.strip_prefix("site.").unwrap_or(REVISION_KEY);
    format!("{site}.{key}")
}

/// The key, in the hub's sites bucket, of a site's [`RESET_KEY`].
pub fn site_reset_key(site: &str) -> String {
    let key = RESET_KEY.strip_prefix("site.").unwrap_or(RESET_KEY);
    format!("{site}.{key}")
}

/// The sites' subjects, from the hub's (`<prefix>.fleet` → `<prefix>`).
pub fn sites_of(hub: &Subjects) -> Option<Subjects> {
    let prefix = hub.prefix().strip_suffix(".fleet")?;
    Subjects::new(prefix).ok()
}

/// A JetStream API prefix of a domain, as a source's `external.api`.
fn external(domain: &str) -> Option<External> {
    Some(External {
        api_prefix: format!("$JS.{domain}.API"),
        delivery_prefix: None,
    })
}

/// The hub's source of a site: its deliveries under the site's own prefix, so that on the
/// secured bus a site may deliver into no other site's source (`crate::leaf`).
fn from_site(site: &str) -> Option<External> {
    Some(External {
        api_prefix: format!("$JS.{site}.API"),
        delivery_prefix: Some(crate::leaf::up_prefix(site)),
    })
}

/// The source by which the hub's sites bucket (`hub.sites_bucket()`) takes a site's standing:
/// its config bucket's `site.…` keys, under `<site>.…`.
pub fn site_status_source(hub: &Subjects, sites: &Subjects, site: &str) -> Source {
    let from = sites.config_bucket();
    Source {
        name: format!("KV_{from}"),
        external: from_site(site),
        subject_transforms: vec![SubjectTransform {
            source: format!("$KV.{from}.site.>"),
            destination: site_status_destination(hub, site),
        }],
        ..Default::default()
    }
}

/// The site (JetStream domain) a source of the hub takes from.
pub fn site_of_source(source: &Source) -> Option<&str> {
    source
        .external
        .as_ref()?
        .api_prefix
        .strip_prefix("$JS.")?
        .strip_suffix(".API")
}

/// The source by which the hub's decision log takes a site's: `<prefix>.log.>` there becomes
/// `<hub prefix>.site.<site>.log.>` here.
pub fn site_log_source(hub: &Subjects, sites: &Subjects, site: &str) -> Source {
    let to = hub.site_decision_log_wildcard(site);
    Source {
        name: sites.decisions_stream(),
        external: from_site(site),
        subject_transforms: vec![SubjectTransform {
            source: sites.decision_log_wildcard(),
            destination: to,
        }],
        ..Default::default()
    }
}

/// The hub's nats-server configuration, to be completed with its client port and, on a secured
/// bus, its accounts: its JetStream domain, and where it takes the sites' leaf connections.
/// JetStream's store goes in `js` under the directory the server runs in.
pub fn hub_conf(domain: &str, leaf_listen: &str) -> String {
    format!(
        "server_name: {domain}\n\
         jetstream {{ domain: {domain}, store_dir: \"js\" }}\n\
         leafnodes {{ listen: \"{leaf_listen}\" }}\n"
    )
}

/// A site's nats-server configuration: its JetStream domain (its name), and its leaf
/// connection to the hub at `leaf_url`, carrying nothing of the engine's own
/// ([`leaf_denies`]) and retried every second.
pub fn site_conf(name: &str, leaf_url: &str, subjects: &Subjects) -> String {
    format!(
        "server_name: {name}\n\
         jetstream {{ domain: {name}, store_dir: \"js\" }}\n\
         {}",
        site_leafnodes(leaf_url, subjects, &[])
    )
}

/// A site's `leafnodes` block. Without `seeds`, one leaf connection in the global account (a
/// bus without accounts); on the secured bus, one connection per link of `crate::leaf`, each
/// binding the link's store account and logging in with the link's seed. Every connection
/// denies [`leaf_denies`] both ways.
pub fn site_leafnodes(
    leaf_url: &str,
    subjects: &Subjects,
    seeds: &[(crate::leaf::Link, String)],
) -> String {
    let deny = leaf_denies(subjects)
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let remote = |login: String| {
        format!("{{ url: \"{leaf_url}\"{login}, deny_exports: [{deny}], deny_imports: [{deny}] }}")
    };
    let remotes: Vec<String> = match seeds {
        [] => vec![remote(String::new())],
        seeds => seeds
            .iter()
            .map(|(link, seed)| {
                let account = link.site_store().account();
                remote(format!(", account: {account}, nkey: \"{seed}\""))
            })
            .collect(),
    };
    format!(
        "leafnodes {{\n  reconnect: 1\n  remotes [\n    {}\n  ]\n}}\n",
        remotes.join("\n    ")
    )
}

pub use crate::source::same_source;

/// A site's view of its fleet .
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// The hub's JetStream domain.
    pub hub: String,
    /// Whether the site has had the fleet's configuration (it denies every event until then).
    pub synced: bool,
    /// The hub revision of the newest fleet document the site holds (0: none).
    pub revision: u64,
    /// The hub's newest configuration revision, as of the last time it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_revision: Option<u64>,
    /// Hub revisions the site does not have yet.
    pub lag: u64,
    /// The hub's bucket is not the one the site's fleet documents came from: it was made
    /// again, its revisions started over (see docs/fleet.md, A hub made again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hub_reset: bool,
    /// Milliseconds since the hub last answered (absent: never, since this dispatcher started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_seen_ms_ago: Option<u64>,
}

/// A site as the hub sees it, from what the site's dispatcher recorded and the hub sourced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteStatus {
    /// The site's name, its JetStream domain.
    pub name: String,
    /// The hub revision the site has applied (absent: it never reported one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// Hub revisions the site lacks, as of its last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// Milliseconds since the hub last heard from the site (absent: never since it started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_ms_ago: Option<u64>,
    /// The site's fleet documents came from an earlier bucket of the hub's ([`RESET_KEY`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hub_reset: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_come_from_the_key() {
        assert_eq!(split_level("fleet.pol.acl.a"), (Level::Fleet, "pol.acl.a"));
        assert_eq!(split_level("pol.acl.a"), (Level::Site, "pol.acl.a"));
        assert!(Level::Fleet < Level::Site);
    }

    #[test]
    fn the_source_takes_documents_only_under_fleet() {
        let s = source(&Subjects::default(), "hub", None);
        assert_eq!(s.name, "KV_policy_fleet_config");
        assert_eq!(
            s.external.as_ref().map(|e| e.api_prefix.as_str()),
            Some("$JS.hub.API")
        );
        let pairs: Vec<(&str, &str)> = s
            .subject_transforms
            .iter()
            .map(|t| (t.source.as_str(), t.destination.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                (
                    "$KV.policy_fleet_config.sub.>",
                    "$KV.policy_config.fleet.sub.>"
                ),
                (
                    "$KV.policy_fleet_config.pol.>",
                    "$KV.policy_config.fleet.pol.>"
                )
            ]
        );
        assert!(same_source(&s, &s.clone()));
        assert!(!same_source(
            &s,
            &source(&Subjects::default(), "other", None)
        ));
        assert!(!same_source(
            &s,
            &source(&Subjects::default(), "hub", Some("site-1"))
        ));
    }

    #[test]
    fn sourced_headers_and_keys() {
        assert_eq!(
            source_sequence("KV_policy_fleet_config:bTMUkJQk 3 $KV.a.> $KV.b.> $KV.a.x"),
            Some(3)
        );
        assert_eq!(source_sequence("KV_x"), None);
        assert_eq!(site_revision_key("site-1"), "site-1.fleet-revision");
        let s = Subjects::default();
        assert_eq!(
            hub_subject(&s, "$KV.policy_config.fleet.pol.acl.a").as_deref(),
            Some("$KV.policy_fleet_config.pol.acl.a")
        );
        assert_eq!(hub_subject(&s, "$KV.policy_config.pol.acl.a"), None);
        // The header as nats-server 2.12 writes it (2.10 leaves out the last field).
        let genuine = "KV_policy_config:Xy1 4 $KV.policy_config.site.> $KV.policy_fleet_sites.site-b.> $KV.policy_config.site.fleet-revision";
        let dest = site_status_destination(&Subjects::default().fleet(), "site-b");
        assert!(came_through(Some(genuine), &dest));
        assert!(came_through(
            Some(&genuine[..genuine.rfind(' ').unwrap()]),
            &dest
        ));
        let forged = genuine.replace("site-b.>", "site-a.>");
        assert!(!came_through(Some(&forged), &dest));
        assert!(!came_through(None, &dest));
        let hub = Subjects::default().fleet();
        let sites = sites_of(&hub).expect("the sites' prefix");
        assert_eq!(sites, Subjects::default());
        let status = site_status_source(&hub, &sites, "site-1");
        assert_eq!(
            status.subject_transforms[0].destination,
            "$KV.policy_fleet_sites.site-1.>"
        );
        assert_eq!(
            hub.site_of_decision_log("policy.fleet.site.site-1.log.new-connection"),
            Some("site-1")
        );
    }

    #[test]
    fn domains_are_one_token() {
        assert!(check_domain("hub").is_ok());
        assert!(check_domain("site-a_1").is_ok());
        assert!(check_domain("a.b").is_err());
        assert!(check_domain("").is_err());
    }
}
