//! `policyctl up --sites N`: a whole local fleet in one command (see `bus::fleet`). A hub and
//! N sites, each its own nats-server and engine, the sites leaf nodes of the hub; the fleet's
//! examples applied at the hub, the site examples at every site, and sample traffic sent to
//! each site, its decisions printed with the site's name. Ctrl-C stops all of it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bus::roles::Role;
use bus::subject::SHIPPED_KINDS;
use bus::{headers, AdminClient, Client, Kind, Subjects};

use crate::servers::HUB_DOMAIN;
use crate::up::{spawn, wait_ready, Stack};

/// How long a site may take to have the fleet's configuration before the demo gives up.
const SYNC_WITHIN: Duration = Duration::from_secs(60);

pub struct Demo<'a> {
    pub examples: &'a Path,
    pub site_examples: &'a Path,
    pub every: Duration,
    pub metrics_addr: &'a str,
    pub sites: usize,
    /// A secured fleet: where `auth fleet` keeps its folders (kept across runs).
    pub auth: Option<std::path::PathBuf>,
}

/// One engine of the fleet: where it runs and as which prefix.
struct Engine {
    name: String,
    common: daemon::Common,
    /// The operator's connection.
    nats: async_nats::Client,
    /// On a secured fleet: the engine's folder of seeds.
    auth: Option<std::path::PathBuf>,
}

impl Engine {
    fn subjects(&self) -> anyhow::Result<Subjects> {
        Ok(self.common.subjects()?)
    }
}

/// Starts a dispatcher (with `dispatcher_args`) and every shipped agent kind on `engine`, the
/// monitor serving its metrics on `metrics`.
fn start_engine(
    stack: &mut Stack,
    engine: &Engine,
    dispatcher_args: &[&str],
    metrics: SocketAddr,
) -> anyhow::Result<()> {
    let auth = engine.auth.as_deref();
    spawn(
        stack,
        &engine.common,
        auth,
        "policy-dispatcher",
        dispatcher_args,
        &Role::Dispatcher,
    )?;
    let metrics = metrics.to_string();
    for kind in SHIPPED_KINDS {
        let monitor = ["--metrics-addr", metrics.as_str()];
        let args: &[&str] = if kind == "monitor" { &monitor } else { &[] };
        let role = Role::of_kind(&Kind::new(kind)?);
        spawn(
            stack,
            &engine.common,
            auth,
            "policy-agent",
            &[&[kind][..], args].concat(),
            &role,
        )?;
    }
    Ok(())
}

async fn wait_engine(stack: &mut Stack, engine: &Engine) -> anyhow::Result<()> {
    let within = Duration::from_secs(30);
    wait_ready(stack, &engine.nats, headers::DISPATCHER_SERVICE, within).await?;
    for kind in SHIPPED_KINDS {
        let service = headers::agent_service(&Kind::new(kind)?);
        wait_ready(stack, &engine.nats, &service, within).await?;
    }
    Ok(())
}

