//! A local fleet for the tests: a hub nats-server with its own JetStream domain and a leaf
//! node listener, and sites that are leaf nodes of it, each with a domain of its own. The
//! configuration is what `docs/fleet.md` tells an operator to write (`bus::fleet::hub_conf`,
//! `bus::fleet::site_conf`), as `policyctl up --sites` writes it.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use bus::Subjects;

use crate::{bin, free_port, AuthDir, Engine, NatsServer};

/// The hub's JetStream domain.
pub const HUB_DOMAIN: &str = "hub";

/// The hub and its sites' servers, and the configuration files they run on.
pub struct FleetServers {
    pub hub: NatsServer,
    pub sites: Vec<NatsServer>,
    /// The port the hub takes leaf connections on.
    pub leaf_port: u16,
    pub confs: tempfile::TempDir,
    /// On a secured fleet: what `policyctl auth fleet` wrote, a folder per server.
    pub auth: Option<Arc<tempfile::TempDir>>,
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(format!("{name}.conf"));
    std::fs::write(&path, text).expect("write a server configuration");
    path
}

impl FleetServers {
    /// A hub and one site per name, the sites' leaf connections going straight to the hub.
    pub fn start(sites: &[&str]) -> Self {
        let leaf_port = free_port();
        Self::start_via(sites, leaf_port, |_| leaf_port)
    }

    /// As [`Self::start`], with the hub taking leaf connections on `leaf_port` and site `i`'s
    /// leaf connection going to the port `via(i)`: a proxy the test controls, to cut and heal
    /// the link.
    pub fn start_via(sites: &[&str], leaf_port: u16, via: impl Fn(usize) -> u16) -> Self {
        let confs = tempfile::tempdir().expect("temp dir");
        let hub_conf = bus::fleet::hub_conf(HUB_DOMAIN, &format!("127.0.0.1:{leaf_port}"));
        let hub = NatsServer::start_with_conf(&write(&confs, "hub", &hub_conf), Vec::new());
        let subjects = Subjects::default();
        let sites = sites
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let url = format!("nats-leaf://127.0.0.1:{}", via(i));
                let conf = bus::fleet::site_conf(name, &url, &subjects);
                NatsServer::start_with_conf(&write(&confs, name, &conf), Vec::new())
            })
            .collect();
        FleetServers {
            hub,
            sites,
            leaf_port,
            confs,
            auth: None,
        }
    }

    /// A secured fleet: `policyctl auth fleet` writes each server's folder (its engine's seeds,
    /// and the leaf identities and permissions), and each server runs its folder's nats.conf.
    pub fn start_secured(sites: &[&str]) -> Self {
        let leaf_port = free_port();
        Self::start_secured_via(sites, leaf_port, |_| leaf_port)
    }

    /// [`Self::start_secured`], with the hub taking leaf connections on `leaf_port` and site
    /// `i`'s going to the port `via(i)` (a proxy the test controls).
    pub fn start_secured_via(sites: &[&str], leaf_port: u16, via: impl Fn(usize) -> u16) -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let out = Command::new(bin("policyctl"))
            .args(["auth", "fleet", "--sites", &sites.join(",")])
            .args(["--hub-domain", HUB_DOMAIN])
            .args(["--leaf-listen", &format!("127.0.0.1:{leaf_port}")])
            .args(["--hub-url", &format!("nats-leaf://127.0.0.1:{leaf_port}")])
            .arg("--auth-dir")
            .arg(root.path())
            .output()
            .expect("run policyctl auth fleet");
        assert!(
            out.status.success(),
            "policyctl auth fleet: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (i, name) in sites.iter().enumerate() {
            let leaf = root.path().join(name).join("leaf.conf");
            let text = std::fs::read_to_string(&leaf).expect("the site's leaf.conf");
            let to = format!("nats-leaf://127.0.0.1:{}", via(i));
            let text = text.replace(&format!("nats-leaf://127.0.0.1:{leaf_port}"), &to);
            std::fs::write(&leaf, text).expect("point the site at its proxy");
        }
        let conf = |name: &str| root.path().join(name).join("nats.conf");
        let hub = NatsServer::start_with_conf(&conf("hub"), Vec::new());
        let sites = sites
            .iter()
            .map(|name| NatsServer::start_with_conf(&conf(name), Vec::new()))
            .collect();
        FleetServers {
            hub,
            sites,
            leaf_port,
            confs: tempfile::tempdir().expect("temp dir"),
            auth: Some(Arc::new(root)),
        }
    }

    /// On a secured fleet, the folder of `name` (`hub` or a site's).
    pub fn auth(&self, name: &str) -> Option<AuthDir> {
        self.auth
            .as_ref()
            .map(|root| AuthDir::new(root.clone(), name))
    }

    /// Where the configuration files are.
    pub fn conf_dir(&self) -> &std::path::Path {
        self.confs.path()
    }
}

/// The hub's engine: prefix `<prefix>.fleet`, on the hub's server.
pub fn hub_engine(hub: NatsServer) -> Engine {
    let mut engine = Engine::on(hub);
    engine.prefix = Subjects::default().fleet().prefix().to_string();
    engine
}

/// The hub's engine, running: its dispatcher following `sites`, and an ACL agent to validate
/// the fleet's policies.
pub async fn start_hub(hub: NatsServer, sites: &[&str]) -> Engine {
    start_hub_as(hub, sites, None).await
}

/// [`start_hub`], its processes logging in with the seeds in `auth` on a secured fleet.
pub async fn start_hub_as(hub: NatsServer, sites: &[&str], auth: Option<AuthDir>) -> Engine {
    let sites = sites.join(",");
    let mut engine = hub_engine(hub);
    engine.auth = auth;
    with_acl(engine, &["--fleet-sites", &sites]).await
}

/// A site's engine, running: its dispatcher takes the fleet's configuration from the hub's
/// domain; an ACL agent decides.
pub async fn start_site(server: NatsServer) -> Engine {
    start_site_as(server, None).await
}

/// [`start_site`], its processes logging in with the seeds in `auth` on a secured fleet.
pub async fn start_site_as(server: NatsServer, auth: Option<AuthDir>) -> Engine {
    let mut engine = Engine::on(server);
    engine.auth = auth;
    with_acl(engine, &["--fleet-hub", HUB_DOMAIN]).await
}

/// `engine` with a dispatcher (given `args`) and an ACL agent, both ready.
async fn with_acl(mut engine: Engine, args: &[&str]) -> Engine {
    engine.spawn("policy-dispatcher", args);
    engine.agent("acl", &[]);
    engine
        .wait_instances(bus::headers::DISPATCHER_SERVICE, 1)
        .await;
    engine.wait_instances("policy-agent-acl", 1).await;
    engine
}
