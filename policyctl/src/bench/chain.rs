//! `policyctl bench --chain acl,lb,conn-limit+rate-limit`: benches a chosen chain without the
//! operator re-subscribing by hand. The event's deciding subscriptions are set to the chain for
//! the run (observers are left alone) and put back as they were afterwards, also after an
//! error or Ctrl-C. It changes the live configuration, so it says so as it does.

use anyhow::{anyhow, bail, Context};
use bus::admin::{Subscribe, Subscription};
use bus::event::EventName;
use bus::AdminClient;

/// Stages in order; the kinds of one stage share a priority (run concurrently).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec(pub Vec<Vec<String>>);

/// The priority of stage `i`: 10, 20, 30...
fn priority(stage: usize) -> i32 {
    10 * (stage as i32 + 1)
}

impl std::str::FromStr for ChainSpec {
    type Err = String;

    /// `a,b,c+d`: commas separate stages, `+` joins kinds into one stage.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut seen = std::collections::BTreeSet::new();
        let mut stages = Vec::new();
        for stage in s.split(',') {
            let mut kinds = Vec::new();
            for kind in stage.split('+').map(str::trim) {
                bus::Kind::new(kind).map_err(|e| format!("--chain {s:?}: {e}"))?;
                if !seen.insert(kind.to_string()) {
                    return Err(format!("--chain {s:?}: {kind} appears twice"));
                }
                kinds.push(kind.to_string());
            }
            stages.push(kinds);
        }
        Ok(ChainSpec(stages))
    }
}

impl std::fmt::Display for ChainSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stages: Vec<String> = self.0.iter().map(|s| s.join(" + ")).collect();
        f.write_str(&stages.join(" → "))
    }
}

/// The event's subscriptions as they were before the bench set its chain.
pub struct Saved {
    event: EventName,
    before: Vec<Subscription>,
    chain: ChainSpec,
}

/// Sets the event's deciding subscriptions to `chain`. Each kind keeps the timeout and failure
/// mode it had in the event's chain, if it was in it.
pub async fn apply(admin: &AdminClient, event: &str, chain: &ChainSpec) -> anyhow::Result<Saved> {
    let event = EventName::new(event)?;
    let before = admin
        .subscriptions(Some(event.as_str()))
        .await
        .context("listing the event's subscriptions")?;
    let saved = Saved {
        event: event.clone(),
        before: before.clone(),
        chain: chain.clone(),
    };
    for s in before.iter().filter(|s| !s.observe) {
        admin
            .unsubscribe(event.as_str(), &s.agent)
            .await
            .with_context(|| format!("unsubscribing {} from {event}", s.agent))?;
    }
    for (i, stage) in chain.0.iter().enumerate() {
        for kind in stage {
            let was = before.iter().find(|s| &s.agent == kind && !s.observe);
            let sub = Subscription {
                event: event.clone(),
                agent: kind.clone(),
                priority: priority(i),
                timeout_ms: was.map_or(bus::admin::DEFAULT_TIMEOUT_MS, |s| s.timeout_ms),
                failure: was.map(|s| s.failure).unwrap_or_default(),
                observe: false,
            };
            if let Err(e) = admin.subscribe(&sub).await {
                // Put back what was there before saying why.
                let err = anyhow!(e).context(format!("subscribing {kind} to {event}"));
                if let Err(r) = restore(admin, &saved).await {
                    bail!("{err:#}; and the old chain could not be restored: {r:#}");
                }
                return Err(err);
            }
        }
    }
    Ok(saved)
}

/// Puts the event's deciding subscriptions back as they were.
pub async fn restore(admin: &AdminClient, saved: &Saved) -> anyhow::Result<()> {
    let event = saved.event.as_str();
    let now = admin.subscriptions(Some(event)).await?;
    for s in now.iter().filter(|s| !s.observe) {
        let ours = saved.chain.0.iter().flatten().any(|k| k == &s.agent);
        if ours {
            admin
                .unsubscribe(event, &s.agent)
                .await
                .with_context(|| format!("unsubscribing {} from {event}", s.agent))?;
        }
    }
    for s in saved.before.iter().filter(|s| !s.observe) {
        // It was stored before; store it again as it was even if its kind is down now.
        admin
            .subscribe_with(&Subscribe::new(s.clone(), true))
            .await
            .with_context(|| format!("subscribing {} to {event} again", s.agent))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_is_stages_of_kinds() {
        let c: ChainSpec = "acl,lb,conn-limit+rate-limit".parse().unwrap();
        assert_eq!(
            c.0,
            vec![
                vec!["acl".to_string()],
                vec!["lb".to_string()],
                vec!["conn-limit".to_string(), "rate-limit".to_string()]
            ]
        );
        assert_eq!(c.to_string(), "acl → lb → conn-limit + rate-limit");
        assert_eq!(priority(2), 30);
        assert!("acl,acl"
            .parse::<ChainSpec>()
            .unwrap_err()
            .contains("twice"));
        assert!("acl,,lb".parse::<ChainSpec>().is_err());
        assert!("ACL!".parse::<ChainSpec>().is_err());
    }
}
