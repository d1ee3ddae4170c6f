//! `policyctl top`: a live view of the tap: decisions/s, deny ratio and latency percentiles
//! per event and per agent, over the last refresh interval.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use bus::state::keys;
use bus::tap::{Outcome, TapRecord};
use bus::{codec, Subjects};
use futures::StreamExt;
use hdrhistogram::Histogram;

#[derive(Default)]
struct Row {
    count: u64,
    denied: u64,
    failed: u64,
    latency_us: Option<Histogram<u64>>,
}

impl Row {
    fn add(&mut self, us: u64) {
        let h = self
            .latency_us
            .get_or_insert_with(|| Histogram::new(3).expect("histogram"));
        let _ = h.record(us.max(1));
        self.count += 1;
    }

    fn percentile_ms(&self, q: f64) -> f64 {
        self.latency_us
            .as_ref()
            .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
    }
}

#[derive(Default)]
struct Window {
    events: BTreeMap<String, Row>,
    agents: BTreeMap<(String, String), Row>,
}

impl Window {
    fn record(&mut self, r: &TapRecord) {
        let row = self.events.entry(r.event.clone()).or_default();
        row.add(r.total_us);
        if r.decision.get_str(keys::ACTION) == Some("deny") {
            row.denied += 1;
        }
        for a in &r.agents {
            let row = self
                .agents
                .entry((r.event.clone(), a.agent.clone()))
                .or_default();
            match a.outcome {
                Outcome::Observed => row.count += 1,
                Outcome::Answered => row.add(a.latency_us),
                _ => {
                    row.add(a.latency_us);
                    row.failed += 1;
                }
            }
        }
    }

    fn render(&self, elapsed: Duration, out: &mut impl Write) -> std::io::Result<()> {
        let secs = elapsed.as_secs_f64().max(0.001);
        writeln!(
            out,
            "policy-bus top: last {:.1}s, {}",
            secs,
            if self.events.is_empty() {
                "no decisions"
            } else {
                ""
            }
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "{:<24} {:>11} {:>7} {:>8} {:>8} {:>8}",
            "EVENT", "decisions/s", "deny %", "p50 ms", "p90 ms", "p99 ms"
        )?;
        for (event, r) in &self.events {
            let deny = if r.count == 0 {
                0.0
            } else {
                100.0 * r.denied as f64 / r.count as f64
            };
            writeln!(
                out,
                "{:<24} {:>11.1} {:>6.1}% {:>8.3} {:>8.3} {:>8.3}",
                event,
                r.count as f64 / secs,
                deny,
                r.percentile_ms(0.5),
                r.percentile_ms(0.9),
                r.percentile_ms(0.99)
            )?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "{:<24} {:<14} {:>8} {:>7} {:>8} {:>8} {:>8}",
            "EVENT", "AGENT", "calls/s", "failed", "p50 ms", "p90 ms", "p99 ms"
        )?;
        for ((event, agent), r) in &self.agents {
            writeln!(
                out,
                "{:<24} {:<14} {:>8.1} {:>7} {:>8.3} {:>8.3} {:>8.3}",
                event,
                agent,
                r.count as f64 / secs,
                r.failed,
                r.percentile_ms(0.5),
                r.percentile_ms(0.9),
                r.percentile_ms(0.99)
            )?;
        }
        Ok(())
    }
}

pub async fn run(
    nats: &async_nats::Client,
    subjects: &Subjects,
    interval: Duration,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let mut tap = nats.subscribe(subjects.tap_wildcard()).await?;
    let tty = std::io::stdout().is_terminal();
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    let mut window = Window::default();
    let mut started = Instant::now();
    let mut frames = 0u64;
    // One Ctrl-C future for the whole loop, so a press is never lost between messages.
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            msg = tap.next() => {
                let Some(msg) = msg else { anyhow::bail!("tap subscription closed") };
                if let Ok(r) = codec::decode::<TapRecord>("tap record", &msg.payload) {
                    window.record(&r);
                }
            }
            _ = ticker.tick() => {
                let mut out = std::io::stdout().lock();
                if tty {
                    // Home and clear: the view refreshes in place.
                    write!(out, "\x1b[H\x1b[2J")?;
                }
                window.render(started.elapsed(), &mut out)?;
                if !tty {
                    writeln!(out)?;
                }
                out.flush()?;
                window = Window::default();
                started = Instant::now();
                frames += 1;
                if count.is_some_and(|c| frames >= c) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus::tap::AgentTiming;
    use bus::State;

    #[test]
    fn a_window_counts_rates_denies_and_agents() {
        let mut w = Window::default();
        for i in 0..10u64 {
            let mut d = State::new();
            d.insert(keys::ACTION, if i < 3 { "deny" } else { "allow" });
            w.record(&TapRecord {
                event: "new-connection".into(),
                event_id: i.to_string(),
                attributes: bus::Value::Nil,
                decision: d,
                total_us: 1000 + i,
                agents: vec![AgentTiming {
                    agent: "acl".into(),
                    priority: 1,
                    latency_us: 400,
                    outcome: Outcome::Answered,
                    cached: false,
                }],
                at_ms: 0,
            });
        }
        let mut out = Vec::new();
        w.render(Duration::from_secs(2), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("new-connection") && l.contains('%'))
            .unwrap();
        assert!(line.contains("5.0") && line.contains("30.0%"), "{line}");
        assert!(
            text.lines().any(|l| l.contains("acl") && l.contains("5.0")),
            "{text}"
        );
    }
}
