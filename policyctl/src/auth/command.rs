//! `policyctl auth`: writes the secured bus's seeds, permissions and server configuration.

use bus::roles::Role;

use crate::print::line;
use crate::AuthCommand;

/// Prints a line; a reader that went away (`| head`) ends the command quietly.
macro_rules! out {
    ($($arg:tt)*) => {
        line(&format!($($arg)*)).map_err(anyhow::Error::from)?
    };
}

pub fn run(cmd: &AuthCommand, subjects: &bus::Subjects) -> anyhow::Result<()> {
    match cmd {
        AuthCommand::Init { auth_dir, jwt } => {
            let written = super::ensure(auth_dir, subjects, &Role::shipped())?;
            for path in &written {
                out!("wrote {}", path.display());
            }
            if *jwt {
                crate::jwt::ensure(auth_dir, subjects)?;
                out!(
                    "{}: the operator-mode server configuration; processes log in with --creds {}/<role>.creds",
                    crate::jwt::conf_file(auth_dir).display(),
                    auth_dir.display()
                );
            }
            out!(
                "{}: users and permissions for every role ({} new seeds); {}: a server configuration \
                 with JetStream that includes it (run nats-server -c {} in the directory for its store)",
                super::accounts_file(auth_dir).display(),
                written.len(),
                super::conf_file(auth_dir).display(),
                super::conf_file(auth_dir).display()
            );
        }
        AuthCommand::AddAgent { kind, auth_dir } => {
            let seed = super::add_agent(auth_dir, subjects, kind)?;
            if crate::jwt::conf_file(auth_dir).exists() {
                crate::jwt::ensure(auth_dir, subjects)?;
            }
            out!(
                "{}: the seed for agent kind {kind}; {} now has its user: reload the server (nats-server --signal reload)",
                seed.display(),
                super::accounts_file(auth_dir).display()
            );
        }
        AuthCommand::Template => print!("{}", super::template(subjects, &Role::shipped())),
        AuthCommand::Fleet {
            sites,
            hub_domain,
            leaf_listen,
            hub_url,
            auth_dir,
        } => {
            let plan = super::fleet::Plan {
                root: auth_dir,
                hub: hub_domain,
                sites,
                leaf_listen,
                hub_url,
            };
            for dir in super::fleet::write(&plan, subjects)? {
                out!(
                    "{}: run `nats-server -c nats.conf` there (seeds per role in <role>.nk)",
                    dir.display()
                );
            }
        }
    }
    Ok(())
}
