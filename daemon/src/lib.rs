//! What every policy-bus process shares: the common flags of the contract (`--nats-url`,
//! `--prefix`), logging (human or JSON), the NATS connection, and the shutdown signal.
#![forbid(unsafe_code)]

pub mod service;
pub mod telemetry;
pub mod traces;

use std::path::PathBuf;
use std::time::Duration;

use bus::roles::Role;
use bus::Subjects;
pub use tokio_util::task::TaskTracker;

/// Flags every process takes, with the environment variables of the contract.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// NATS server URL; several, comma-separated, for a cluster. `tls://` requires TLS;
    /// `nats://user:password@host` logs in with a user and password.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true,
        hide_env_values = true
    )]
    pub nats_url: String,
    /// Subject prefix, so several engines can share one NATS system.
    #[arg(long, env = "POLICY_PREFIX", default_value = "policy", global = true)]
    pub prefix: String,
    /// Replicas of a bucket when this process is the one to create it (a NATS cluster
    /// wants 3).
    #[arg(long, env = "POLICY_KV_REPLICAS", default_value_t = 1, global = true)]
    pub kv_replicas: usize,
    /// Log JSON lines instead of human-readable text.
    #[arg(long, env = "POLICY_LOG_JSON", global = true)]
    pub log_json: bool,
    #[command(flatten)]
    pub auth: Auth,
}

