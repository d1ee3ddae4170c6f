//! `--metrics-addr`: every process serves `GET /metrics`, `GET /healthz` and `GET /readyz` on
//! one small HTTP/1.1 listener (one request per connection, no keep-alive: a full HTTP stack
//! would cost more to build than the rest of an agent).
//!
//! `/metrics` answers in the format the scraper asks for: OpenMetrics when its `Accept` names
//! `application/openmetrics-text` (what Prometheus asks first), else the Prometheus text format
//! 0.0.4, which the classic parsers (promtool, older scrapers) read. `prometheus-client` writes
//! OpenMetrics only, so the text format is derived from it ([`to_prometheus_text`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Caps the distinct values of one metric label: label values come from the network (event,
/// service and agent names anyone may send), and every value is a time series. Past `limit`
/// values, the rest count as `other`.
pub struct Names {
    seen: Mutex<std::collections::HashSet<String>>,
    limit: usize,
}

impl Names {
    pub fn new(limit: usize) -> Names {
        Names {
            seen: Mutex::default(),
            limit,
        }
    }

    pub fn admit(&self, name: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(name) {
            return name.to_string();
        }
        if seen.len() < self.limit {
            seen.insert(name.to_string());
            return name.to_string();
        }
        "other".to_string()
    }
}

/// What `/readyz` checks: connected to NATS, configuration loaded, serving.
#[derive(Default)]
pub struct Readiness {
    nats: OnceLock<async_nats::Client>,
    loaded: AtomicBool,
    serving: AtomicBool,
    stopping: AtomicBool,
}

impl Readiness {
    pub fn connected(&self, client: &async_nats::Client) {
        let _ = self.nats.set(client.clone());
    }
    /// The configuration (subscriptions, policies) is loaded.
    pub fn loaded(&self) {
        self.loaded.store(true, Ordering::Relaxed);
    }
    /// The process takes requests.
    pub fn serving(&self) {
        self.serving.store(true, Ordering::Relaxed);
    }
    /// Draining for shutdown: not ready for new work.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// `Ok` when ready, else what is missing.
    pub fn check(&self) -> Result<(), String> {
        let Some(nats) = self.nats.get() else {
            return Err("not connected to NATS yet".into());
        };
        if nats.connection_state() != async_nats::connection::State::Connected {
            return Err(format!(
                "not connected to NATS ({:?})",
                nats.connection_state()
            ));
        }
        if !self.loaded.load(Ordering::Relaxed) {
            return Err("configuration not loaded yet".into());
        }
        if !self.serving.load(Ordering::Relaxed) {
            return Err("not serving yet".into());
        }
        if self.stopping.load(Ordering::Relaxed) {
            return Err("stopping: draining in-flight work".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    process: String,
    version: String,
}

/// Another exposition to append to the process's own: a component that keeps its own
/// registry (the monitor's families).
pub type Source = Box<dyn Fn() -> String + Send + Sync>;

/// A page a component adds to the listener (the monitor's live page): its path, content
/// type and body, made fresh for each request.
pub struct Page {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: Box<dyn Fn() -> String + Send + Sync>,
}

/// A process's metrics and readiness.
pub struct Telemetry {
    registry: Mutex<Registry>,
    sources: Mutex<Vec<Source>>,
    pages: Mutex<Vec<Page>>,
    pub ready: Readiness,
}

impl Telemetry {
    /// A registry with every name under `policy_`, and `policy_build_info{process, version}`.
    pub fn new(process: &str) -> Arc<Telemetry> {
        let mut registry = Registry::with_prefix("policy");
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                process: process.into(),
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register(
            "build_info",
            "The process and its version (always 1)",
            build,
        );
        Arc::new(Telemetry {
            registry: Mutex::new(registry),
            sources: Mutex::new(Vec::new()),
            pages: Mutex::new(Vec::new()),
            ready: Readiness::default(),
        })
    }

    /// Registers metrics with the process's registry (under `policy_`).
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Serves another page on the listener.
    pub fn add_page(&self, page: Page) {
        self.pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(page);
    }

    /// Appends another exposition (OpenMetrics, ending in `# EOF`) to this process's.
    pub fn add_source(&self, source: Source) {
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(source);
    }

    /// The metrics in OpenMetrics: the registry's, then every source's, one `# EOF` at the end.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        {
            let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
                tracing::warn!(error = %e, "cannot encode metrics");
            }
        }
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        for source in sources.iter() {
            if let Some(body) = out.strip_suffix("# EOF\n") {
                out.truncate(body.len());
            }
            out.push_str(&source());
        }
        out
    }

