//! `policyctl up`: a whole local engine in one command, for a first look and for `bench`.
//! It starts a nats-server when none answers at `--nats-url`, a dispatcher and every agent
//! kind, loads the examples, and sends sample traffic while printing each decision.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bus::roles::Role;
use bus::subject::SHIPPED_KINDS;
use bus::{headers, AdminClient, Client, Kind};
use tokio::process::{Child, Command};

pub(crate) struct Stack {
    pub(crate) children: Vec<(String, Child)>,
    pub(crate) stores: Vec<tempfile::TempDir>,
}

impl Stack {
    /// Stops the engine's processes all at once (SIGTERM, then each drains, which they do in a
    /// few seconds even when NATS is already gone), then NATS itself, so that the processes
    /// drain against a live server when it is still up.
    pub(crate) async fn stop(mut self) {
        let (nats, engine): (Vec<_>, Vec<_>) = std::mem::take(&mut self.children)
            .into_iter()
            .partition(|(name, _)| name == "nats-server");
        stop_all(engine, Duration::from_secs(12)).await;
        stop_all(nats, Duration::from_secs(5)).await;
    }
}

/// SIGTERM to every child, then waits for them together; one that outlives `grace` is killed.
async fn stop_all(mut children: Vec<(String, Child)>, grace: Duration) {
    for (_, child) in &children {
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
    }
    let waits = children.iter_mut().map(|(name, child)| async move {
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(_) => eprintln!("stopped {name}"),
            Err(_) => {
                let _ = child.kill().await;
                eprintln!("killed {name} (did not stop within {grace:?})");
            }
        }
    });
    futures::future::join_all(waits).await;
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find policyctl's own path")?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found next to policyctl: build the workspace first (scripts/up does)",
            p.display()
        );
    }
    Ok(p)
}

/// `common` with the seed of `role` when the bus is secured (`auth` is the seeds' directory).
pub(crate) fn as_role(common: &daemon::Common, auth: Option<&Path>, role: &Role) -> daemon::Common {
    let mut c = common.clone();
    if let Some(dir) = auth {
        c.auth = daemon::Auth {
            nkey_file: Some(crate::auth::seed_file(dir, role)),
            ..Default::default()
        };
    }
    c
}

/// Connects as the operator to the URL's server, or starts `nodes` there (a cluster with more
/// than one); returns the client and every server's URL.
async fn nats(
    common: &daemon::Common,
    stack: &mut Stack,
    auth: Option<&Path>,
    nodes: usize,
) -> anyhow::Result<(async_nats::Client, String)> {
    let url = common.redacted_url();
    let operator = as_role(common, auth, &Role::Operator);
    let addrs = daemon::server_addrs(&common.nats_url)?;
    let probe = operator
        .auth
        .options()
        .await?
        .connection_timeout(Duration::from_secs(1))
        .custom_inbox_prefix(Role::Operator.inbox_prefix(&common.subjects()?))
        .connect(addrs.clone())
        .await;
    match probe {
        Ok(client) => {
            let info = client.server_info();
            if !bus::config::server_supported(&info.version) {
                bail!(
                    "nats-server {} answers at {url}, but policy-bus needs 2.10 or later (with JetStream); \
                     give another --nats-url and `up` starts a current one there",
                    info.version
                );
            }
            if auth.is_some() && !info.auth_required {
                bail!(
                    "nats-server {} answers at {url} without authentication: --secure needs a \
                     server of its own; give a free --nats-url and `up` starts one there",
                    info.version
                );
            }
            if nodes > 1 {
                bail!(
                    "nats-server {} already answers at {url}: --cluster starts servers of its own; \
                     give a free --nats-url",
                    info.version
                );
            }
            eprintln!("using nats-server {} at {url}", info.version);
            return Ok((client, common.nats_url.clone()));
        }
        Err(e) if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation => {
            let hint = match auth {
                Some(dir) => format!(
                    "is it running with {}? give a free --nats-url and `up` starts one",
                    crate::auth::conf_file(dir).display()
                ),
                None => "give its credentials, --secure, or a free --nats-url".into(),
            };
            bail!("the nats-server at {url} refuses this login: {hint}");
        }
        Err(_) => {}
    }
    let first = addrs
        .first()
        .ok_or_else(|| anyhow!("--nats-url is empty"))?;
    let started = crate::servers::start(first.host(), first.port(), nodes.max(1), auth)?;
    stack.children.extend(started.children);
    stack.stores.extend(started.stores);
    let mut all = operator.clone();
    all.nats_url = started.urls.clone();
    let client = all.connect("policyctl", true, &Role::Operator).await?;
    // The first round trip waits for the server to be up (the connection retries until then).
    let _ = client.flush().await;
    let what = if nodes > 1 {
        format!(
            "a {nodes}-node nats-server {} cluster",
            client.server_info().version
        )
    } else {
        format!("nats-server {}", client.server_info().version)
    };
    eprintln!(
        "started {what} at {}{}",
        daemon::redact(&started.urls),
        if auth.is_some() { " (secured)" } else { "" }
    );
    Ok((client, started.urls))
}