/// How a process proves who it is to NATS, and how it trusts the server. At most one of
/// creds, nkey, user/password and token.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Auth {
    /// NATS credentials file (a user JWT and its nkey seed, as `nsc` writes them).
    #[arg(long, env = "NATS_CREDS", global = true, value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// File holding an nkey seed (`SU...`), as `policyctl auth init` writes one per role.
    #[arg(long, env = "NATS_NKEY_FILE", global = true, value_name = "FILE")]
    pub nkey_file: Option<PathBuf>,
    /// User name (the password comes from NATS_PASSWORD, or from the URL).
    #[arg(long, env = "NATS_USER", global = true)]
    pub user: Option<String>,
    /// Password for --user. Prefer the NATS_PASSWORD variable: arguments show in `ps`.
    #[arg(long, env = "NATS_PASSWORD", global = true, hide_env_values = true)]
    pub password: Option<String>,
    /// Authentication token. Prefer the NATS_TOKEN variable: arguments show in `ps`.
    #[arg(long, env = "NATS_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify the server with; implies TLS.
    #[arg(long, env = "NATS_TLS_CA_FILE", global = true, value_name = "FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for servers that verify clients; needs --tls-key-file.
    #[arg(long, env = "NATS_TLS_CERT_FILE", global = true, value_name = "FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "NATS_TLS_KEY_FILE", global = true, value_name = "FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Where this process's replies arrive. Default `_INBOX.<prefix>.<role>`, the inbox the
    /// role's permissions allow (see `policyctl auth`).
    #[arg(long, env = "NATS_INBOX_PREFIX", global = true)]
    pub inbox_prefix: Option<String>,
    /// The nkey seed of the role's store identity, through which the process reaches
    /// JetStream on a secured bus. Default: `<name>.store.nk` beside --nkey-file, if there.
    #[arg(long, env = "NATS_STORE_NKEY_FILE", global = true, value_name = "FILE")]
    pub store_nkey_file: Option<PathBuf>,
    /// Credentials file of the role's store identity. Default: `<name>.store.creds` beside
    /// --creds, if there.
    #[arg(long, env = "NATS_STORE_CREDS", global = true, value_name = "FILE")]
    pub store_creds: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Prefix(#[from] bus::error::InvalidName),
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// Redacted: no password or token.
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("NATS URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("{0}")]
    Auth(String),
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A URL list with every user name, password and token replaced by `***`: what may be
/// printed or logged.
pub fn redact(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let (scheme, rest) = match url.split_once("://") {
                Some((scheme, rest)) => (format!("{scheme}://"), rest),
                None => (String::new(), url),
            };
            let host_end = rest.find('/').unwrap_or(rest.len());
            match rest[..host_end].rfind('@') {
                Some(at) => format!("{scheme}***{}", &rest[at..]),
                None => url.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses a comma-separated URL list; an error names the URL, redacted.
pub fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, DaemonError> {
    let list: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if list.is_empty() {
        return Err(DaemonError::Url {
            url: String::new(),
            reason: "no URL given".into(),
        });
    }
    list.into_iter()
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| DaemonError::Url {
                    url: redact(u),
                    // The parser may quote the URL back: keep only what it says is wrong.
                    reason: redact_message(&e.to_string(), u),
                })
        })
        .collect()
}

/// Removes a secret-bearing URL (and its user information) from a message.
fn redact_message(message: &str, url: &str) -> String {
    let mut out = message.replace(url, &redact(url));
    if let Some(userinfo) = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split_once('@')
        .map(|(u, _)| u)
    {
        if !userinfo.is_empty() {
            out = out.replace(userinfo, "***");
        }
    }
    out
}

impl Common {
    pub fn subjects(&self) -> Result<Subjects, DaemonError> {
        Ok(Subjects::new(&self.prefix)?)
    }

    /// The URL list as it may be printed.
    pub fn redacted_url(&self) -> String {
        redact(&self.nats_url)
    }

    /// Connects to NATS as `role`. A long-running process (`retry`) waits for the server to
    /// come up and reconnects forever; a one-shot command fails at once with a message a person
    /// can act on.
    pub async fn connect(
        &self,
        name: &str,
        retry: bool,
        role: &Role,
    ) -> Result<async_nats::Client, DaemonError> {
        Ok(self.connect_watched(name, retry, role).await?.0)
    }

    /// [`Self::connect`], and the errors the server reports on the connection (a permissions
    /// violation above all): a one-shot command can fail with it at once instead of waiting for
    /// a reply that the server never let through.
    pub async fn connect_watched(
        &self,
        name: &str,
        retry: bool,
        role: &Role,
    ) -> Result<
        (
            async_nats::Client,
            tokio::sync::mpsc::UnboundedReceiver<String>,
        ),
        DaemonError,
    > {
        let addrs = server_addrs(&self.nats_url)?;
        let inbox = match &self.auth.inbox_prefix {
            Some(p) => p.clone(),
            None => role.inbox_prefix(&self.subjects()?),
        };
        let auth = self.auth.with_url_credentials(&addrs)?;
        self.connect_as(name, retry, auth, inbox).await
    }

    /// The connection through which the process reaches JetStream: its role's store identity
    /// when it has credentials for one (`--store-nkey-file`, `--store-creds`, or the files
    /// beside its own), else `main` itself (a plain bus, where everything shares one account).
    /// See `bus::store` for why a role's store access has an identity of its own.
    pub async fn connect_store(
        &self,
        name: &str,
        retry: bool,
        role: &Role,
        main: &async_nats::Client,
    ) -> Result<async_nats::Client, DaemonError> {
        let Some(auth) = self.auth.store_identity() else {
            return Ok(main.clone());
        };
        if role.store_account().is_none() {
            return Err(DaemonError::Auth(format!(
                "role {role} uses no JetStream store, so it has no store identity"
            )));
        }
        let inbox = role.store_inbox_prefix(&self.subjects()?);
        let (client, _) = self
            .connect_as(&format!("{name}-store"), retry, auth, inbox)
            .await?;
        Ok(client)
    }

    async fn connect_as(
        &self,
        name: &str,
        retry: bool,
        auth: Auth,
        inbox: String,
    ) -> Result<
        (
            async_nats::Client,
            tokio::sync::mpsc::UnboundedReceiver<String>,
        ),
        DaemonError,
    > {
        let (errors, reported) = tokio::sync::mpsc::unbounded_channel();
        let addrs = server_addrs(&self.nats_url)?;
        let name_owned = name.to_string();
        let mut opts = auth
            .options()
            .await?
            .name(name)
            .custom_inbox_prefix(inbox)
            .connection_timeout(Duration::from_secs(3))
            .reconnect_delay_callback(bus::client::reconnect_delay)
            .subscription_capacity(16 * 1024)
            .event_callback(move |event| {
                let name = name_owned.clone();
                let errors = errors.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => tracing::info!(%name, "connected to NATS"),
                        async_nats::Event::Disconnected => {
                            tracing::warn!(%name, "disconnected from NATS; reconnecting")
                        }
                        async_nats::Event::SlowConsumer(sid) => {
                            tracing::warn!(%name, sid, "slow consumer: messages were dropped")
                        }
                        async_nats::Event::ServerError(e) => {
                            let text = e.to_string();
                            if text.contains("Permissions Violation for Publish to \"_INBOX.") {
                                // An answer the server did not let through: the requester
                                // asked from an inbox that is not its role's.
                                tracing::warn!(%name, error = %text, "{FOREIGN_INBOX}");
                            } else {
                                tracing::warn!(%name, error = %text, "NATS server error");
                            }
                            let _ = errors.send(text);
                        }
                        other => tracing::info!(%name, event = %other, "NATS event"),
                    }
                }
            });
        if retry {
            opts = opts.retry_on_initial_connect();
        } else {
            opts = opts.max_reconnects(Some(3));
        }
        let client = opts
            .connect(addrs)
            .await
            .map_err(|source| DaemonError::Connect {
                url: self.redacted_url(),
                source,
            })?;
        Ok((client, reported))
    }
}

