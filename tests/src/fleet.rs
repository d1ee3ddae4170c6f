//! A local fleet for the tests: a hub nats-server with its own JetStream domain and a leaf
//! node listener, and sites that are leaf nodes of it, each with a domain of its own. The
//! configuration is what `docs/fleet.md` tells an operator to write, with the leaf's denies
//! from `bus::fleet::leaf_denies`.

use std::path::PathBuf;

use bus::Subjects;

use crate::{free_port, Engine, NatsServer};

/// The hub's JetStream domain.
pub const HUB_DOMAIN: &str = "hub";

/// The hub and its sites' servers, and the configuration files they run on.
pub struct FleetServers {
    pub hub: NatsServer,
    pub sites: Vec<NatsServer>,
    /// The port the hub takes leaf connections on.
    pub leaf_port: u16,
    pub confs: tempfile::TempDir,
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(format!("{name}.conf"));
    std::fs::write(&path, text).expect("write a server configuration");
    path
}

fn quoted(subjects: &[String]) -> String {
    subjects
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A site's server configuration: its domain (its name), and a leaf connection to `leaf_url`
/// that carries nothing of the engine's own (see `bus::fleet::leaf_denies`).
pub fn site_conf(name: &str, leaf_url: &str, subjects: &Subjects) -> String {
    let deny = quoted(&bus::fleet::leaf_denies(subjects));
    format!(
        "server_name: {name}\n\
         jetstream {{ domain: {name}, store_dir: \"js\" }}\n\
         leafnodes {{\n  reconnect: 1\n  remotes [ {{ url: \"{leaf_url}\", deny_exports: [{deny}], deny_imports: [{deny}] }} ]\n}}\n"
    )
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
        let hub_conf = format!(
            "server_name: hub\n\
             jetstream {{ domain: {HUB_DOMAIN}, store_dir: \"js\" }}\n\
             leafnodes {{ listen: \"127.0.0.1:{leaf_port}\" }}\n"
        );
        let hub = NatsServer::start_with_conf(&write(&confs, "hub", &hub_conf), Vec::new());
        let subjects = Subjects::default();
        let sites = sites
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let url = format!("nats-leaf://127.0.0.1:{}", via(i));
                let conf = site_conf(name, &url, &subjects);
                NatsServer::start_with_conf(&write(&confs, name, &conf), Vec::new())
            })
            .collect();
        FleetServers {
            hub,
            sites,
            leaf_port,
            confs,
        }
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