pub(crate) fn spawn(
    stack: &mut Stack,
    common: &daemon::Common,
    auth: Option<&Path>,
    bin: &str,
    args: &[&str],
    role: &Role,
) -> anyhow::Result<()> {
    let mut cmd = Command::new(sibling(bin)?);
    cmd.args(["--nats-url", &common.nats_url, "--prefix", &common.prefix])
        .args(["--kv-replicas", &common.kv_replicas.to_string()])
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .kill_on_drop(true);
    if let Some(dir) = auth {
        cmd.arg("--nkey-file")
            .arg(crate::auth::seed_file(dir, role));
    }
    if common.log_json {
        cmd.arg("--log-json");
    }
    let child = cmd.spawn().with_context(|| format!("cannot start {bin}"))?;
    stack
        .children
        .push((format!("{bin} {}", args.join(" ")), child));
    Ok(())
}

/// Waits until `service` answers its ping, for up to `within`. A process of the stack that
/// exits meanwhile ends the wait at once: its own error is just above on the terminal.
pub(crate) async fn wait_ready(
    stack: &mut Stack,
    nats: &async_nats::Client,
    service: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while bus::client::count_instances(nats, service, Duration::from_millis(200))
        .await
        .unwrap_or(0)
        == 0
    {
        for (name, child) in &mut stack.children {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited ({status}) before it was ready; see its error above");
            }
        }
        if Instant::now() > deadline {
            bail!("{service} did not come up within {within:?}");
        }
    }
    Ok(())
}

pub async fn run(
    common: &daemon::Common,
    examples: &Path,
    every: Duration,
    metrics_addr: &str,
    auth: Option<&Path>,
    cluster: usize,
) -> anyhow::Result<()> {
    let subjects = common.subjects()?;
    let mut stack = Stack {
        children: Vec::new(),
        stores: Vec::new(),
    };
    let result = async {
        if let Some(dir) = auth {
            let written = crate::auth::ensure(dir, &subjects, &Role::shipped())?;
            eprintln!(
                "secured bus: users and permissions in {}, seeds per role in {}/<role>.nk and <role>.store.nk{}",
                crate::auth::accounts_file(dir).display(),
                dir.display(),
                if written.is_empty() {
                    ""
                } else {
                    " (new seeds written)"
                }
            );
        }
        let (nats, urls) = nats(common, &mut stack, auth, cluster).await?;
        // Every client of `up` gets all the servers; each process one node of its own, spread
        // round the cluster (it learns the others from it, and goes there if its node is lost).
        let mut all = common.clone();
        all.nats_url = urls.clone();
        let nodes: Vec<&str> = urls.split(',').collect();
        let on = |i: usize| {
            let mut c = all.clone();
            if nodes.len() > 1 {
                c.nats_url = nodes[i % nodes.len()].to_string();
                c.kv_replicas = nodes.len().min(3);
            }
            c
        };
        spawn(
            &mut stack,
            &on(0),
            auth,
            "policy-dispatcher",
            &[],
            &Role::Dispatcher,
        )?;
        for (i, kind) in SHIPPED_KINDS.into_iter().enumerate() {
            let metrics = ["--metrics-addr", metrics_addr];
            let args: &[&str] = if kind == "monitor" { &metrics } else { &[] };
            let role = Role::of_kind(&Kind::new(kind)?);
            spawn(
                &mut stack,
                &on(i + 1),
                auth,
                "policy-agent",
                &[&[kind][..], args].concat(),
                &role,
            )?;
        }
        // The WebAssembly host, so that `policyctl agent deploy` works on the demo at once.
        spawn(
            &mut stack,
            &on(SHIPPED_KINDS.len() + 1),
            auth,
            "policy-agent",
            &["wasm"],
            &Role::WasmHost,
        )?;
        // A new cluster elects its JetStream leaders before the first bucket can be made,
        // which on a loaded machine takes longer than a single server's start.
        let within = Duration::from_secs(if cluster > 1 { 120 } else { 20 });
        wait_ready(&mut stack, &nats, headers::DISPATCHER_SERVICE, within).await?;
        for kind in SHIPPED_KINDS {
            let service = headers::agent_service(&Kind::new(kind)?);
            wait_ready(&mut stack, &nats, &service, within).await?;
        }
        wait_ready(&mut stack, &nats, headers::WASM_HOST_SERVICE, within).await?;
        eprintln!(
            "engine up: dispatcher, agents {} and a wasm host",
            SHIPPED_KINDS.join(", ")
        );
        crate::demo::load_examples(&AdminClient::new(nats.clone(), subjects.clone()), examples)
            .await?;
        let login = match auth {
            Some(dir) => format!(
                " --nkey-file {}",
                crate::auth::seed_file(dir, &Role::Operator).display()
            ),
            None => String::new(),
        };
        eprintln!(
            "watch decisions from another terminal: {} --nats-url {}{login} tap   (Ctrl-C here stops everything)",
            std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "policyctl".into()),
            all.redacted_url()
        );
        let gateway = as_role(&all, auth, &Role::Gateway)
            .connect("policyctl-traffic", true, &Role::Gateway)
            .await?;
        crate::demo::traffic(Client::new(gateway, subjects), every, "").await
    };
    let outcome = tokio::select! {
        r = result => r,
        _ = daemon::shutdown_signal() => Ok(()),
    };
    stack.stop().await;
    outcome
}
