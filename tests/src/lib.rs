//! Test harness: starts a real `nats-server` (JetStream on, temp store, free port) and the
//! real policy-bus binaries, and kills them and their store on drop. Never a mock.
#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bus::roles::Role;
use bus::{AdminClient, Client, Subjects};

pub mod fleet;
pub mod proxy;

/// Every receive in a test is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Finds nats-server: `$NATS_SERVER_BIN`, the copy `scripts/install-nats` puts in `.nats/`,
/// then `PATH`.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let local = workspace_root().join(".nats/bin/nats-server");
    if local.exists() {
        return local;
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("nats-server");
        if p.exists() {
            return p;
        }
    }
    panic!("nats-server not found: run scripts/test (it installs one into .nats/) or set NATS_SERVER_BIN");
}

/// A tool `scripts/install-tools` installs: from `.tools/venv/bin`, else `PATH`.
pub fn tool(name: &str) -> PathBuf {
    let local = workspace_root().join(".tools/venv/bin").join(name);
    if local.exists() {
        return local;
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: run scripts/install-tools (scripts/test does)");
}

/// The `(major, minor)` version of the nats-server the tests run.
pub fn nats_server_version() -> (u64, u64) {
    let out = Command::new(nats_server_bin())
        .arg("--version")
        .output()
        .expect("nats-server --version");
    // `nats-server: v2.12.8`
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.trim().rsplit('v').next().unwrap_or_default();
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// A path to one of the workspace's binaries, built next to this test binary.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --bins` first (scripts/test does)",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A nats-server of our own. Dropping it kills it and removes its store.
pub struct NatsServer {
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
    /// Arguments before ours (`-c nats.conf`, `--user`, ...).
    args: Vec<String>,
    /// Environment for the server (a configuration's `$VARIABLES`).
    envs: Vec<(String, String)>,
    /// Whether JetStream comes from our `-js -sd` flags; a configuration that enables it
    /// itself keeps its store relative to the server's directory, the temp store.
    js_flags: bool,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with(nats_server_bin())
    }

    /// Starts a particular nats-server build (to check how the engine treats other versions).
    pub fn start_with(bin: PathBuf) -> Self {
        Self::start_args(bin, Vec::new(), Vec::new(), true)
    }

    /// Starts the current nats-server (JetStream on) with extra arguments: users, a token.
    pub fn start_configured(args: &[&str]) -> Self {
        Self::start_args(
            nats_server_bin(),
            args.iter().map(|a| a.to_string()).collect(),
            Vec::new(),
            true,
        )
    }

    /// Starts the current nats-server with a configuration file that enables JetStream itself
    /// (store relative to the server's directory), and environment variables for it.
    pub fn start_with_conf(conf: &Path, envs: Vec<(String, String)>) -> Self {
        let conf = conf.to_str().expect("utf-8 path").to_string();
        Self::start_args(nats_server_bin(), vec!["-c".into(), conf], envs, false)
    }

    /// One node of a local JetStream cluster: its name, its route port, and the routes to
    /// every node.
    fn start_node(name: &str, route_port: u16, routes: &str) -> Self {
        let args = [
            "-n",
            name,
            "--cluster_name",
            "policy-e2e",
            "-cluster",
            &format!("nats://127.0.0.1:{route_port}"),
            "-routes",
            routes,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        Self::start_args(nats_server_bin(), args, Vec::new(), true)
    }

    fn start_args(
        bin: PathBuf,
        args: Vec<String>,
        envs: Vec<(String, String)>,
        js_flags: bool,
    ) -> Self {
        let mut s = NatsServer {
            bin,
            child: None,
            port: free_port(),
            store: tempfile::tempdir().expect("temp dir"),
            args,
            envs,
            js_flags,
        };
        s.spawn();
        s
    }

    /// Asks the server to reload its configuration (SIGHUP), as after `auth add-agent`.
    pub fn reload(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-HUP", &child.id().to_string()])
                .status();
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(&self.bin);
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)))
            .current_dir(self.store.path())
            .args(&self.args)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if self.js_flags {
            cmd.arg("-js").arg("-sd").arg(self.store.path());
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server, empties its store and starts it again on the same port: a server
    /// rebuilt after its disk was lost.
    pub fn restart_empty(&mut self) {
        self.stop();
        let entries = std::fs::read_dir(self.store.path()).expect("read the store");
        for path in entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
            std::fs::remove_dir_all(&path).expect("empty the store");
        }
        self.spawn();
    }

    /// Stops and starts the server on the same port and store, as an operator's restart would.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A local JetStream cluster of `n` nodes, named `node-0` ...: each its own server, port and
/// store, routed to the others.
pub fn start_cluster(n: usize) -> Vec<NatsServer> {
    let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let all = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    routes
        .iter()
        .enumerate()
        .map(|(i, p)| NatsServer::start_node(&format!("node-{i}"), *p, &all))
        .collect()
}

/// Waits until the cluster's JetStream has a meta leader (account info answers) and knows
/// `replicas` peers (a stream of that many replicas can be placed), so that the first process
/// does not spend its start retrying: a meta leader answers before every peer has reported
/// in, and until then an R3 bucket gets "no suitable peers for placement".
pub async fn wait_for_jetstream(url: &str, replicas: usize) {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url)
        .await
        .expect("connect to the cluster");
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    while js.query_account().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "JetStream never got a meta leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let probe = async_nats::jetstream::stream::Config {
        name: "E2E_PLACEMENT_PROBE".into(),
        subjects: vec!["_e2e.placement.probe".into()],
        num_replicas: replicas,
        storage: async_nats::jetstream::stream::StorageType::Memory,
        ..Default::default()
    };
    loop {
        match js.create_stream(probe.clone()).await {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "JetStream never placed a stream of {replicas} replicas: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = js.delete_stream("E2E_PLACEMENT_PROBE").await;
}

/// A running binary. Dropping it kills it.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited cleanly.
    pub fn terminate(mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A whole engine under test: a server, and the processes started against it.
pub struct Engine {
    pub nats: NatsServer,
    /// The other nodes, when the engine runs on a cluster.
    pub nodes: Vec<NatsServer>,
    pub prefix: String,
    procs: Vec<Proc>,
    /// On a secured bus: the directory `policyctl auth init` wrote the seeds and nats.conf to.
    pub auth: Option<AuthDir>,
    /// Whether processes and clients log in with `<role>.creds` (operator mode) rather than
    /// `<role>.nk`.
    pub creds: bool,
    /// Every process's stderr, one file each, to look for what they complained about.
    logs: tempfile::TempDir,
    /// Environment variables every process started from now on gets.
    pub env: Vec<(String, String)>,
}

/// Where a secured engine's seeds are: a temporary directory of its own, or one server's folder
/// of a fleet's (which lives as long as any engine of the fleet does).
#[derive(Clone)]
pub struct AuthDir {
    path: PathBuf,
    _keep: std::sync::Arc<tempfile::TempDir>,
}

impl AuthDir {
    pub fn new(root: std::sync::Arc<tempfile::TempDir>, folder: &str) -> Self {
        AuthDir {
            path: root.path().join(folder),
            _keep: root,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl From<tempfile::TempDir> for AuthDir {
    fn from(dir: tempfile::TempDir) -> Self {
        AuthDir {
            path: dir.path().to_path_buf(),
            _keep: std::sync::Arc::new(dir),
        }
    }
}

/// Writes the roles' seeds and nats.conf with the real `policyctl auth init`.
pub fn auth_init(dir: &Path) {
    let out = Command::new(bin("policyctl"))
        .args(["auth", "init", "--auth-dir"])
        .arg(dir)
        .output()
        .expect("run policyctl auth init");
    assert!(
        out.status.success(),
        "policyctl auth init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Engine {
    pub fn new() -> Self {
        Self::on(NatsServer::start())
    }

    pub fn on(nats: NatsServer) -> Self {
        Engine {
            nats,
            nodes: Vec::new(),
            prefix: "policy".into(),
            procs: Vec::new(),
            auth: None,
            creds: false,
            logs: tempfile::tempdir().expect("temp dir"),
            env: Vec::new(),
        }
    }

    /// An engine on a cluster: `node(0)` is `nats`, the rest are `nodes`; clients get every
    /// node's URL.
    pub fn on_cluster(mut nodes: Vec<NatsServer>) -> Self {
        let first = nodes.remove(0);
        let mut engine = Self::on(first);
        engine.nodes = nodes;
        engine
    }

    /// A node of the cluster (0 is `nats`).
    pub fn node(&mut self, i: usize) -> &mut NatsServer {
        if i == 0 {
            &mut self.nats
        } else {
            &mut self.nodes[i - 1]
        }
    }

    /// Every node's URL, comma-separated.
    pub fn url(&self) -> String {
        std::iter::once(&self.nats)
            .chain(&self.nodes)
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts a binary connected to one node only (it learns the others from the server, and
    /// goes to them if its node is lost).
    pub fn spawn_on(&mut self, node: usize, binary: &str, args: &[&str]) -> &Proc {
        let url = self.node(node).url();
        let log = self.logs.path().join(format!("{}.log", self.procs.len()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = self
            .command_with(binary, args, &Self::role_of(binary, args), &url)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}"));
        self.procs.push(Proc {
            name: format!("{binary} {} @node-{node}", args.join(" ")),
            child,
        });
        self.procs.last().expect("just pushed")
    }

    /// An engine on a secured bus: a server started with the generated users and
    /// permissions, and every process (and client) logging in with its own role's seed.
    pub fn secured() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        auth_init(dir.path());
        let conf = dir.path().join("nats.conf");
        let mut engine = Self::on(NatsServer::start_with_conf(&conf, Vec::new()));
        engine.auth = Some(dir.into());
        engine
    }

    /// As [`Self::secured`], in NATS's operator mode: `policyctl auth init --jwt` writes the
    /// operator, account and user JWTs, the server trusts the operator, and every process and
    /// client logs in with its `<role>.creds`.
    pub fn secured_by_jwt() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new(bin("policyctl"))
            .args(["auth", "init", "--jwt", "--auth-dir"])
            .arg(dir.path())
            .output()
            .expect("run policyctl auth init --jwt");
        assert!(
            out.status.success(),
            "policyctl auth init --jwt: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = dir.path().join("nats-jwt.conf");
        let mut engine = Self::on(NatsServer::start_with_conf(&conf, Vec::new()));
        engine.auth = Some(dir.into());
        engine.creds = true;
        engine
    }

    /// As [`Self::secured`], but the server runs the shipped template
    /// (`deploy/nats/policy-bus.conf`), each role's public key given in its variable, as an
    /// operator running their own NATS would.
    pub fn secured_by_template() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        auth_init(dir.path());
        let mut envs = Vec::new();
        for role in Role::shipped() {
            for store in [false, true] {
                if store && role.store_account().is_none() {
                    continue;
                }
                let stem = if store {
                    format!("{}.store", role.name())
                } else {
                    role.name()
                };
                let public = std::fs::read_to_string(dir.path().join(format!("{stem}.pub")))
                    .expect("public key file")
                    .trim()
                    .to_string();
                let mut var = format!(
                    "POLICY_NKEY_{}",
                    role.name().to_uppercase().replace('-', "_")
                );
                if store {
                    var.push_str("_STORE");
                }
                envs.push((var, public));
            }
        }
        // The operator's own configuration: JetStream, and the template included.
        std::fs::copy(
            workspace_root().join("deploy/nats/policy-bus.conf"),
            dir.path().join("policy-bus.conf"),
        )
        .expect("copy the template");
        let conf = dir.path().join("server.conf");
        std::fs::write(
            &conf,
            "jetstream { store_dir: \"jetstream\" }\ninclude policy-bus.conf\n",
        )
        .expect("write server.conf");
        let mut engine = Self::on(NatsServer::start_with_conf(&conf, envs));
        engine.auth = Some(dir.into());
        engine
    }

    /// `policyctl auth add-agent <kind>` on this secured bus, and a reload of the server so
    /// the kind's role (and everything that changes with it) goes live.
    pub fn add_agent_role(&mut self, kind: &str) -> PathBuf {
        let dir = self
            .auth
            .as_ref()
            .expect("a secured bus")
            .path()
            .to_path_buf();
        let out = Command::new(bin("policyctl"))
            .args(["auth", "add-agent", kind, "--auth-dir"])
            .arg(&dir)
            .output()
            .expect("policyctl auth add-agent");
        assert!(
            out.status.success(),
            "policyctl auth add-agent: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.nats.reload();
        dir
    }

    pub fn subjects(&self) -> Subjects {
        Subjects::new(&self.prefix).expect("prefix")
    }

    /// The seed file of a role on a secured bus.
    pub fn seed(&self, role: &Role) -> Option<PathBuf> {
        self.auth
            .as_ref()
            .map(|d| d.path().join(format!("{}.nk", role.name())))
    }

    /// The role a binary runs as: the dispatcher's, an agent kind's, else the operator's.
    fn role_of(binary: &str, args: &[&str]) -> Role {
        match (binary, args.first()) {
            ("policy-dispatcher", _) => Role::Dispatcher,
            ("policy-agent", Some(&"wasm")) => Role::WasmHost,
            ("policy-agent", Some(kind)) => {
                Role::of_kind(&bus::Kind::new(kind).expect("agent kind"))
            }
            ("policyctl", Some(&("emit" | "explain" | "test" | "bench"))) => Role::Gateway,
            _ => Role::Operator,
        }
    }

    /// The command line of a binary with the engine's `--nats-url` and `--prefix` (and, on a
    /// secured bus, its role's seed).
    pub fn command(&self, binary: &str, args: &[&str]) -> Command {
        self.command_as(binary, args, &Self::role_of(binary, args))
    }

    pub fn command_as(&self, binary: &str, args: &[&str], role: &Role) -> Command {
        self.command_with(binary, args, role, &self.url())
    }

    fn command_with(&self, binary: &str, args: &[&str], role: &Role, url: &str) -> Command {
        let mut cmd = Command::new(bin(binary));
        cmd.args(["--nats-url", url, "--prefix", &self.prefix]);
        if let Some(seed) = self.seed(role) {
            if self.creds {
                cmd.arg("--creds").arg(seed.with_extension("creds"));
            } else {
                cmd.arg("--nkey-file").arg(seed);
            }
        }
        cmd.args(args).env(
            "RUST_LOG",
            std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()),
        );
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    /// Starts a binary with the engine's `--nats-url` and `--prefix`. Its stderr is kept (see
    /// [`Self::logs`]).
    pub fn spawn(&mut self, binary: &str, args: &[&str]) -> &Proc {
        let log = self.logs.path().join(format!("{}.log", self.procs.len()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = self
            .command(binary, args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}"));
        self.procs.push(Proc {
            name: format!("{binary} {}", args.join(" ")),
            child,
        });
        self.procs.last().expect("just pushed")
    }

    /// What every process started so far wrote to stderr.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(self.logs.path()) {
            for e in entries.flatten() {
                all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        all
    }

    pub fn dispatcher(&mut self) -> &Proc {
        self.spawn("policy-dispatcher", &[])
    }

    pub fn agent(&mut self, kind: &str, args: &[&str]) -> &Proc {
        let mut all = vec![kind];
        all.extend_from_slice(args);
        self.spawn("policy-agent", &all)
    }

    /// Takes the first started process matching `name` still here, for a rolling restart.
    pub fn take_oldest(&mut self, name: &str) -> Proc {
        let i = self
            .procs
            .iter()
            .position(|p| p.name.starts_with(name))
            .unwrap_or_else(|| panic!("no process {name}"));
        self.procs.remove(i)
    }

    /// Takes the most recently started process matching `name`, to stop or restart it.
    pub fn take(&mut self, name: &str) -> Proc {
        let i = self
            .procs
            .iter()
            .rposition(|p| p.name.starts_with(name))
            .unwrap_or_else(|| panic!("no process {name}"));
        self.procs.remove(i)
    }

    /// SIGTERM to every process at once; for each, how long it took to exit (`None`: still
    /// running after `within`, then killed) and whether it exited cleanly.
    pub fn terminate_all(&mut self, within: Duration) -> Vec<(String, Option<Duration>, bool)> {
        let started = Instant::now();
        for p in &self.procs {
            let _ = Command::new("kill")
                .args(["-TERM", &p.child.id().to_string()])
                .status();
        }
        let mut results: Vec<(String, Option<Duration>, bool)> = self
            .procs
            .iter()
            .map(|p| (p.name.clone(), None, false))
            .collect();
        while Instant::now() < started + within {
            for (p, r) in self.procs.iter_mut().zip(results.iter_mut()) {
                if r.1.is_none() {
                    if let Ok(Some(status)) = p.child.try_wait() {
                        *r = (r.0.clone(), Some(started.elapsed()), status.success());
                    }
                }
            }
            if results.iter().all(|r| r.1.is_some()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.procs.clear();
        results
    }

    /// The processes that have exited (crashed, or stopped on their own), by name.
    pub fn exited(&mut self) -> Vec<String> {
        self.procs
            .iter_mut()
            .filter_map(|p| match p.child.try_wait() {
                Ok(Some(status)) => Some(format!("{} ({status})", p.name)),
                _ => None,
            })
            .collect()
    }

    /// Kills every process (not the server).
    pub fn kill_all(&mut self) {
        self.procs.clear();
    }

    /// A client; on a secured bus, the operator's.
    pub async fn client(&self) -> async_nats::Client {
        self.client_as(&Role::Operator).await
    }

    /// A client logged in as `role` (on an open bus, just a client with its inbox).
    pub async fn client_as(&self, role: &Role) -> async_nats::Client {
        self.watched_client(role).await.0
    }

    /// A client of `role`, and the errors the server reports to it (permission violations).
    pub async fn watched_client(
        &self,
        role: &Role,
    ) -> (
        async_nats::Client,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        self.identity(role, false).await
    }

    /// A client of `role`'s store identity on a secured bus (the one a process reaches
    /// JetStream with), and the errors the server reports to it; on an open bus, a client.
    pub async fn watched_store_client(
        &self,
        role: &Role,
    ) -> (
        async_nats::Client,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        self.identity(role, true).await
    }

    /// JetStream as `role` reaches `store`: through its store identity on a secured bus.
    pub async fn jetstream_as(
        &self,
        role: &Role,
        store: bus::store::Store,
    ) -> async_nats::jetstream::Context {
        let client = self.watched_store_client(role).await.0;
        bus::store::Jet::reach(&client, &self.subjects(), store)
            .await
            .expect("reach the store")
            .context()
    }

    async fn identity(
        &self,
        role: &Role,
        store: bool,
    ) -> (
        async_nats::Client,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let seed = self.seed(role).map(|path| {
            if store {
                path.with_file_name(format!("{}.store.nk", role.name()))
            } else {
                path
            }
        });
        let inbox = if store && self.auth.is_some() {
            role.store_inbox_prefix(&self.subjects())
        } else {
            role.inbox_prefix(&self.subjects())
        };
        let mut opts = match seed {
            Some(seed) if self.creds => {
                async_nats::ConnectOptions::with_credentials_file(seed.with_extension("creds"))
                    .await
                    .expect("creds file")
            }
            Some(seed) => {
                let text = std::fs::read_to_string(seed).expect("seed file");
                let seed = text
                    .lines()
                    .find(|l| l.starts_with("SU"))
                    .expect("a seed line");
                async_nats::ConnectOptions::with_nkey(seed.to_string())
            }
            None => async_nats::ConnectOptions::new(),
        };
        opts = opts
            .custom_inbox_prefix(inbox)
            .reconnect_delay_callback(bus::client::reconnect_delay)
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        let _ = tx.send(e.to_string());
                    }
                }
            });
        let client = opts
            .retry_on_initial_connect()
            .connect(
                self.url()
                    .split(',')
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
            )
            .await
            .expect("connect to test nats-server");
        (client, rx)
    }

    pub async fn hook(&self) -> Client {
        Client::new(self.client_as(&Role::Gateway).await, self.subjects())
    }

    pub async fn admin(&self) -> AdminClient {
        AdminClient::new(self.client_as(&Role::Operator).await, self.subjects())
    }

    /// Waits until `n` instances of a NATS service answer `$SRV.PING`.
    pub async fn wait_instances(&self, service: &str, n: usize) {
        let client = self.client().await;
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = bus::client::count_instances(&client, service, Duration::from_millis(150))
                .await
                .expect("ping");
            if seen >= n {
                return;
            }
            if Instant::now() >= deadline {
                // What the processes said is what tells why one never answered.
                let logs = self.logs();
                let tail: Vec<&str> = logs.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "{service}: {seen} of {n} instances answered; the processes' last lines:\n{}",
                    tail.join("\n")
                );
            }
        }
    }

    /// Starts a dispatcher and `n` instances of one agent kind (with `args`), and waits until
    /// all are ready.
    pub async fn start_scaled(&mut self, kind: &str, n: usize, args: &[&str]) {
        self.dispatcher();
        for _ in 0..n {
            self.agent(kind, args);
        }
        self.wait_instances(bus::headers::DISPATCHER_SERVICE, 1)
            .await;
        let kind = bus::Kind::new(kind).expect("kind");
        self.wait_instances(&bus::headers::agent_service(&kind), n)
            .await;
    }

    /// Starts a dispatcher and the given agent kinds and waits until all are ready.
    pub async fn start(&mut self, kinds: &[&str]) {
        self.dispatcher();
        for k in kinds {
            self.agent(k, &[]);
        }
        self.wait_instances(bus::headers::DISPATCHER_SERVICE, 1)
            .await;
        for k in kinds {
            let kind = bus::Kind::new(k).expect("kind");
            self.wait_instances(&bus::headers::agent_service(&kind), 1)
                .await;
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Processes first, so they do not log a lost server on their way out.
        self.procs.clear();
    }
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}