    /// Binds `addr` and serves until the process ends.
    pub async fn serve(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<()> {
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        tokio::spawn(accept(listener, self.clone()));
        Ok(())
    }
}

async fn accept(listener: TcpListener, telemetry: Arc<Telemetry>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let telemetry = telemetry.clone();
                tokio::spawn(async move {
                    let answered =
                        tokio::time::timeout(Duration::from_secs(5), answer(stream, &telemetry));
                    if answered.await.is_err() {
                        tracing::debug!("metrics request timed out");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener error");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The status, content type and body for a request head.
pub fn respond(head: &str, telemetry: &Telemetry) -> (&'static str, &'static str, String) {
    let mut lines = head.lines();
    let mut parts = lines.next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("accept"))
        .map(|(_, v)| v.to_ascii_lowercase())
        .unwrap_or_default();
    let text = "text/plain; charset=utf-8";
    match (method, path) {
        ("GET", "/metrics") => {
            let body = telemetry.encode();
            if accept.contains("application/openmetrics-text") {
                ("200 OK", OPENMETRICS, body)
            } else {
                ("200 OK", PROMETHEUS_TEXT, to_prometheus_text(&body))
            }
        }
        ("GET", "/healthz") => ("200 OK", text, "ok\n".into()),
        ("GET", "/readyz") => match telemetry.ready.check() {
            Ok(()) => ("200 OK", text, "ready\n".into()),
            Err(why) => (
                "503 Service Unavailable",
                text,
                format!("not ready: {why}\n"),
            ),
        },
        ("GET", path) => {
            let pages = telemetry.pages.lock().unwrap_or_else(|e| e.into_inner());
            match pages.iter().find(|p| p.path == path) {
                Some(page) => ("200 OK", page.content_type, (page.body)()),
                None => (
                    "404 Not Found",
                    text,
                    "not found: GET /metrics, /healthz or /readyz\n".into(),
                ),
            }
        }
        _ => ("405 Method Not Allowed", text, "only GET\n".into()),
    }
}

async fn answer(mut stream: TcpStream, telemetry: &Telemetry) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let (status, content_type, body) = respond(&head, telemetry);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The Prometheus text format 0.0.4 of an OpenMetrics exposition. They differ where a classic
/// parser would misread: a counter family is named without `_total` in OpenMetrics but with it
/// in the text format (else every `_total` sample reads as an untyped metric with no help),
/// `info` families become gauges named `_info`, and `# UNIT` and `# EOF` are OpenMetrics only.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut renamed = std::collections::HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            match rest.split_once(' ') {
                Some((name, "counter")) => {
                    renamed.insert(name.to_string(), (format!("{name}_total"), "counter"));
                }
                Some((name, "info")) => {
                    renamed.insert(name.to_string(), (format!("{name}_info"), "gauge"));
                }
                _ => {}
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("HELP", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("TYPE", r)));
        match meta {
            Some((what, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                match renamed.get(name) {
                    Some((new, ty)) if what == "TYPE" => {
                        out.push_str(&format!("# TYPE {new} {ty}"))
                    }
                    Some((new, _)) => out.push_str(&format!("# HELP {new} {tail}")),
                    None => out.push_str(line),
                }
            }
            // An exemplar (` # {...}`) is OpenMetrics only.
            None => out.push_str(line.split(" # ").next().unwrap_or(line)),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn counters_are_named_with_total_in_the_text_format() {
        let om = "# HELP policy_decisions Decisions by event.\n# TYPE policy_decisions counter\npolicy_decisions_total{event=\"a\"} 3\n# HELP policy_up Up.\n# TYPE policy_up gauge\npolicy_up 1\n# EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP policy_decisions_total Decisions by event.\n# TYPE policy_decisions_total counter\npolicy_decisions_total{event=\"a\"} 3\n# HELP policy_up Up.\n# TYPE policy_up gauge\npolicy_up 1\n"
        );
    }

    #[test]
    fn metrics_are_negotiated_and_health_answers() {
        let t = Telemetry::new("test");
        let c: Counter = Counter::default();
        c.inc();
        t.register(|r| r.register("things", "Things seen", c.clone()));
        let get = |path: &str, accept: &str| {
            respond(
                &format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n"),
                &t,
            )
        };
        let (status, ty, body) = get("/metrics", "application/openmetrics-text;version=1.0.0");
        assert_eq!((status, ty), ("200 OK", OPENMETRICS));
        assert!(body.contains("# TYPE policy_things counter") && body.ends_with("# EOF\n"));
        let (_, ty, body) = get("/metrics", "text/plain;version=0.0.4");
        assert_eq!(ty, PROMETHEUS_TEXT);
        assert!(
            body.contains("# TYPE policy_things_total counter"),
            "{body}"
        );
        assert!(
            body.contains("policy_build_info{process=\"test\""),
            "{body}"
        );
        assert!(!body.contains("# EOF"));
        assert_eq!(get("/healthz", "*/*").0, "200 OK");
        let (status, _, body) = get("/readyz", "*/*");
        assert_eq!(status, "503 Service Unavailable");
        assert!(body.contains("not connected"), "{body}");
        assert_eq!(get("/nope", "*/*").0, "404 Not Found");
    }
}
