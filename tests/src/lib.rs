//! Test harness: starts a real `nats-server` (JetStream on, temp store, free port) and the
//! real policy-bus binaries, and kills them and their store on drop. Never a mock.
#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bus::{AdminClient, Client, Subjects};

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

fn free_port() -> u16 {
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
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with(nats_server_bin())
    }

    /// Starts a particular nats-server build (to check how the engine treats other versions).
    pub fn start_with(bin: PathBuf) -> Self {
        let mut s = NatsServer {
            bin,
            child: None,
            port: free_port(),
            store: tempfile::tempdir().expect("temp dir"),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
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

/// A running binary. Dropping it kills it.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
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
    pub prefix: String,
    procs: Vec<Proc>,
}

impl Engine {
    pub fn new() -> Self {
        Self::on(NatsServer::start())
    }

    pub fn on(nats: NatsServer) -> Self {
        Engine {
            nats,
            prefix: "policy".into(),
            procs: Vec::new(),
        }
    }

    pub fn subjects(&self) -> Subjects {
        Subjects::new(&self.prefix).expect("prefix")
    }

    /// The command line of a binary with the engine's `--nats-url` and `--prefix`.
    pub fn command(&self, binary: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin(binary));
        cmd.args(["--nats-url", &self.nats.url(), "--prefix", &self.prefix])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()),
            );
        cmd
    }

    /// Starts a binary with the engine's `--nats-url` and `--prefix`.
    pub fn spawn(&mut self, binary: &str, args: &[&str]) -> &Proc {
        let child = self
            .command(binary, args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}"));
        self.procs.push(Proc {
            name: format!("{binary} {}", args.join(" ")),
            child,
        });
        self.procs.last().expect("just pushed")
    }

    pub fn dispatcher(&mut self) -> &Proc {
        self.spawn("policy-dispatcher", &[])
    }

    pub fn agent(&mut self, kind: &str, args: &[&str]) -> &Proc {
        let mut all = vec![kind];
        all.extend_from_slice(args);
        self.spawn("policy-agent", &all)
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

    /// Kills every process (not the server).
    pub fn kill_all(&mut self) {
        self.procs.clear();
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(self.nats.url())
            .await
            .expect("connect to test nats-server")
    }

    pub async fn hook(&self) -> Client {
        Client::new(self.client().await, self.subjects())
    }

    pub async fn admin(&self) -> AdminClient {
        AdminClient::new(self.client().await, self.subjects())
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
            assert!(
                Instant::now() < deadline,
                "{service}: {seen} of {n} instances answered"
            );
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
