//! What `policyctl up` does once the engine is up: loads the examples, and sends sample
//! traffic (each new connection closed again), printing each decision.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use bus::{AdminClient, Client, State};

use crate::print::{describe, parse_attributes};

pub async fn load_examples(admin: &AdminClient, dir: &Path) -> anyhow::Result<()> {
    let inputs = crate::declarative::read_inputs(&[dir.to_path_buf()], false)?;
    let applied = crate::declarative::apply(admin, &inputs, Default::default()).await?;
    let unchanged = match applied.unchanged {
        0 => String::new(),
        n => format!(" ({n} unchanged)"),
    };
    eprintln!(
        "loaded {} subscriptions and {} policies{unchanged} from {} (configuration revision {})",
        inputs.subscriptions.as_ref().map_or(0, Vec::len),
        inputs.policies.as_ref().map_or(0, Vec::len),
        dir.display(),
        applied.revision
    );
    Ok(())
}

/// Sample hookpoint traffic: (event, attributes).
const TRAFFIC: &[(&str, &[&str])] = &[
    (
        "new-connection",
        &[
            "src_service=web",
            "dst_service=db",
            "direction=outgoing",
            "src_peer=local",
            "dst_peers=[peer-a,peer-b,peer-c]",
        ],
    ),
    (
        "new-connection",
        &[
            "src_service=web",
            "dst_service=api",
            "direction=outgoing",
            "src_peer=local",
            "dst_peers=[peer-a,peer-b,peer-c]",
        ],
    ),
    (
        "new-connection",
        &[
            "src_service=batch",
            "dst_service=billing",
            "direction=outgoing",
            "src_peer=local",
            "dst_peers=[peer-a,peer-b]",
        ],
    ),
    (
        "new-connection",
        &[
            "src_service=web",
            "dst_service=cache",
            "direction=outgoing",
            "src_peer=local",
            "dst_peers=[peer-a,peer-b,peer-c]",
        ],
    ),
    (
        "expose-service",
        &["service=db", "peers=[peer-a,peer-b,partner-x]"],
    ),
    (
        "service-list-request",
        &["src_peer=partner-x", "services=[db,api,billing,cache]"],
    ),
];

/// The `connection-closed` event for an allowed connection.
fn closing(attrs: &State, decision: &State) -> State {
    let mut closed = State::new();
    for (from, keys) in [
        (decision, ["connection_id", "target_peer"]),
        (attrs, ["src_service", "dst_service"]),
    ] {
        for k in keys {
            if let Some(v) = from.get(k) {
                closed.insert(k, v.clone());
            }
        }
    }
    closed
}

/// Sends the sample events, printing each decision (after `label`), until the task is dropped.
pub async fn traffic(hook: Client, every: Duration, label: &str) -> anyhow::Result<()> {
    let mut i = 0usize;
    // Allowed connections, closed a few events later so conn-limit sees them go.
    let mut open: std::collections::VecDeque<State> = Default::default();
    loop {
        if every.is_zero() {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            continue;
        }
        let (event, pairs) = TRAFFIC[i % TRAFFIC.len()];
        i += 1;
        let attrs = parse_attributes(&pairs.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        let t0 = Instant::now();
        match hook.emit(event, &attrs).await {
            Ok(d) => {
                crate::print::line(&format!(
                    "{label}{}",
                    describe(event, &attrs, &d, t0.elapsed())
                ))
                .context("stdout closed")?;
                if event == "new-connection" && d.get_str("action") == Some("allow") {
                    open.push_back(closing(&attrs, &d));
                }
            }
            Err(e) => crate::print::line(&format!("{label}{event:<21} error: {e}"))
                .context("stdout closed")?,
        }
        if open.len() > 4 {
            if let Some(closed) = open.pop_front() {
                let t0 = Instant::now();
                match hook.emit("connection-closed", &closed).await {
                    Ok(d) => crate::print::line(&format!(
                        "{label}{}",
                        describe("connection-closed", &closed, &d, t0.elapsed())
                    ))
                    .context("stdout closed")?,
                    Err(e) => {
                        crate::print::line(&format!("{label}connection-closed     error: {e}"))
                            .context("stdout closed")?
                    }
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}
