//! `policyctl auth fleet`: a secured fleet's files (see `bus::fleet` and `bus::leaf`). Under
//! one directory, a folder per server, each like the one `auth init` writes (the seeds of
//! every role of its engine, `accounts.conf`, `nats.conf`), plus:
//!
//! - `hub/fleet.json`: the hub's domain, where it takes leaf connections, and its sites;
//!   `hub/leaves/<site>.<link>.pub`: each site's leaf identities, which `accounts.conf` gives a
//!   user each, in the hub's account of the link, with the link's permissions.
//! - `<site>/fleet.json`: the site's name (its domain), the hub's domain and leaf URL;
//!   `<site>/leaf/<link>.nk` (and `.pub`): the seeds the site's leaf connections log in with;
//!   `<site>/leaf.conf` (mode 0600, it holds the seeds): the site's `leafnodes` block, which
//!   its `nats.conf` includes.
//!
//! A server's folder is all it needs: copy `hub/` to the hub and each `<site>/` to its site.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use bus::leaf::Link;
use bus::roles::Role;
use bus::Subjects;
use serde::{Deserialize, Serialize};

use super::render::LeafUser;

/// A server's place in a fleet, as `fleet.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "place", rename_all = "lowercase")]
pub enum Place {
    Hub {
        domain: String,
        leaf_listen: String,
        sites: Vec<String>,
    },
    Site {
        name: String,
        hub: String,
        hub_url: String,
    },
}

fn place_file(dir: &Path) -> PathBuf {
    dir.join("fleet.json")
}

/// The place of the server whose files are in `dir`, if it is in a fleet.
pub fn place(dir: &Path) -> anyhow::Result<Option<Place>> {
    let path = place_file(dir);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let place = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a fleet place policyctl wrote", path.display()))?;
    Ok(Some(place))
}

fn leaf_seed(site_dir: &Path, link: Link) -> PathBuf {
    site_dir.join("leaf").join(format!("{link}.nk"))
}

fn leaf_pub(hub_dir: &Path, site: &str, link: Link) -> PathBuf {
    hub_dir.join("leaves").join(format!("{site}.{link}.pub"))
}

/// The seed in a file `policyctl auth` wrote, checked.
fn read_seed(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let seed = text.trim().to_string();
    nkeys::KeyPair::from_seed(&seed)
        .map_err(|e| anyhow!("{}: not a valid nkey seed: {e}", path.display()))?;
    Ok(seed)
}

/// Writes the seed of each link of a site that has none; returns the seeds' public keys.
fn ensure_leaf_seeds(site_dir: &Path) -> anyhow::Result<Vec<(Link, String)>> {
    let dir = site_dir.join("leaf");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    super::restrict(&dir, 0o700)?;
    let mut keys = Vec::new();
    for link in Link::ALL {
        let path = leaf_seed(site_dir, link);
        if !path.exists() {
            super::new_seed(&path)?;
        }
        let pair = nkeys::KeyPair::from_seed(&read_seed(&path)?)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        keys.push((link, pair.public_key()));
    }
    Ok(keys)
}

fn write_place(dir: &Path, place: &Place) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = place_file(dir);
    let text = serde_json::to_string_pretty(place)?;
    std::fs::write(&path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// What `auth fleet` writes: the hub's folder and each site's under `root`.
pub struct Plan<'a> {
    pub root: &'a Path,
    pub hub: &'a str,
    pub sites: &'a [String],
    /// Where the hub takes leaf connections (its `leafnodes.listen`).
    pub leaf_listen: &'a str,
    /// Where the sites reach it (`nats-leaf://host:port`).
    pub hub_url: &'a str,
}

