//! `policyctl bench`: a closed-loop load generator. It first measures the raw NATS
//! request/reply floor (an echo responder on a private subject, same payload, same
//! concurrency), then the engine, in the same run, and reports both and their ratio, so a
//! figure means the same on any machine.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use async_nats::HeaderMap;
use bus::client::{call, ClientError};
use bus::state::State;
use bus::Subjects;
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug, Serialize)]
struct Figures {
    per_second: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    requests: u64,
    errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
}

#[derive(Default)]
struct Tally {
    hist: Option<Histogram<u64>>,
    errors: u64,
    first_error: Option<String>,
}

fn figures(t: Tally, elapsed: Duration) -> Figures {
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
        errors: t.errors,
        first_error: t.first_error,
    }
}

/// Runs `concurrency` workers that each send a request, wait for the answer and repeat, until
/// `duration` is over. Only successful answers are timed.
async fn phase(
    nats: &async_nats::Client,
    subject: &str,
    payload: Bytes,
    concurrency: usize,
    duration: Duration,
) -> Figures {
    let start = Instant::now();
    let deadline = start + duration;
    let workers = (0..concurrency.max(1)).map(|_| {
        let (nats, subject, payload) = (nats.clone(), subject.to_string(), payload.clone());
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
                    HeaderMap::new(),
                    payload.clone(),
                    Duration::from_secs(5),
                )
                .await;
                match r {
                    Ok(_) => {
                        let us = t0.elapsed().as_micros() as u64;
                        if let Some(h) = t.hist.as_mut() {
                            let _ = h.record(us.max(1));
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
        total.errors += t.errors;
        if total.first_error.is_none() {
            total.first_error = t.first_error;
        }
        match (&mut total.hist, t.hist) {
            (Some(h), Some(other)) => {
                let _ = h.add(other);
            }
            (None, other) => total.hist = other,
            _ => {}
        }
    }
    figures(total, start.elapsed())
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    common: &daemon::Common,
    nats: &async_nats::Client,
    subjects: &Subjects,
    event: &str,
    attributes: State,
    concurrency: usize,
    duration: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let payload: Bytes = attributes.encode()?.into();
    // A first event checks the engine answers before load is put on it.
    call(
        nats,
        subjects.event(event),
        HeaderMap::new(),
        payload.clone(),
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
                if let Some(reply) = msg.reply {
                    let _ = echo.publish(reply, msg.payload).await;
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
    phase(nats, &echo_subject, payload.clone(), concurrency, warm).await;
    let floor = phase(nats, &echo_subject, payload.clone(), concurrency, duration).await;
    responder.abort();
    phase(
        nats,
        &subjects.event(event),
        payload.clone(),
        concurrency,
        warm,
    )
    .await;
    let engine = phase(nats, &subjects.event(event), payload, concurrency, duration).await;
    if floor.requests == 0 {
        return Err(anyhow!("the floor measurement got no answers"));
    }

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
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
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{:<22} {:>11} {:>8} {:>8} {:>8} {:>8} {:>7}",
            "", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"
        );
        for (name, f) in [("nats floor (echo)", &floor), (event, &engine)] {
            println!(
                "{:<22} {:>11.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>7}",
                name, f.per_second, f.p50_ms, f.p90_ms, f.p99_ms, f.max_ms, f.errors
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
        if let Some(e) = &engine.first_error {
            println!("first error: {e}");
        }
    }
    Ok(())
}
