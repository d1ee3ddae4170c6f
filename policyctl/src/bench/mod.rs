//! `policyctl bench`: a closed-loop load generator. It first measures the raw NATS
//! request/reply floor (an echo responder on a private subject, same payload, same
//! concurrency), then the engine, in the same run, and reports both and their ratio, so a
//! figure means the same on any machine. Decisions are told apart from errors, and denies
//! from allows; the CPU each engine process on this host spent per request is measured too.

mod chain;
mod cpu;
pub mod sample;

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use async_nats::HeaderMap;
use bus::client::{call, ClientError};
use bus::state::{keys, State};
use bus::AdminClient;
use bus::{Subjects, Value};
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;

pub use chain::ChainSpec;

#[derive(Debug, Serialize)]
struct Figures {
    per_second: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Answers: decisions (allow or deny), or echoes for the floor.
    requests: u64,
    /// Decisions that were denies (counted in `requests`).
    denies: u64,
    /// Requests that got no decision: an error reply, a timeout.
    errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_deny: Option<String>,
    /// CPU per request of each engine process seen on this host.
    cpu: Vec<cpu::Cost>,
}

#[derive(Default)]
struct Tally {
    hist: Option<Histogram<u64>>,
    denies: u64,
    errors: u64,
    first_error: Option<String>,
    first_deny: Option<String>,
}

impl Tally {
    fn add(&mut self, t: Tally) {
        self.errors += t.errors;
        self.denies += t.denies;
        if self.first_error.is_none() {
            self.first_error = t.first_error;
        }
        if self.first_deny.is_none() {
            self.first_deny = t.first_deny;
        }
        match (&mut self.hist, t.hist) {
            (Some(h), Some(other)) => {
                let _ = h.add(other);
            }
            (None, other) => self.hist = other,
            _ => {}
        }
    }
}

fn figures(t: Tally, elapsed: Duration, cpu: Vec<cpu::Cost>) -> Figures {
    let h = t
        .hist
        .unwrap_or_else(|| Histogram::new(3).expect("histogram"));
    let ms = |us: u64| us as f64 / 1000.0;
    Figures {
        per_second: h.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
        requests: h.len(),
        denies: t.denies,
        errors: t.errors,
        first_error: t.first_error,
        first_deny: t.first_deny,
        cpu,
    }
}

/// The reasons of a denied decision, or `None` for any other answer.
fn denied(reply: &async_nats::Message) -> Option<String> {
    let state = State::decode(&reply.payload).ok()?;
    if state.get_str(keys::ACTION) != Some("deny") {
        return None;
    }
    Some(match state.get(keys::REASONS) {
        Some(r) => serde_json::to_string(r).unwrap_or_else(|_| format!("{r}")),
        None => "no reason given".into(),
    })
}

/// The event's payload, made afresh for each request: a `new-connection` gets its own
/// connection id each time, as a gateway's connections do (the same id would be one connection
/// asked about again, which a limiter answers without taking a new slot). The id is the map's
/// last entry, so a copy of the encoded bytes with the id's last bytes replaced will do.
#[derive(Clone)]
struct Payloads {
    encoded: Bytes,
    /// Bytes at the end of `encoded` to overwrite with a new id, 0 for a fixed payload.
    id_len: usize,
}

impl Payloads {
    fn new(event: &str, attributes: &State) -> anyhow::Result<Self> {
        let fresh_ids =
            event == bus::event::NEW_CONNECTION && attributes.get(keys::CONNECTION_ID).is_none();
        let mut entries: Vec<(Value, Value)> = attributes
            .0
            .iter()
            .map(|(k, v)| (Value::from(k.as_str()), v.clone()))
            .collect();
        let placeholder = bus::event::new_id();
        if fresh_ids {
            entries.push((
                Value::from(keys::CONNECTION_ID),
                Value::from(placeholder.as_str()),
            ));
        }
        let encoded = bus::codec::encode("event attributes", &Value::Map(entries))?;
        Ok(Payloads {
            encoded: encoded.into(),
            id_len: if fresh_ids { placeholder.len() } else { 0 },
        })
    }