/// Writes (or completes: existing seeds are kept) a fleet's secured files; returns the
/// folders, the hub's first.
pub fn write(plan: &Plan<'_>, subjects: &Subjects) -> anyhow::Result<Vec<PathBuf>> {
    bus::fleet::check_domain(plan.hub)?;
    let mut names = plan.sites.to_vec();
    names.sort();
    names.dedup();
    if names.len() != plan.sites.len() || names.iter().any(|s| s == plan.hub) {
        bail!("site names must differ from each other and from the hub's domain");
    }
    let hub_dir = plan.root.join("hub");
    let leaves = hub_dir.join("leaves");
    std::fs::create_dir_all(&leaves)
        .with_context(|| format!("cannot create {}", leaves.display()))?;
    let mut dirs = vec![hub_dir.clone()];
    for site in plan.sites {
        bus::fleet::check_domain(site)?;
        let dir = plan.root.join(site);
        write_place(
            &dir,
            &Place::Site {
                name: site.clone(),
                hub: plan.hub.to_string(),
                hub_url: plan.hub_url.to_string(),
            },
        )?;
        for (link, key) in ensure_leaf_seeds(&dir)? {
            let path = leaf_pub(&hub_dir, site, link);
            std::fs::write(&path, format!("{key}\n"))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        super::ensure(&dir, subjects, &Role::shipped())?;
        dirs.push(dir);
    }
    write_place(
        &hub_dir,
        &Place::Hub {
            domain: plan.hub.to_string(),
            leaf_listen: plan.leaf_listen.to_string(),
            sites: plan.sites.to_vec(),
        },
    )?;
    super::ensure(&hub_dir, &subjects.fleet(), &Role::shipped())?;
    Ok(dirs)
}

/// The leaf users of a hub's accounts: every site's links, from the keys in `leaves/`.
pub fn leaf_users(dir: &Path, hub_subjects: &Subjects) -> anyhow::Result<Vec<LeafUser>> {
    let Some(Place::Hub { sites, .. }) = place(dir)? else {
        return Ok(Vec::new());
    };
    let site_subjects = bus::fleet::sites_of(hub_subjects).ok_or_else(|| {
        anyhow!(
            "{}: a hub's files, for an engine whose prefix is not `<prefix>.fleet` ({})",
            dir.display(),
            hub_subjects.prefix()
        )
    })?;
    let mut users = Vec::new();
    for site in &sites {
        for link in Link::ALL {
            let path = leaf_pub(dir, site, link);
            let key = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            users.push(LeafUser {
                site: site.clone(),
                link,
                nkey: key.trim().to_string(),
                permissions: link.permissions(&site_subjects, site),
            });
        }
    }
    Ok(users)
}

/// The `nats.conf` of a server of a fleet (`None`: not in one). A site's leaf connections go
/// in `leaf.conf`, written here too, with its seeds.
pub fn server_conf(dir: &Path, subjects: &Subjects) -> anyhow::Result<Option<String>> {
    let head = "# policy-bus: a nats-server configuration of a secured fleet, written by `policyctl\n\
                # auth fleet`. Run the server in the directory that is to hold its JetStream store.\n";
    match place(dir)? {
        None => Ok(None),
        Some(Place::Hub {
            domain,
            leaf_listen,
            ..
        }) => Ok(Some(format!(
            "{head}server_name: {domain}\n\
             jetstream {{ domain: {domain}, store_dir: \"jetstream\" }}\n\
             leafnodes {{ listen: \"{leaf_listen}\" }}\n\
             include accounts.conf\n"
        ))),
        Some(Place::Site { name, hub_url, .. }) => {
            let seeds = Link::ALL
                .iter()
                .map(|l| Ok((*l, read_seed(&leaf_seed(dir, *l))?)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let leaf = dir.join("leaf.conf");
            std::fs::write(
                &leaf,
                bus::fleet::site_leafnodes(&hub_url, subjects, &seeds),
            )
            .with_context(|| format!("cannot write {}", leaf.display()))?;
            super::restrict(&leaf, 0o600)?;
            Ok(Some(format!(
                "{head}server_name: {name}\n\
                 jetstream {{ domain: {name}, store_dir: \"jetstream\" }}\n\
                 include leaf.conf\n\
                 include accounts.conf\n"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleets_folders_give_each_site_its_leaf_identities_and_keep_seeds() {
        let root = tempfile::tempdir().unwrap();
        let sites = vec!["site-a".to_string(), "site-b".to_string()];
        let plan = Plan {
            root: root.path(),
            hub: "hub",
            sites: &sites,
            leaf_listen: "0.0.0.0:7422",
            hub_url: "nats-leaf://hub:7422",
        };
        let s = Subjects::default();
        write(&plan, &s).unwrap();
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).unwrap();
        let hub = read("hub/accounts.conf");
        // Every link of every site has a user at the hub, as a leaf only, in its account.
        assert_eq!(
            hub.matches("allowed_connection_types: [\"LEAFNODE\"]")
                .count(),
            6
        );
        let key = read("site-a/leaf/status.nk");
        let public = nkeys::KeyPair::from_seed(key.trim()).unwrap().public_key();
        let sites_account = hub.find("POLICY_STORE_SITES: {").unwrap();
        // The config link's user is in the site's own account, which imports only its own.
        let config_key = read("site-a/leaf/config.nk");
        let config_public = nkeys::KeyPair::from_seed(config_key.trim())
            .unwrap()
            .public_key();
        let own = hub.find("  POLICY_FLEET_SITE_A: {").unwrap();
        assert!(hub.find(&config_public).unwrap() > own);
        assert!(
            hub.contains("{ stream: \"$FLEET.site-a.down.>\", accounts: [POLICY_FLEET_SITE_A] }"),
            "{hub}"
        );
        let user = hub.find(&public).unwrap();
        assert!(
            user > sites_account,
            "the status link's user is in the sites account"
        );
        assert!(read("hub/nats.conf").contains("domain: hub"));
        assert!(read("hub/nats.conf").contains("leafnodes { listen: \"0.0.0.0:7422\" }"));
        // The site's engine is the sites' prefix; the hub's, the fleet's.
        assert!(read("site-a/accounts.conf").contains("\"policy.event.>\""));
        assert!(hub.contains("\"policy.fleet.event.>\""));
        let leaf = read("site-a/leaf.conf");
        assert_eq!(leaf.matches("url: \"nats-leaf://hub:7422\"").count(), 3);
        assert!(leaf.contains(key.trim()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(root.path().join("site-a/leaf.conf"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "leaf.conf holds seeds");
        }
        // Running again keeps every seed.
        write(&plan, &s).unwrap();
        assert_eq!(read("site-a/leaf/status.nk"), key);
        assert_eq!(read("hub/accounts.conf"), hub);
        // A site named as the hub is refused.
        let clash = vec!["hub".to_string()];
        assert!(write(
            &Plan {
                sites: &clash,
                ..plan
            },
            &s
        )
        .is_err());
    }
}
