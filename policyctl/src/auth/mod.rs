//! `policyctl auth`: nkeys for every role and a nats-server configuration that gives each
//! exactly its permissions (`bus::roles`) in the accounts of `bus::accounts`. The files live in
//! one directory:
//!
//! - `<role>.nk`: the seed of the role's messaging identity (mode 0600), the bare seed as `nk`
//!   and `nsc` write one, so that every NATS client reads it; `<role>.pub`: its public key.
//! - `<role>.store.nk`, `<role>.store.pub`: the role's store identity, for every role that
//!   uses a JetStream store (all but the gateway). A process finds it beside `<role>.nk`.
//! - `accounts.conf`: the accounts with every identity's user, rendered from the seeds present,
//!   so adding a role is writing its seeds and rendering again; `nats.conf`: a whole server
//!   configuration (JetStream, and `include accounts.conf`); `README.txt`: what each file is.
//!
//! JetStream is enabled in `nats.conf` itself, with a store directory relative to where the
//! server runs, rather than by `-js`/`-sd` flags: nats-server 2.10 turns JetStream off on a
//! configuration reload when only a flag enabled it, and refuses a reload when the flag's store
//! directory differs from the file's; and a reload is how a new agent kind's user goes live.

pub mod command;
pub mod fleet;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use bus::roles::Role;
use bus::{Kind, Subjects};

mod render;

pub use render::{render, template};

/// Where `up --secure` and `auth` keep their files unless told otherwise: under the project,
/// so they survive restarts (and `.gitignore` keeps them out of commits).
pub const DEFAULT_DIR: &str = ".policy-bus/auth";

/// The files of one identity: `<role>` or `<role>.store`.
fn stem(role: &Role, store: bool) -> String {
    if store {
        format!("{}.store", role.name())
    } else {
        role.name()
    }
}

pub fn seed_file(dir: &Path, role: &Role) -> PathBuf {
    dir.join(format!("{}.nk", stem(role, false)))
}

pub fn conf_file(dir: &Path) -> PathBuf {
    dir.join("nats.conf")
}

pub fn accounts_file(dir: &Path) -> PathBuf {
    dir.join("accounts.conf")
}

