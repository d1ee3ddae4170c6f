//! The nats-servers `policyctl up` starts: one, or a local JetStream cluster of several (each
//! its own port, store and name, routed to the others), with the generated users and
//! permissions when the bus is secured.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{anyhow, Context};
use tokio::process::{Child, Command};

/// Servers started, with what must live as long as they do.
pub struct Started {
    /// (name, process), in start order.
    pub children: Vec<(String, Child)>,
    /// Each server's JetStream store, removed when `up` ends.
    pub stores: Vec<tempfile::TempDir>,
    /// Every server's client URL, comma-separated, as `--nats-url` takes them.
    pub urls: String,
}

pub fn nats_server_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let local = PathBuf::from(".nats/bin/nats-server");
    if local.exists() {
        // Absolute: a server runs in its store's directory.
        return Ok(std::path::absolute(local)?);
    }
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("nats-server"))
        .find(|p| p.exists())
        .ok_or_else(|| {
            anyhow!("no nats-server found: run scripts/install-nats, or set NATS_SERVER_BIN")
        })
}

/// `n` distinct free TCP ports on the host for the cluster's routes (nobody connects to them
/// but the servers), none among the client ports `clients`. Every port is held until all are
/// chosen: ports picked one at a time could repeat, and a node whose route port is taken
/// never starts, which leaves a cluster that can never place a replicated bucket.
fn free_ports(host: &str, n: usize, clients: std::ops::Range<u32>) -> anyhow::Result<Vec<u16>> {
    let mut held = Vec::new();
    for _ in 0..n * 4 {
        if held.len() == n {
            break;
        }
        let listener = std::net::TcpListener::bind((host, 0))
            .context("no free port for the cluster's routes")?;
        let port = listener.local_addr()?.port();
        if !clients.contains(&u32::from(port)) {
            held.push(listener);
        }
    }
    if held.len() < n {
        return Err(anyhow!("no {n} free ports for the cluster's routes"));
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Starts `nodes` servers on `host`, client ports `port`, `port + 1`, ... With more than one
/// they form a JetStream cluster named `policy-up`, servers `node-0`, `node-1`, ...
pub fn start(host: &str, port: u16, nodes: usize, auth: Option<&Path>) -> anyhow::Result<Started> {
    let bin = nats_server_bin()?;
    let routes: Vec<u16> = if nodes > 1 {
        let first = u32::from(port);
        free_ports(host, nodes, first..first + nodes as u32)?
    } else {
        Vec::new()
    };
    let all_routes = routes
        .iter()
        .map(|p| format!("nats://{host}:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut started = Started {
        children: Vec::new(),
        stores: Vec::new(),
        urls: String::new(),
    };
    let mut urls = Vec::new();
    for i in 0..nodes {
        let client_port = port
            .checked_add(i as u16)
            .ok_or_else(|| anyhow!("no room for {nodes} ports above {port}"))?;
        let store = tempfile::tempdir()?;
        let mut cmd = Command::new(&bin);
        cmd.args(["-a", host, "-p", &client_port.to_string()]);
        if let Some(route) = routes.get(i) {
            cmd.args(["-n", &format!("node-{i}"), "--cluster_name", "policy-up"])
                .args(["-cluster", &format!("nats://{host}:{route}")])
                .args(["-routes", &all_routes]);
        }
        match auth {
            // The configuration enables JetStream, with its store relative to where it runs.
            Some(dir) => {
                let conf = std::path::absolute(crate::auth::conf_file(dir))?;
                cmd.arg("-c").arg(conf).current_dir(store.path())
            }
            None => cmd.arg("-js").arg("-sd").arg(store.path()),
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        started.children.push(("nats-server".into(), child));
        started.stores.push(store);
        urls.push(format!("nats://{host}:{client_port}"));
    }
    started.urls = urls.join(",");
    Ok(started)
}

/// A local fleet's servers (see `bus::fleet`): the hub, and the sites as its leaf nodes.
pub struct Fleet {
    pub started: Started,
    /// The hub's client URL.
    pub hub: String,
    /// Each site's name (its JetStream domain) and client URL.
    pub sites: Vec<(String, String)>,
}

/// Starts a hub on `host:port` (JetStream domain [`bus::fleet`]'s `hub`) and `sites` sites on
/// the next ports, named `site-1`, `site-2`, ..., each a leaf node of the hub with the
/// configuration `bus::fleet::site_conf` writes. With `auth`, a secured fleet: `auth fleet`
/// (re)writes the folders under it, with this run's leaf port, and each server runs its own.
pub fn start_fleet(
    host: &str,
    port: u16,
    sites: usize,
    subjects: &bus::Subjects,
    auth: Option<&Path>,
) -> anyhow::Result<Fleet> {
    let bin = nats_server_bin()?;
    let leaf = free_ports(host, 1, u32::from(port)..u32::from(port) + sites as u32 + 1)?[0];
    let names: Vec<String> = (1..=sites).map(|i| format!("site-{i}")).collect();
    let leaf_listen = format!("{host}:{leaf}");
    let leaf_url = format!("nats-leaf://{host}:{leaf}");
    let mut confs: Vec<(String, Conf)> = Vec::new();
    match auth {
        Some(root) => {
            let plan = crate::auth::fleet::Plan {
                root,
                hub: HUB_DOMAIN,
                sites: &names,
                leaf_listen: &leaf_listen,
                hub_url: &leaf_url,
            };
            crate::auth::fleet::write(&plan, subjects)?;
            for name in std::iter::once(HUB_DOMAIN.to_string()).chain(names) {
                let file = std::path::absolute(crate::auth::conf_file(&root.join(&name)))?;
                confs.push((name, Conf::File(file)));
            }
        }
        None => {
            confs.push((
                HUB_DOMAIN.to_string(),
                Conf::Text(bus::fleet::hub_conf(HUB_DOMAIN, &leaf_listen)),
            ));
            for name in names {
                let conf = bus::fleet::site_conf(&name, &leaf_url, subjects);
                confs.push((name, Conf::Text(conf)));
            }
        }
    }
    let mut started = Started {
        children: Vec::new(),
        stores: Vec::new(),
        urls: String::new(),
    };
    let mut urls = Vec::new();
    for (i, (name, conf)) in confs.into_iter().enumerate() {
        let client_port = port
            .checked_add(i as u16)
            .ok_or_else(|| anyhow!("no room for {} ports above {port}", sites + 1))?;
        let store = tempfile::tempdir()?;
        let file = match conf {
            Conf::File(file) => file,
            Conf::Text(text) => {
                let file = store.path().join("nats.conf");
                std::fs::write(&file, text)
                    .with_context(|| format!("cannot write {}", file.display()))?;
                file
            }
        };
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&file)
            .args(["-a", host, "-p", &client_port.to_string()])
            .current_dir(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} for {name}", bin.display()))?;
        started.children.push(("nats-server".into(), child));
        started.stores.push(store);
        urls.push((name, format!("nats://{host}:{client_port}")));
    }
    let mut urls = urls.into_iter();
    let (_, hub) = urls.next().ok_or_else(|| anyhow!("no hub"))?;
    started.urls = hub.clone();
    Ok(Fleet {
        started,
        hub,
        sites: urls.collect(),
    })
}

/// A server's configuration: written for the run, or a folder's of `auth fleet`.
enum Conf {
    Text(String),
    File(PathBuf),
}

/// The JetStream domain of the hub `up --sites` starts.
pub const HUB_DOMAIN: &str = "hub";