/// Waits until the site has had the fleet's configuration (it denies every event until then).
async fn wait_synced(site: &Engine) -> anyhow::Result<()> {
    let admin = AdminClient::new(site.nats.clone(), site.subjects()?);
    let deadline = Instant::now() + SYNC_WITHIN;
    loop {
        if let Ok(s) = admin.status().await {
            if s.fleet.as_ref().is_some_and(|f| f.synced) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not get the fleet's configuration within {SYNC_WITHIN:?}",
                site.name
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn run(common: &daemon::Common, demo: Demo<'_>) -> anyhow::Result<()> {
    let subjects = common.subjects()?;
    let addrs = daemon::server_addrs(&common.nats_url)?;
    let first = addrs
        .first()
        .ok_or_else(|| anyhow!("--nats-url is empty"))?;
    let probe = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(1))
        .connect(first.clone())
        .await;
    if probe.is_ok() {
        bail!(
            "a nats-server already answers at {}: --sites starts servers of its own (the hub \
             there, the sites on the next ports); give a free --nats-url",
            common.redacted_url()
        );
    }
    let metrics: SocketAddr = demo
        .metrics_addr
        .parse()
        .with_context(|| format!("--metrics-addr {}", demo.metrics_addr))?;
    let mut stack = Stack {
        children: Vec::new(),
        stores: Vec::new(),
    };
    let result = async {
        let fleet = crate::servers::start_fleet(
            first.host(),
            first.port(),
            demo.sites,
            &subjects,
            demo.auth.as_deref(),
        )?;
        stack.children.extend(fleet.started.children);
        stack.stores.extend(fleet.started.stores);
        let connect = |name: &str, url: &str, subjects: &Subjects| {
            let auth = demo.auth.as_ref().map(|root| root.join(name));
            let mut c = crate::up::as_role(common, auth.as_deref(), &Role::Operator);
            c.nats_url = url.to_string();
            c.prefix = subjects.prefix().to_string();
            let name = name.to_string();
            async move {
                let nats = c.connect("policyctl", true, &Role::Operator).await?;
                let _ = nats.flush().await;
                Ok::<Engine, anyhow::Error>(Engine {
                    name,
                    common: c,
                    nats,
                    auth,
                })
            }
        };
        let hub = connect(HUB_DOMAIN, &fleet.hub, &subjects.fleet()).await?;
        let mut sites = Vec::new();
        for (name, url) in &fleet.sites {
            sites.push(connect(name, url, &subjects).await?);
        }
        eprintln!(
            "started nats-server {}: hub at {} (JetStream domain `{HUB_DOMAIN}`), {}",
            hub.nats.server_info().version,
            fleet.hub,
            fleet
                .sites
                .iter()
                .map(|(n, u)| format!("{n} at {u}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let names: Vec<&str> = fleet.sites.iter().map(|(n, _)| n.as_str()).collect();
        let follow = names.join(",");
        start_engine(&mut stack, &hub, &["--fleet-sites", &follow], metrics)?;
        for (i, site) in sites.iter().enumerate() {
            let port = metrics.port().checked_add(i as u16 + 1).unwrap_or(0);
            let at = SocketAddr::new(metrics.ip(), port);
            start_engine(&mut stack, site, &["--fleet-hub", HUB_DOMAIN], at)?;
        }
        wait_engine(&mut stack, &hub).await?;
        for site in &sites {
            wait_engine(&mut stack, site).await?;
        }
        eprintln!(
            "engines up: the hub's (prefix {}) and one per site",
            subjects.fleet().prefix()
        );
        let fleet_admin = AdminClient::new(hub.nats.clone(), hub.subjects()?);
        eprint!("the fleet's configuration, at the hub: ");
        crate::demo::load_examples(&fleet_admin, demo.examples).await?;
        for site in &sites {
            wait_synced(site).await?;
            eprint!("{}'s own: ", site.name);
            let admin = AdminClient::new(site.nats.clone(), site.subjects()?);
            crate::demo::load_examples(&admin, demo.site_examples).await?;
        }
        // On a secured fleet, each command logs in as the operator of the engine it acts on.
        let login = |engine: &Engine| match &engine.auth {
            Some(dir) => format!(
                " --nkey-file {}",
                crate::auth::seed_file(dir, &Role::Operator).display()
            ),
            None => String::new(),
        };
        if let Some(root) = &demo.auth {
            eprintln!(
                "secured fleet: each server's seeds, users and leaf identities in {}/<hub|site-N>/ (`policyctl auth fleet`)",
                root.display()
            );
        }
        eprintln!(
            "change the fleet's configuration at the hub: policyctl --nats-url {}{} --fleet apply PATH; a site's own: policyctl --nats-url {}{} apply PATH   (Ctrl-C here stops everything)",
            fleet.hub,
            login(&hub),
            fleet.sites.first().map_or("", |(_, u)| u.as_str()),
            sites.first().map(login).unwrap_or_default()
        );
        let mut hooks = Vec::new();
        for site in &sites {
            // Events come from a gateway, which on a secured fleet is a role of its own.
            let gateway = crate::up::as_role(&site.common, site.auth.as_deref(), &Role::Gateway);
            let nats = gateway.connect("policyctl", true, &Role::Gateway).await?;
            hooks.push((
                Client::new(nats, subjects.clone()),
                format!("[{}] ", site.name),
            ));
        }
        let traffic = hooks.into_iter().map(|(hook, label)| async move {
            crate::demo::traffic(hook, demo.every, &label).await
        });
        futures::future::try_join_all(traffic).await.map(|_| ())
    };
    let outcome = tokio::select! {
        r = result => r,
        _ = daemon::shutdown_signal() => Ok(()),
    };
    stack.stop().await;
    outcome
}
