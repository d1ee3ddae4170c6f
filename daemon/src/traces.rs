//! Traces over OTLP, when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: every process exports one span per hop (the
//! dispatcher's decision, each agent's answer) over OTLP/HTTP with JSON, all in the trace that
//! the hookpoint's `traceparent` started, which every hop carries. Without the variable
//! nothing is set up and no span is made on the decision path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
static PROCESS: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// The name spans are exported under (`service.name`), unless `OTEL_SERVICE_NAME` says.
pub fn set_process(name: &str) {
    *PROCESS.lock().unwrap_or_else(|e| e.into_inner()) = Some(name.to_string());
}

/// Whether spans are exported: the decision path makes its spans only then.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()))
}

/// The OpenTelemetry layer for the process's subscriber, when OTLP is configured.
pub(crate) fn layer<S>(
) -> Option<tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    if !configured() {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("traces: cannot set up the OTLP exporter ({e}); exporting none");
            return None;
        }
    };
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .or_else(|| PROCESS.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .unwrap_or_else(|| "policy-bus".into());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name.clone())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(name);
    let _ = PROVIDER.set(provider);
    ENABLED.store(true, Ordering::Relaxed);
    Some(tracing_opentelemetry::layer().with_tracer(tracer))
}

/// Sends what is still buffered; called once the process has stopped its work.
pub(crate) fn flush() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
        let _ = p.shutdown();
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        Vec::new()
    }
}

/// Makes `span` a child of the span a message's `traceparent` names, so that every hop's span
/// is in the hookpoint's trace.
pub fn follow(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if let Some(headers) = headers {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let _ = span.set_parent(parent);
    }
}