/// What a responder logs when the server refuses its answer to an inbox: on the secured bus a
/// role answers only the inboxes of the roles that may ask it, `_INBOX.<prefix>.<role>.>`.
pub const FOREIGN_INBOX: &str = "an answer was refused by the server: the requester asked from \
     an inbox outside its role's (_INBOX.<prefix>.<role>), so it gets no answer; a client must \
     set its role's inbox prefix (docs/security.md, \"Clients of the engine\")";

impl Auth {
    /// The login of the role's store identity, if it has one: the given store seed or
    /// credentials, or those beside the role's own (`x.nk` → `x.store.nk`, `x.creds` →
    /// `x.store.creds`), with the same TLS settings.
    pub fn store_identity(&self) -> Option<Auth> {
        let beside = |path: &Option<PathBuf>, ext: &str| {
            let path = path.as_ref()?;
            let stem = path.file_stem()?.to_str()?;
            let store = path.with_file_name(format!("{stem}.store.{ext}"));
            store.exists().then_some(store)
        };
        let nkey_file = self
            .store_nkey_file
            .clone()
            .or_else(|| beside(&self.nkey_file, "nk"));
        let creds = self
            .store_creds
            .clone()
            .or_else(|| beside(&self.creds, "creds"));
        if nkey_file.is_none() && creds.is_none() {
            return None;
        }
        Some(Auth {
            creds,
            nkey_file,
            user: None,
            password: None,
            token: None,
            store_nkey_file: None,
            store_creds: None,
            ..self.clone()
        })
    }

    fn has_login(&self) -> bool {
        self.creds.is_some()
            || self.nkey_file.is_some()
            || self.user.is_some()
            || self.token.is_some()
    }

    /// Takes a user and password (`nats://user:password@host`) or a token (`nats://token@host`)
    /// from the URLs, which async-nats would not send by itself. Credentials in both the URL and
    /// a flag are refused: which one wins would be a guess.
    pub fn with_url_credentials(
        &self,
        addrs: &[async_nats::ServerAddr],
    ) -> Result<Auth, DaemonError> {
        let Some(addr) = addrs.iter().find(|a| a.username().is_some()) else {
            return Ok(self.clone());
        };
        if self.has_login() {
            return Err(DaemonError::Auth(
                "credentials are given both in --nats-url and as flags or environment: give them once".into(),
            ));
        }
        let mut auth = self.clone();
        let user = percent_decode(addr.username().unwrap_or_default());
        match addr.password() {
            Some(password) => {
                auth.user = Some(user);
                auth.password = Some(percent_decode(password));
            }
            None => auth.token = Some(user),
        }
        Ok(auth)
    }

    /// The async-nats options for these credentials and TLS settings.
    pub async fn options(&self) -> Result<async_nats::ConnectOptions, DaemonError> {
        let given: Vec<&str> = [
            ("--creds", self.creds.is_some()),
            ("--nkey-file", self.nkey_file.is_some()),
            ("--user", self.user.is_some()),
            ("--token", self.token.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect();
        if given.len() > 1 {
            return Err(DaemonError::Auth(format!(
                "give one way to log in, not {}",
                given.join(" and ")
            )));
        }
        if self.password.is_some() && self.user.is_none() {
            return Err(DaemonError::Auth(
                "a password (NATS_PASSWORD) needs a user (--user or NATS_USER)".into(),
            ));
        }
        let mut opts = async_nats::ConnectOptions::new();
        if let Some(path) = &self.creds {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|source| DaemonError::Read {
                    what: "credentials file",
                    path: path.clone(),
                    source,
                })?;
        }
        if let Some(path) = &self.nkey_file {
            let text = std::fs::read_to_string(path).map_err(|source| DaemonError::Read {
                what: "nkey seed file",
                path: path.clone(),
                source,
            })?;
            let seed = seed_of(&text).ok_or_else(|| {
                DaemonError::Auth(format!(
                    "{} holds no nkey seed (a line starting with SU)",
                    path.display()
                ))
            })?;
            opts = opts.nkey(seed.to_string());
        }
        if let Some(user) = &self.user {
            opts = opts.user_and_password(user.clone(), self.password.clone().unwrap_or_default());
        }
        if let Some(token) = &self.token {
            opts = opts.token(token.clone());
        }
        if let Some(ca) = &self.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => {
                opts = opts
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true)
            }
            (None, None) => {}
            _ => {
                return Err(DaemonError::Auth(
                    "--tls-cert-file and --tls-key-file go together".into(),
                ))
            }
        }
        Ok(opts)
    }
}