/// The whole server configuration around `accounts.conf`.
const SERVER_CONF: &str = "\
# policy-bus: a nats-server configuration for a secured bus, written by `policyctl auth`.
# Run the server in the directory that is to hold its JetStream store:
#   cd /var/lib/nats && nats-server -c <this file> [-a host -p port]
# The accounts, users and permissions are in accounts.conf, which your own configuration may
# include instead. After `policyctl auth add-agent <kind>`, reload the server (--signal
# reload, SIGHUP).
jetstream { store_dir: \"jetstream\" }
include accounts.conf
";

const README: &str = "\
policy-bus credentials, written by `policyctl auth`. Keep this directory private.

<role>.nk          seed of the role's messaging identity (account POLICY): NATS_NKEY_FILE
<role>.pub         its public key
<role>.store.nk    seed of the role's store identity (account POLICY_AS_<ROLE>); a process
                   finds it beside <role>.nk (or NATS_STORE_NKEY_FILE)
<role>.store.pub   its public key
accounts.conf      accounts, users and permissions, rendered from the seeds here
nats.conf          a whole nats-server configuration including accounts.conf

Roles: operator (policyctl), gateway (hookpoints), dispatcher, monitor, wasm-host,
agent-<kind>. `policyctl auth add-agent <kind>` adds a third-party kind's role; reload the
server then. The .nk files hold the bare seed, as `nk -gen user` writes one.
";

/// Writes the seeds of every identity of `roles` that has none (existing seeds are kept, so
/// running processes keep working) and renders the configuration from all seeds in the
/// directory.
pub fn ensure(dir: &Path, subjects: &Subjects, roles: &[Role]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    restrict(dir, 0o700)?;
    let mut written = Vec::new();
    for role in roles {
        for store in [false, true] {
            if store && role.store_account().is_none() {
                continue;
            }
            let path = dir.join(format!("{}.nk", stem(role, store)));
            if path.exists() {
                continue;
            }
            let key = new_seed(&path)?;
            let public = dir.join(format!("{}.pub", stem(role, store)));
            std::fs::write(&public, format!("{key}\n"))
                .with_context(|| format!("cannot write {}", public.display()))?;
            written.push(path);
        }
    }
    let accounts = accounts_file(dir);
    let leaves = fleet::leaf_users(dir, subjects)?;
    std::fs::write(&accounts, render(subjects, &users(dir)?, &leaves))
        .with_context(|| format!("cannot write {}", accounts.display()))?;
    let server = fleet::server_conf(dir, subjects)?;
    for (path, text) in [
        (conf_file(dir), server.as_deref().unwrap_or(SERVER_CONF)),
        (dir.join("README.txt"), README),
    ] {
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(written)
}

/// Writes a new user nkey's bare seed to `path` (mode 0600); returns its public key.
pub(crate) fn new_seed(path: &Path) -> anyhow::Result<String> {
    let pair = nkeys::KeyPair::new_user();
    let seed = pair
        .seed()
        .map_err(|e| anyhow!("cannot generate an nkey: {e}"))?;
    std::fs::write(path, format!("{seed}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    restrict(path, 0o600)?;
    Ok(pair.public_key())
}

#[cfg(unix)]
pub(crate) fn restrict(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot restrict access to {}", path.display()))
}

#[cfg(not(unix))]
pub(crate) fn restrict(_path: &Path, _mode: u32) -> anyhow::Result<()> {
    Ok(())
}

/// One identity's user: its role, whether it is the store identity, and its public key (or,
/// in the template, a variable).
pub type User = (Role, bool, String);

/// Every identity with a seed in `dir`, with its public key.
fn users(dir: &Path) -> anyhow::Result<Vec<User>> {
    seeds(dir)?
        .into_iter()
        .map(|(role, store, seed)| {
            let pair = nkeys::KeyPair::from_seed(&seed)
                .map_err(|e| anyhow!("{role}: not a valid nkey seed: {e}"))?;
            Ok((role, store, pair.public_key()))
        })
        .collect()
}

/// Every identity with a seed in `dir`, with its seed.
pub(crate) fn seeds(dir: &Path) -> anyhow::Result<Vec<User>> {
    let mut users = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".nk"))
        else {
            continue;
        };
        let (name, store) = match name.strip_suffix(".store") {
            Some(role) => (role, true),
            None => (name, false),
        };
        let Some(role) = Role::parse(name) else {
            bail!(
                "{}: not a role name (operator, gateway, dispatcher, monitor, wasm-host or agent-<kind>)",
                path.display()
            );
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        // Files from before 0.1's bare seeds had comment lines around it.
        let seed = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("SU"))
            .ok_or_else(|| anyhow!("{}: no nkey seed in it", path.display()))?;
        nkeys::KeyPair::from_seed(seed)
            .map_err(|e| anyhow!("{}: not a valid nkey seed: {e}", path.display()))?;
        users.push((role, store, seed.to_string()));
    }
    users.sort();
    Ok(users)
}

/// `auth add-agent`: a role for a third-party kind, on the same terms as the shipped ones.
pub fn add_agent(dir: &Path, subjects: &Subjects, kind: &str) -> anyhow::Result<PathBuf> {
    let kind = Kind::new(kind)?;
    let role = Role::of_kind(&kind);
    ensure(dir, subjects, std::slice::from_ref(&role))?;
    Ok(seed_file(dir, &role))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_kept_and_the_conf_has_every_role() {
        let dir = tempfile::tempdir().unwrap();
        let s = Subjects::default();
        let first = ensure(dir.path(), &s, &Role::shipped()).unwrap();
        // A messaging and a store identity each, but the gateway's, which uses no store.
        assert_eq!(first.len(), 2 * Role::shipped().len() - 1);
        let gateway = std::fs::read_to_string(seed_file(dir.path(), &Role::Gateway)).unwrap();
        // The bare seed, as `nk -gen user` writes it: every NATS client reads the file.
        assert!(gateway.starts_with("SU") && gateway.trim_end().lines().count() == 1);
        let public = std::fs::read_to_string(dir.path().join("gateway.pub")).unwrap();
        assert_eq!(
            nkeys::KeyPair::from_seed(gateway.trim())
                .unwrap()
                .public_key(),
            public.trim()
        );
        assert!(dir.path().join("dispatcher.store.nk").exists());
        assert!(!dir.path().join("gateway.store.nk").exists());
        assert!(ensure(dir.path(), &s, &Role::shipped()).unwrap().is_empty());
        assert_eq!(
            std::fs::read_to_string(seed_file(dir.path(), &Role::Gateway)).unwrap(),
            gateway,
            "a seed was replaced"
        );
        add_agent(dir.path(), &s, "geo").unwrap();
        let conf = std::fs::read_to_string(accounts_file(dir.path())).unwrap();
        for role in Role::shipped() {
            assert!(conf.contains(&format!("# {role}:")), "{role} missing");
        }
        assert!(conf.contains("\"policy.agent.geo.> geo\""), "{conf}");
        assert!(conf.contains("  POLICY_AS_AGENT_GEO: {"), "{conf}");
        assert!(!conf.contains("allow_responses"), "{conf}");
        assert!(add_agent(dir.path(), &s, "Not A Kind").is_err());
    }

    #[test]
    fn the_shipped_template_is_what_the_generator_writes() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/policy-bus.conf");
        let shipped = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            shipped,
            template(&Subjects::default(), &Role::shipped()),
            "deploy/nats/policy-bus.conf is stale: run `policyctl auth template > deploy/nats/policy-bus.conf`"
        );
    }

    /// compose.yaml cannot run here (no container engine), so check what can go wrong in it:
    /// every process logs in with the seed of its own role, and NATS runs the generated file.
    #[test]
    fn compose_gives_every_process_its_own_role() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
        let services = doc["services"].as_mapping().unwrap();
        let mut seen = Vec::new();
        for (name, svc) in services {
            let entry: Vec<&str> = svc["entrypoint"]
                .as_sequence()
                .map(|s| s.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            let role = match entry.as_slice() {
                ["policy-dispatcher", ..] => Role::Dispatcher,
                ["policy-agent", "wasm", ..] => Role::WasmHost,
                ["policy-agent", kind, ..] => Role::of_kind(&Kind::new(kind).unwrap()),
                ["policyctl", "load", ..] => Role::Operator,
                _ => continue,
            };
            let nkey = svc["environment"]["NATS_NKEY_FILE"].as_str();
            assert_eq!(
                nkey,
                Some(format!("/auth/{}.nk", role.name()).as_str()),
                "service {name:?}"
            );
            seen.push(role);
        }
        for role in Role::shipped() {
            if role != Role::Gateway {
                assert!(seen.contains(&role), "no compose service runs as {role}");
            }
        }
        let nats: Vec<&str> = doc["services"]["nats"]["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(
            nats.windows(2).any(|w| w == ["-c", "/auth/nats.conf"]),
            "{nats:?}"
        );
    }

    /// The clustered overlay: three servers routed to each other, and every process of the
    /// engine given all three with buckets at three replicas.
    #[test]
    fn the_cluster_overlay_spreads_every_process_over_three_servers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let base: serde_norway::Value =
            serde_norway::from_str(&std::fs::read_to_string(root.join("compose.yaml")).unwrap())
                .unwrap();
        let overlay: serde_norway::Value = serde_norway::from_str(
            &std::fs::read_to_string(root.join("compose.cluster.yaml")).unwrap(),
        )
        .unwrap();
        let nodes = ["nats", "nats-2", "nats-3"];
        let mut names = Vec::new();
        for node in nodes {
            let cmd: Vec<&str> = overlay["services"][node]["command"]
                .as_sequence()
                .unwrap_or_else(|| panic!("{node} has no command"))
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
            let after = |flag: &str| {
                cmd.windows(2)
                    .find(|w| w[0] == flag)
                    .map(|w| w[1])
                    .unwrap_or_else(|| panic!("{node}: no {flag}"))
            };
            assert_eq!(after("-c"), "/auth/nats.conf");
            names.push(after("-n"));
            for other in nodes {
                assert!(
                    after("-routes").contains(&format!("nats://{other}:6222")),
                    "{node}"
                );
            }
        }
        names.dedup();
        assert_eq!(names.len(), 3, "server names must differ");
        for (name, svc) in base["services"].as_mapping().unwrap() {
            let name = name.as_str().unwrap();
            if svc["environment"]["NATS_NKEY_FILE"].is_null() {
                continue;
            }
            let env = &overlay["services"][name]["environment"];
            let url = env["NATS_URL"].as_str().unwrap_or_else(|| panic!("{name}"));
            for node in nodes {
                assert!(
                    url.contains(&format!("nats://{node}:4222")),
                    "{name}: {url}"
                );
            }
            assert_eq!(env["POLICY_KV_REPLICAS"].as_str(), Some("3"), "{name}");
        }
    }
}
