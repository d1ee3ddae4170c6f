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
    /// Observe-only calls: sent without waiting, so they have no latency to show.
    observed: u64,
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

    /// A percentile in ms, or `-` when no call was timed (observers, cache hits only).
    fn percentile(&self, q: f64) -> String {
        self.latency_us.as_ref().map_or("-".into(), |h| {
            format!("{:.3}", h.value_at_quantile(q) as f64 / 1000.0)
        })
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
                Outcome::Observed => {
                    row.count += 1;
                    row.observed += 1;
                }
                // Answered from the dispatcher's verdict cache: no call, no latency.
                Outcome::Answered if a.cached => row.count += 1,
                Outcome::Answered => row.add(a.latency_us),
                _ => {
                    row.add(a.latency_us);
                    row.failed += 1;
                }
            }
        }
    }

    /// The view, each line cut to `width` columns so that a narrow terminal does not wrap it.
    fn render(&self, elapsed: Duration, width: usize, out: &mut impl Write) -> std::io::Result<()> {
        let secs = elapsed.as_secs_f64().max(0.001);
        let mut lines = Vec::new();
        let quiet = if self.events.is_empty() {
            ", no decisions"
        } else {
            ""
        };
        lines.push(format!("policy-bus top: last {secs:.1}s{quiet} (q quits)"));
        lines.push(String::new());
        lines.push(format!(
            "{:<24} {:>11} {:>7} {:>8} {:>8} {:>8}",
            "EVENT", "decisions/s", "deny %", "p50 ms", "p90 ms", "p99 ms"
        ));
        for (event, r) in &self.events {
            let deny = if r.count == 0 {
                0.0
            } else {
                100.0 * r.denied as f64 / r.count as f64
            };
            lines.push(format!(
                "{:<24} {:>11.1} {:>6.1}% {:>8} {:>8} {:>8}",
                event,
                r.count as f64 / secs,
                deny,
                r.percentile(0.5),
                r.percentile(0.9),
                r.percentile(0.99)
            ));
        }
        lines.push(String::new());
        lines.push(format!(
            "{:<24} {:<18} {:>8} {:>7} {:>8} {:>8} {:>8}",
            "EVENT", "AGENT", "calls/s", "failed", "p50 ms", "p90 ms", "p99 ms"
        ));
        for ((event, agent), r) in &self.agents {
            // An observer is sent the event and never waited for: no failures, no latency.
            let (failed, agent) = if r.observed == r.count {
                ("-".to_string(), format!("{agent} (observe)"))
            } else {
                (r.failed.to_string(), agent.clone())
            };
            lines.push(format!(
                "{:<24} {:<18} {:>8.1} {:>7} {:>8} {:>8} {:>8}",
                event,
                agent,
                r.count as f64 / secs,
                failed,
                r.percentile(0.5),
                r.percentile(0.9),
                r.percentile(0.99)
            ));
        }
        for line in lines {
            let cut: String = line.chars().take(width).collect();
            writeln!(out, "{}", cut.trim_end())?;
        }
        Ok(())
    }
}

/// The terminal's width in columns: `COLUMNS`, else `stty size`, else 120.
fn terminal_width() -> usize {
    if let Some(cols) = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()) {
        return cols;
    }
    let size = std::fs::File::open("/dev/tty").ok().and_then(|tty| {
        let out = std::process::Command::new("stty")
            .arg("size")
            .stdin(tty)
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    });
    size.unwrap_or(120)
}

/// The terminal in character-at-a-time mode for as long as `top` runs, so that `q` quits
/// without Enter; put back as it was on drop. `stty` rather than raw termios calls: this crate
/// has no unsafe code.
struct KeyMode(Option<String>);

impl KeyMode {
    fn start() -> KeyMode {
        let stty = |args: &[&str]| -> Option<String> {
            let tty = std::fs::File::open("/dev/tty").ok()?;
            let out = std::process::Command::new("stty")
                .args(args)
                .stdin(tty)
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let saved = stty(&["-g"]);
        if saved.is_some() {
            stty(&["-icanon", "-echo", "min", "1"]);
        }
        KeyMode(saved)
    }
}

impl Drop for KeyMode {
    fn drop(&mut self) {
        if let (Some(saved), Ok(tty)) = (&self.0, std::fs::File::open("/dev/tty")) {
            let _ = std::process::Command::new("stty")
                .arg(saved)
                .stdin(tty)
                .status();
        }
    }
}

/// Resolves when `q` (or `Q`) is typed on stdin.
fn quit_key() -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut byte = [0u8; 1];
        let mut stdin = std::io::stdin();
        while let Ok(1) = stdin.read(&mut byte) {
            if byte[0] == b'q' || byte[0] == b'Q' {
                let _ = tx.send(());
                return;
            }
        }
    });
    rx
}

pub async fn run(
    nats: &async_nats::Client,
    subjects: &Subjects,
    interval: Duration,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let mut tap = nats.subscribe(subjects.tap_wildcard()).await?;
    let tty = std::io::stdout().is_terminal();
    let keys = std::io::stdin().is_terminal();
    let _mode = keys.then(KeyMode::start);
    // Not a terminal: only Ctrl-C or --count ends it.
    let mut quit = keys.then(quit_key);
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
            pressed = async { quit.as_mut()?.await.ok() }, if quit.is_some() => {
                if pressed.is_some() {
                    return Ok(());
                }
                // stdin closed: keys can no longer quit; Ctrl-C still does.
                quit = None;
            }
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
                let width = if tty { terminal_width() } else { usize::MAX };
                window.render(started.elapsed(), width, &mut out)?;
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
                traceparent: None,
            });
        }
        w.record(&TapRecord {
            event: "new-connection".into(),
            event_id: "x".into(),
            attributes: bus::Value::Nil,
            decision: State::new(),
            total_us: 1000,
            agents: vec![AgentTiming {
                agent: "monitor".into(),
                priority: 99,
                latency_us: 0,
                outcome: Outcome::Observed,
                cached: false,
            }],
            at_ms: 0,
            traceparent: None,
        });
        let mut out = Vec::new();
        w.render(Duration::from_secs(2), usize::MAX, &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("policy-bus top: last 2.0s (q quits)"),
            "{text}"
        );
        let monitor = text.lines().find(|l| l.contains("monitor")).unwrap();
        assert!(
            monitor.contains("(observe)") && monitor.ends_with('-'),
            "{monitor}"
        );
        assert!(
            !monitor.contains("0.000"),
            "an observer has no latency: {monitor}"
        );
        // A narrow terminal gets lines cut, not wrapped.
        let mut narrow = Vec::new();
        w.render(Duration::from_secs(2), 40, &mut narrow).unwrap();
        let narrow = String::from_utf8(narrow).unwrap();
        assert!(narrow.lines().all(|l| l.chars().count() <= 40), "{narrow}");
        let line = text
            .lines()
            .find(|l| l.starts_with("new-connection") && l.contains('%'))
            .unwrap();
        assert!(line.contains("5.5") && line.contains("27.3%"), "{line}");
        assert!(
            text.lines().any(|l| l.contains("acl") && l.contains("5.0")),
            "{text}"
        );
    }
}
