//! `policyctl auth`: one nkey per role and a nats-server configuration that gives each role
//! exactly its permissions (`bus::roles`). The files live in one directory: `<role>.nk` (the
//! seed, mode 0600), `accounts.conf` (the account with every role's user, rendered from the
//! seeds present, so adding a role is writing its seed and rendering again) and `nats.conf`
//! (a whole server configuration: JetStream, and `include accounts.conf`).
//!
//! JetStream is enabled in `nats.conf` itself, with a store directory relative to where the
//! server runs, rather than by `-js`/`-sd` flags: nats-server 2.10 turns JetStream off on a
//! configuration reload when only a flag enabled it, and refuses a reload when the flag's store
//! directory differs from the file's; and a reload is how a new agent kind's user goes live.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use bus::roles::{Permissions, Role};
use bus::{Kind, Subjects};

/// Where `up --secure` and `auth` keep their files unless told otherwise: under the project,
/// so they survive restarts (and `.gitignore` keeps them out of commits).
pub const DEFAULT_DIR: &str = ".policy-bus/auth";
/// The NATS account the engine's users live in.
const ACCOUNT: &str = "POLICY";

pub fn seed_file(dir: &Path, role: &Role) -> PathBuf {
    dir.join(format!("{}.nk", role.name()))
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
# The users and permissions are in accounts.conf, which your own configuration may include
# instead. After `policyctl auth add-agent <kind>`, reload the server (--signal reload, SIGHUP).
jetstream { store_dir: \"jetstream\" }
include accounts.conf
";

/// Writes a seed for every role that has none (existing seeds are kept, so running processes
/// keep working) and renders `nats.conf` from all seeds in the directory.
pub fn ensure(dir: &Path, subjects: &Subjects, roles: &[Role]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    restrict(dir, 0o700)?;
    let mut written = Vec::new();
    for role in roles {
        let path = seed_file(dir, role);
        if path.exists() {
            continue;
        }
        let pair = nkeys::KeyPair::new_user();
        let seed = pair
            .seed()
            .map_err(|e| anyhow!("cannot generate an nkey: {e}"))?;
        let text = format!(
            "# policy-bus role {role}: pass with --nkey-file (or NATS_NKEY_FILE). Keep it secret.\n\
             # public key {}\n{seed}\n",
            pair.public_key()
        );
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        restrict(&path, 0o600)?;
        written.push(path);
    }
    let accounts = accounts_file(dir);
    std::fs::write(&accounts, render(subjects, &users(dir)?))
        .with_context(|| format!("cannot write {}", accounts.display()))?;
    let conf = conf_file(dir);
    std::fs::write(&conf, SERVER_CONF)
        .with_context(|| format!("cannot write {}", conf.display()))?;
    Ok(written)
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot restrict access to {}", path.display()))
}

#[cfg(not(unix))]
fn restrict(_path: &Path, _mode: u32) -> anyhow::Result<()> {
    Ok(())
}

/// Every role with a seed in `dir`, with its public key.
fn users(dir: &Path) -> anyhow::Result<Vec<(Role, String)>> {
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
        let Some(role) = Role::parse(name) else {
            bail!(
                "{}: not a role name (operator, gateway, dispatcher, monitor or agent-<kind>)",
                path.display()
            );
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let seed = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("SU"))
            .ok_or_else(|| anyhow!("{}: no nkey seed in it", path.display()))?;
        let pair = nkeys::KeyPair::from_seed(seed)
            .map_err(|e| anyhow!("{}: not a valid nkey seed: {e}", path.display()))?;
        users.push((role, pair.public_key()));
    }
    users.sort();
    Ok(users)
}

/// What each role is for, as a comment above its user.
fn purpose(role: &Role) -> String {
    match role {
        Role::Operator => "policyctl: admin commands, reading the tap, service pings".into(),
        Role::Gateway => "gateway hookpoints: send events (and policyctl emit/bench)".into(),
        Role::Dispatcher => {
            "policy-dispatcher: serve events and admin, call agents, publish the tap, own the config bucket".into()
        }
        Role::Monitor => "policy-agent monitor: read the tap".into(),
        Role::WasmHost => {
            "policy-agent wasm: serve deployed WebAssembly kinds (never a shipped kind), read the modules".into()
        }
        Role::Agent(k) => format!("policy-agent {k}: its own queue group, read the config"),
    }
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

fn render_permissions(out: &mut String, p: &Permissions) {
    let _ = writeln!(out, "        permissions: {{");
    let _ = writeln!(out, "          publish: {{ allow: {} }}", list(&p.publish));
    if p.deny_subscribe.is_empty() {
        let _ = writeln!(
            out,
            "          subscribe: {{ allow: {} }}",
            list(&p.subscribe)
        );
    } else {
        let _ = writeln!(
            out,
            "          subscribe: {{ allow: {}, deny: {} }}",
            list(&p.subscribe),
            list(&p.deny_subscribe)
        );
    }
    if p.allow_responses {
        let _ = writeln!(out, "          allow_responses: true");
    }
    let _ = writeln!(out, "        }}");
}

/// The server configuration: one account with JetStream and one user per role. `nkey` is the
/// value after `nkey:`, a quoted public key or, in the template, a variable.
fn render_with(subjects: &Subjects, users: &[(Role, String)], header: &str) -> String {
    let mut out = String::new();
    out.push_str(header);
    let _ = writeln!(out, "accounts {{");
    let _ = writeln!(out, "  {ACCOUNT}: {{");
    let _ = writeln!(out, "    jetstream: enabled");
    let _ = writeln!(out, "    users: [");
    for (role, nkey) in users {
        let _ = writeln!(out, "      # {role}: {}", purpose(role));
        let _ = writeln!(out, "      {{");
        let _ = writeln!(out, "        nkey: {nkey}");
        render_permissions(&mut out, &role.permissions(subjects));
        let _ = writeln!(out, "      }}");
    }
    let _ = writeln!(out, "    ]");
    let _ = writeln!(out, "  }}");
    let _ = writeln!(out, "}}");
    out
}

pub fn render(subjects: &Subjects, users: &[(Role, String)]) -> String {
    let quoted: Vec<(Role, String)> = users
        .iter()
        .map(|(r, k)| (r.clone(), format!("\"{k}\"")))
        .collect();
    let header = format!(
        "# policy-bus users and permissions for prefix \"{}\", written by `policyctl auth`.\n\
         # nats.conf includes it; your own configuration may include it instead (with JetStream\n\
         # enabled at the server level). `policyctl auth add-agent <kind>` writes it again:\n\
         # reload the server then (nats-server --signal reload, or SIGHUP).\n",
        subjects.prefix()
    );
    render_with(subjects, &quoted, &header)
}

/// The environment variable the template reads a role's public nkey from.
pub fn template_variable(role: &Role) -> String {
    format!(
        "POLICY_NKEY_{}",
        role.name().to_uppercase().replace('-', "_")
    )
}

/// The permission set for operators who run their own NATS: the same account and users, with
/// each role's public nkey read from an environment variable when the server starts.
pub fn template(subjects: &Subjects, roles: &[Role]) -> String {
    let users: Vec<(Role, String)> = roles
        .iter()
        .map(|r| (r.clone(), format!("${}", template_variable(r))))
        .collect();
    let vars: Vec<String> = roles.iter().map(template_variable).collect();
    let header = format!(
        "# policy-bus users and permissions for prefix \"{}\" (template; `policyctl auth template`\n\
         # writes it). Include it from your nats-server configuration, with JetStream enabled at\n\
         # the server level, and start the server with each role's public nkey (`nk -gen user\n\
         # -pubout`, or the `# public key` line of a file from `policyctl auth init`) in:\n\
         #   {}\n\
         # Static users with passwords instead: replace `nkey: ...` by `user: ..., password: ...`\n\
         # and keep the permissions. A third-party agent kind copies an `agent-<kind>` user with\n\
         # its own kind in the subjects (`policyctl auth add-agent <kind>` renders it).\n",
        subjects.prefix(),
        vars.join("\n#   ")
    );
    render_with(subjects, &users, &header)
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
        assert_eq!(first.len(), Role::shipped().len());
        let gateway = std::fs::read_to_string(seed_file(dir.path(), &Role::Gateway)).unwrap();
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