/// Undoes a URL's percent-encoding (a password may hold `@` or `:` as `%40`, `%3A`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|b| hex(*b)),
            bytes.get(i + 2).and_then(|b| hex(*b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The seed in an nkey file: the first line that looks like a user seed (comments and blank
/// lines allowed around it).
fn seed_of(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("SU") && l.len() > 50)
}

/// An error and its causes on one line, each cause once (a message that already quotes its
/// cause does not get it again): what a failed process prints last.
pub fn one_line<'a>(chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>) -> String {
    let mut line = String::new();
    for cause in chain {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// How a long-running process ends: success, or its error and causes on one line after the
/// program's name, and a failure status.
pub fn exit<E: std::error::Error + 'static>(
    program: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let chain =
                std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                });
            eprintln!("{program}: {}", one_line(chain));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` filters (default `default_level`).
/// The runtime a daemon runs on. One worker (the default) is a current-thread runtime: a
/// dispatcher or agent mostly waits on one NATS socket, and handing each message between
/// threads cost more than the work (docs/performance.md: CPU per decision fell by a quarter).
/// More workers help a CPU-heavy kind on a host with cores to spare; more instances in the
/// queue group do too, and also survive a crash.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if worker_threads > 1 {
            b.worker_threads(worker_threads);
        }
        b.enable_all().build()
    }
}

/// Runs a daemon's `main` on [`runtime`], and exits as [`exit`] does.
pub fn main<E, F>(program: &str, worker_threads: usize, run: F) -> std::process::ExitCode
where
    E: std::error::Error + 'static,
    F: std::future::Future<Output = Result<(), E>>,
{
    traces::set_process(program);
    match runtime(worker_threads) {
        Ok(rt) => {
            let done = rt.block_on(run);
            traces::flush();
            exit(program, done)
        }
        Err(e) => {
            eprintln!("{program}: cannot start the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

pub fn init_logging(json: bool, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour only on a terminal: `docker logs` and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    // The spans of the engine's own crates go to OTLP whatever RUST_LOG keeps for the logs.
    let spans = tracing_subscriber::filter::Targets::new()
        .with_target("dispatcher", tracing::Level::INFO)
        .with_target("agents", tracing::Level::INFO);
    let otel = traces::layer().map(|l| l.with_filter(spans));
    tracing_subscriber::registry().with(fmt).with(otel).init();
}

/// Resolves on the first SIGINT or SIGTERM. A second one, a second or more later, exits at
/// once: an operator who presses Ctrl-C again does not want to wait for the drain. One that
/// comes right after the first is the same request twice (a terminal's Ctrl-C reaches the whole
/// process group, and `policyctl up` then sends its own SIGTERM) and is ignored.
pub async fn shutdown_signal() {
    signal().await;
    let first = tokio::time::Instant::now();
    tracing::info!("shutdown requested: finishing in-flight work (a second signal exits at once)");
    tokio::spawn(async move {
        loop {
            signal().await;
            if first.elapsed() >= Duration::from_secs(1) {
                tracing::warn!("second shutdown signal: exiting without finishing in-flight work");
                std::process::exit(130);
            }
        }
    });
}

async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops this process");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// How long in-flight work may take to finish after a shutdown signal.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// How long a shutdown waits for a lost NATS connection to come back before it abandons the
/// in-flight work that could not be answered without it.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(1);

/// Waits for `tracker`'s tasks to finish, then flushes NATS so the replies they sent leave the
/// process. It never hangs: past [`DRAIN_GRACE`], or when NATS has been unreachable for
/// [`RECONNECT_GRACE`] (nothing in flight could be answered anyway), it abandons what is left
/// and says how much.
pub async fn drain(tracker: &TaskTracker, client: &async_nats::Client) {
    use async_nats::connection::State;
    tracker.close();
    let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    loop {
        let tick = tokio::time::sleep(Duration::from_millis(50));
        tokio::select! {
            _ = tracker.wait() => break,
            _ = tick => {}
        }
        let now = tokio::time::Instant::now();
        if client.connection_state() == State::Connected {
            unreachable_since = None;
        } else if now - *unreachable_since.get_or_insert(now) >= RECONNECT_GRACE {
            tracing::warn!(
                abandoned = tracker.len(),
                "NATS is unreachable: abandoning in-flight work that could not be answered"
            );
            return;
        }
        if now >= deadline {
            tracing::warn!(
                abandoned = tracker.len(),
                "drain grace period over; abandoning in-flight work"
            );
            break;
        }
    }
    match tokio::time::timeout(RECONNECT_GRACE, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not flush NATS before exit"),
        Err(_) => tracing::warn!("could not flush NATS before exit: unreachable"),
    }
}

/// How long the endpoints may take to hand over what the server had already sent them, once
/// they are drained (a round trip to the server, normally).
pub const DRAIN_WINDOW: Duration = Duration::from_secs(2);

/// A serving loop's way out: on the shutdown signal it drains every endpoint, so the server
/// routes new requests to the other instances while those already sent still arrive here and
/// are answered; the loop ends when the endpoints end, or at the deadline (without NATS the
/// endpoints never end: the deadline is then now).
#[derive(Debug, Default)]
pub struct Drain {
    deadline: Option<tokio::time::Instant>,
}

impl Drain {
    pub fn started(&self) -> bool {
        self.deadline.is_some()
    }

    /// When the loop should stop waiting for the endpoints to end.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline
    }

    pub async fn start(
        &mut self,
        client: &async_nats::Client,
        endpoints: &mut [&mut service::Endpoint],
    ) {
        let now = tokio::time::Instant::now();
        if client.connection_state() != async_nats::connection::State::Connected {
            tracing::warn!("NATS is unreachable: not draining the endpoints");
            self.deadline = Some(now);
            return;
        }
        for e in endpoints.iter_mut() {
            if let Err(err) = e.drain().await {
                tracing::warn!(endpoint = e.name, error = %err, "could not drain the endpoint");
            }
        }
        self.deadline = Some(now + DRAIN_WINDOW);
    }
}

/// Resolves at `deadline`, or never without one.
pub async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn one_line_quotes_each_cause_once() {
        let e = Outer(Inner);
        let chain = std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        });
        assert_eq!(one_line(chain), "outer: inner");
    }

    #[test]
    fn secrets_never_survive_redaction() {
        assert_eq!(
            redact("nats://alice:s3cret@h1:4222, tls://tok3n@h2:4443/x,nats://h3"),
            "nats://***@h1:4222,tls://***@h2:4443/x,nats://h3"
        );
        assert_eq!(redact("bob:pw@host:4222"), "***@host:4222");
        let err = server_addrs("nats://alice:s3cret@h1:notaport")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret") && !err.contains("alice"), "{err}");
        assert_eq!(server_addrs("nats://a:1, nats://b:2,").unwrap().len(), 2);
        assert!(server_addrs(" , ").is_err());
    }

    #[test]
    fn url_credentials_become_a_login() {
        let addrs = server_addrs("nats://h1,nats://al%40ice:p%3Aw@h2").unwrap();
        let auth = Auth::default().with_url_credentials(&addrs).unwrap();
        assert_eq!(auth.user.as_deref(), Some("al@ice"));
        assert_eq!(auth.password.as_deref(), Some("p:w"));
        let addrs = server_addrs("tls://t0ken@h1").unwrap();
        let auth = Auth::default().with_url_credentials(&addrs).unwrap();
        assert_eq!(auth.token.as_deref(), Some("t0ken"));
        let twice = Auth {
            token: Some("x".into()),
            ..Default::default()
        };
        assert!(twice.with_url_credentials(&addrs).is_err());
    }

    #[test]
    fn nkey_files_may_carry_comments() {
        let seed = "SUAGMJH5XLGZKQQWAWKRZJIGMOU4HPFUYLXJMXOO5NLFEO2OOQJ5LPRDPM";
        assert_eq!(seed_of(&format!("# role: gateway\n\n{seed}\n")), Some(seed));
        assert_eq!(seed_of("not a seed"), None);
    }
}