    fn next(&self) -> Bytes {
        if self.id_len == 0 {
            return self.encoded.clone();
        }
        let mut bytes = self.encoded.to_vec();
        let at = bytes.len() - self.id_len;
        let id = bus::event::new_id();
        bytes[at..].copy_from_slice(&id.as_bytes()[..self.id_len]);
        bytes.into()
    }
}

/// Runs `concurrency` workers that each send a request, wait for the answer and repeat, until
/// `duration` is over. Only answers are timed; with `decisions`, a deny is counted as such.
async fn phase(
    nats: &async_nats::Client,
    subject: &str,
    payloads: &Payloads,
    headers: &HeaderMap,
    concurrency: usize,
    duration: Duration,
    decisions: bool,
) -> Figures {
    let procs = cpu::engine_processes();
    let before = cpu::sample(&procs);
    // Resident memory, sampled while the load runs.
    let peak = std::sync::Arc::new(std::sync::Mutex::new(cpu::PeakRss::default()));
    let sampler = {
        let (peak, procs) = (peak.clone(), procs.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(mut p) = peak.lock() {
                    p.sample(&procs);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let start = Instant::now();
    let deadline = start + duration;
    let workers = (0..concurrency.max(1)).map(|_| {
        let (nats, subject, payloads) = (nats.clone(), subject.to_string(), payloads.clone());
        let headers = headers.clone();
        tokio::spawn(async move {
            let mut t = Tally {
                hist: Some(Histogram::new(3).expect("histogram")),
                ..Default::default()
            };
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let r = call(
                    &nats,
                    subject.clone(),
                    headers.clone(),
                    payloads.next(),
                    Duration::from_secs(5),
                )
                .await;
                match r {
                    Ok(reply) => {
                        let us = t0.elapsed().as_micros() as u64;
                        if let Some(h) = t.hist.as_mut() {
                            let _ = h.record(us.max(1));
                        }
                        if decisions {
                            if let Some(why) = denied(&reply) {
                                t.denies += 1;
                                t.first_deny.get_or_insert(why);
                            }
                        }
                    }
                    Err(e) => {
                        t.errors += 1;
                        t.first_error.get_or_insert_with(|| e.to_string());
                        if matches!(e, ClientError::NoResponders { .. }) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
            t
        })
    });
    let mut total = Tally::default();
    for t in futures::future::join_all(workers)
        .await
        .into_iter()
        .flatten()
    {
        total.add(t);
    }
    let elapsed = start.elapsed();
    let answered = total.hist.as_ref().map_or(0, |h| h.len());
    sampler.abort();
    let after = cpu::sample(&procs);
    let costs = match peak.lock() {
        Ok(peak) => cpu::costs(&before, &after, &peak, answered, elapsed),
        Err(_) => Vec::new(),
    };
    figures(total, elapsed, costs)
}

/// What to run: the event, its attributes, the load, and optionally the chain to bench.
pub struct Options {
    pub event: String,
    pub attributes: State,
    pub concurrency: usize,
    pub duration: Duration,
    pub json: bool,
    pub chain: Option<ChainSpec>,
    /// The operator's login for `--chain` on a secured bus (the load itself runs as a gateway).
    pub operator_nkey_file: Option<std::path::PathBuf>,
    /// Send every event as a dry run: the limiters take nothing.
    pub dry_run: bool,
}

/// An admin client for `--chain`: the operator's role, with its own login when given.
async fn operator(
    common: &daemon::Common,
    nkey_file: Option<&std::path::Path>,
) -> anyhow::Result<AdminClient> {
    let mut common = common.clone();
    if let Some(f) = nkey_file {
        common.auth.nkey_file = Some(f.to_path_buf());
        common.auth.inbox_prefix = None;
    }
    let nats = common
        .connect("policyctl-bench-chain", false, &bus::roles::Role::Operator)
        .await
        .context(
            "connecting as the operator to set the chain (--operator-nkey-file on a secured bus)",
        )?;
    Ok(AdminClient::new(nats, common.subjects()?))
}

/// Runs the bench; with a chain, sets it first and puts the old one back after, whatever
/// happens (an error, Ctrl-C).
pub async fn run(
    common: &daemon::Common,
    nats: &async_nats::Client,
    subjects: &Subjects,
    options: Options,
) -> anyhow::Result<()> {
    let Some(spec) = options.chain.clone() else {
        return measure(common, nats, subjects, &options).await;
    };
    let admin = operator(common, options.operator_nkey_file.as_deref()).await?;
    if !options.json {
        eprintln!(
            "policyctl bench: setting the chain of {} to {spec} for this run; the old one is put back after",
            options.event
        );
    }
    let saved = chain::apply(&admin, &options.event, &spec).await?;
    let result = tokio::select! {
        r = measure(common, nats, subjects, &options) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let restored = chain::restore(&admin, &saved)
        .await
        .context("putting the event's old chain back (check `policyctl subscriptions`)");
    result.and(restored)
}

/// The floor phase, then the engine phase, each after a warm-up, and the report.
async fn measure(
    common: &daemon::Common,
    nats: &async_nats::Client,
    subjects: &Subjects,
    options: &Options,
) -> anyhow::Result<()> {
    let Options {
        event,
        attributes,
        concurrency,
        duration,
        json,
        dry_run,
        ..
    } = options;
    let (concurrency, duration, json) = (*concurrency, *duration, *json);
    let payloads = Payloads::new(event, attributes)?;
    // Both phases carry the same headers, so the floor moves the same bytes.
    let mut headers = HeaderMap::new();
    if *dry_run {
        headers.insert(bus::headers::POLICY_DRY_RUN, "true");
    }
    // A first event checks the engine answers before load is put on it.
    call(
        nats,
        subjects.event(event),
        headers.clone(),
        payloads.next(),
        Duration::from_secs(5),
    )
    .await
    .with_context(|| {
        format!("the engine does not decide {event}; is it up with a subscription to it?")
    })?;

    // The echo responder gets its own connection, like a separate process would.
    let echo = common
        .connect("policyctl-bench-echo", false, &bus::roles::Role::Gateway)
        .await?;
    let echo_subject = subjects.bench_echo(&bus::event::new_id());
    let mut sub = echo.subscribe(echo_subject.clone()).await?;
    let responder = {
        let echo = echo.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                // The floor answers as the engine does: inboxes only.
                match msg.reply {
                    Some(reply) if bus::subject::is_inbox(&reply) => {
                        let _ = echo.publish(reply, msg.payload).await;
                    }
                    Some(reply) => daemon::service::refuse_reply(
                        "bench-echo",
                        &msg.subject,
                        &reply,
                        msg.headers.as_ref(),
                    ),
                    None => {}
                }
            }
        })
    };
    echo.flush().await?;

    if !json {
        eprintln!(
            "policyctl bench: {event}, concurrency {concurrency}, {} per phase",
            humantime::format_duration(duration)
        );
    }
    let warm = Duration::from_millis(500).min(duration);
    let engine_subject = subjects.event(event);
    let h = &headers;
    phase(nats, &echo_subject, &payloads, h, concurrency, warm, false).await;
    let floor = phase(
        nats,
        &echo_subject,
        &payloads,
        h,
        concurrency,
        duration,
        false,
    )
    .await;
    responder.abort();
    phase(nats, &engine_subject, &payloads, h, concurrency, warm, true).await;
    let engine = phase(
        nats,
        &engine_subject,
        &payloads,
        h,
        concurrency,
        duration,
        true,
    )
    .await;
    if floor.requests == 0 {
        return Err(anyhow!("the floor measurement got no answers"));
    }
    // A decision through N stages is N + 1 request/reply hops; the fair floor is that many.
    let hops = options.chain.as_ref().map(|c| c.0.len() + 1);
    report(event, concurrency, duration, json, hops, &floor, &engine)
}

fn report(
    event: &str,
    concurrency: usize,
    duration: Duration,
    json: bool,
    hops: Option<usize>,
    floor: &Figures,
    engine: &Figures,
) -> anyhow::Result<()> {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    // Against the floor of as many hops as the chain makes: throughput against floor / hops,
    // p50 against floor × hops.
    let per_hop = hops.map(|h| {
        let h = h as f64;
        (
            ratio(engine.per_second, floor.per_second / h),
            ratio(engine.p50_ms, floor.p50_ms * h),
        )
    });
    if json {
        let out = serde_json::json!({
            "event": event,
            "concurrency": concurrency,
            "duration_s": duration.as_secs_f64(),
            "floor": floor,
            "engine": engine,
            "ratio": {
                "throughput": ratio(engine.per_second, floor.per_second),
                "p50": ratio(engine.p50_ms, floor.p50_ms),
                "p90": ratio(engine.p90_ms, floor.p90_ms),
                "p99": ratio(engine.p99_ms, floor.p99_ms),
            },
            "hops": hops,
            "ratio_to_hop_floor": per_hop.map(|(t, p)| serde_json::json!({"throughput": t, "p50": p})),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<22} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "denies", "errors"
    );
    for (name, f) in [("nats floor (echo)", floor), (event, engine)] {
        println!(
            "{:<22} {:>11.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8} {:>7}",
            name, f.per_second, f.p50_ms, f.p90_ms, f.p99_ms, f.max_ms, f.denies, f.errors
        );
    }
    println!(
        "{:<22} {:>10.3}x {:>7.2}x {:>7.2}x {:>7.2}x",
        "engine / floor",
        ratio(engine.per_second, floor.per_second),
        ratio(engine.p50_ms, floor.p50_ms),
        ratio(engine.p90_ms, floor.p90_ms),
        ratio(engine.p99_ms, floor.p99_ms),
    );
    if let (Some(h), Some((t, p))) = (hops, per_hop) {
        println!(
            "{:<22} {:>10.3}x {:>7.2}x   ({h} hops: throughput / (floor / {h}), p50 / (floor × {h}))",
            format!("engine / {h}-hop floor"),
            t,
            p
        );
    }
    if let Some(e) = &engine.first_error {
        println!("first error: {e}");
    }
    if let Some(d) = &engine.first_deny {
        println!("first deny: {d}");
    }
    if !engine.cpu.is_empty() {
        println!();
        println!(
            "{:<26} {:>16} {:>8} {:>16} {:>8} {:>10}",
            "CPU per request (this host)",
            "floor µs/req",
            "cores",
            "engine µs/dec",
            "cores",
            "peak MB"
        );
        for e in &engine.cpu {
            let f = floor.cpu.iter().find(|f| f.pid == e.pid);
            let (fus, fc) = f.map_or((0.0, 0.0), |f| (f.us_per_request, f.cores));
            println!(
                "{:<26} {:>16.1} {:>8.2} {:>16.1} {:>8.2} {:>10.1}",
                format!("{} ({})", e.process, e.pid),
                fus,
                fc,
                e.us_per_request,
                e.cores,
                e.peak_rss_mb
            );
        }
        let total = |c: &[cpu::Cost]| c.iter().map(|c| c.us_per_request).sum::<f64>();
        println!(
            "{:<26} {:>16.1} {:>8} {:>16.1}",
            "all",
            total(&floor.cpu),
            "",
            total(&engine.cpu)
        );
    }
    Ok(())
}
