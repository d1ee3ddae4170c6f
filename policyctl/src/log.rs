//! `policyctl log`: reads the durable decision log after the fact, the way OPA's decision
//! logs are audited: what was decided, when and why, filtered by event, action, service and
//! agent. An ordered consumer reads from the first record at or after `--since` up to the
//! newest one at the start, then ends.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use async_nats::jetstream::consumer;
use bus::state::{field_str, keys};
use bus::tap::TapRecord;
use bus::{codec, EventName, Subjects};
use futures::StreamExt;

use crate::TapOutput;

/// What `log` keeps of the records it reads.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub event: Option<String>,
    pub action: Option<String>,
    pub service: Option<String>,
    pub agent: Option<String>,
    /// At the hub of a fleet: a site's decisions (`*`: every site's), see `bus::fleet`.
    pub site: Option<String>,
}

impl Filter {
    /// Whether a record passes: its action, its service (`dst_service` or `service`), and an
    /// agent that was called for it or gave a reason.
    pub fn keeps(&self, r: &TapRecord) -> bool {
        let action = r.decision.get_str(keys::ACTION).unwrap_or("allow");
        if self.action.as_deref().is_some_and(|a| a != action) {
            return false;
        }
        if let Some(service) = &self.service {
            let s = field_str(&r.attributes, "dst_service")
                .or_else(|| field_str(&r.attributes, "service"));
            if s != Some(service.as_str()) {
                return false;
            }
        }
        if let Some(agent) = &self.agent {
            let called = r.agents.iter().any(|a| &a.agent == agent);
            let reasons = match r.decision.get(keys::REASONS) {
                Some(bus::Value::Array(list)) => list
                    .iter()
                    .any(|reason| field_str(reason, "agent") == Some(agent.as_str())),
                _ => false,
            };
            if !called && !reasons {
                return false;
            }
        }
        true
    }
}

/// The record's time, RFC 3339 in UTC to the millisecond.
fn when(at_ms: u64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.format(&format).unwrap_or_default()
}

pub async fn run(
    nats: &async_nats::Client,
    subjects: &Subjects,
    since: Duration,
    filter: Filter,
    limit: Option<usize>,
    output: TapOutput,
) -> anyhow::Result<()> {
    let jet = bus::store::Jet::reach(nats, subjects, bus::store::Store::Log).await?;
    let js = jet.context();
    let name = subjects.decisions_stream();
    let stream = js.get_stream(&name).await.map_err(|e| {
        anyhow!(
            "no decision log ({name}: {e}); dispatchers keep one unless started with --no-decision-log{}",
            jet.hint()
        )
    })?;
    let filter_subject = match (&filter.site, &filter.event) {
        (Some(site), event) => {
            if bus::fleet::sites_of(subjects).is_none() {
                bail!("--site reads the hub's copy of the sites' decisions: add --fleet, and point --nats-url at the hub");
            }
            if site != "*" {
                bus::fleet::check_domain(site).map_err(|e| anyhow!("--site: {e}"))?;
            }
            let all = subjects.site_decision_log_wildcard(site);
            match event {
                Some(e) => format!(
                    "{}{}",
                    all.trim_end_matches('>'),
                    EventName::new(e)?.as_str()
                ),
                None => all,
            }
        }
        (None, Some(e)) => subjects.decision_log(EventName::new(e)?.as_str()),
        (None, None) => subjects.decision_log_wildcard(),
    };
    let start = SystemTime::now()
        .checked_sub(since)
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(start.as_nanos() as i128)
        .context("--since is too far back")?;
    let mut consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject,
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time },
            ..Default::default()
        })
        .await
        .context("cannot read the decision log")?;
    let mut pending = consumer
        .info()
        .await
        .context("cannot read the decision log")?
        .num_pending;
    let mut messages = consumer
        .messages()
        .await
        .context("cannot read the decision log")?;
    let (mut shown, mut forged) = (0usize, 0usize);
    while pending > 0 && limit.is_none_or(|l| shown < l) {
        let Some(msg) = messages.next().await else {
            break;
        };
        let msg = msg.context("reading the decision log")?;
        pending = msg.info().map(|i| i.pending).unwrap_or(0);
        if !genuine(subjects, &msg) {
            forged += 1;
            continue;
        }
        let record: TapRecord = match codec::decode("decision record", &msg.payload) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("policyctl: skipped a record on {}: {e}", msg.subject);
                continue;
            }
        };
        if !filter.keeps(&record) {
            continue;
        }
        let line = match output {
            TapOutput::Json => serde_json::to_string(&record)?,
            TapOutput::Human => format!(
                "{}  {}{}",
                when(record.at_ms),
                match &filter.site {
                    Some(_) => subjects
                        .site_of_decision_log(&msg.subject)
                        .map(|s| format!("[{s}] "))
                        .unwrap_or_default(),
                    None => String::new(),
                },
                crate::print::tap_line(&record, TapOutput::Human)?
            ),
        };
        if crate::print::line(&line).is_err() {
            return Ok(());
        }
        shown += 1;
    }
    if forged > 0 {
        eprintln!(
            "policyctl: skipped {forged} records that did not come in as their subject says (a site's under another site's name, or a sourced one under the hub's own): a site forging records?"
        );
    }
    if shown == 0 {
        eprintln!("policyctl: no decision in the log matches");
    }
    Ok(())
}

/// Whether a record is what its subject says: at a fleet's hub, a site's record came in
/// through that site's source, and the hub's own came from no source (`bus::fleet::came_through`).
fn genuine(subjects: &bus::Subjects, msg: &async_nats::jetstream::Message) -> bool {
    let header = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(bus::fleet::SOURCE_HEADER))
        .map(|v| v.as_str());
    match subjects.site_of_decision_log(&msg.subject) {
        Some(site) => bus::fleet::came_through(header, &subjects.site_decision_log_wildcard(site)),
        None => header.is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus::tap::{AgentTiming, Outcome};
    use bus::State;

    fn record(action: &str, service: &str, agent: &str) -> TapRecord {
        let mut d = State::new();
        d.insert(keys::ACTION, action);
        let attrs = bus::Value::Map(vec![("dst_service".into(), service.into())]);
        TapRecord {
            event: "new-connection".into(),
            event_id: "e".into(),
            attributes: attrs,
            decision: d,
            total_us: 1,
            agents: vec![AgentTiming {
                agent: agent.into(),
                priority: 1,
                latency_us: 1,
                outcome: Outcome::Answered,
                cached: false,
            }],
            at_ms: 1_764_547_200_000,
            traceparent: None,
        }
    }

    #[test]
    fn filters_keep_what_they_name() {
        let f = Filter {
            action: Some("deny".into()),
            service: Some("db".into()),
            agent: Some("acl".into()),
            ..Default::default()
        };
        assert!(f.keeps(&record("deny", "db", "acl")));
        assert!(!f.keeps(&record("allow", "db", "acl")));
        assert!(!f.keeps(&record("deny", "web", "acl")));
        assert!(!f.keeps(&record("deny", "db", "lb")));
        assert!(Filter::default().keeps(&record("allow", "x", "y")));
        assert_eq!(when(1_764_547_200_000), "2025-12-01T00:00:00.000Z");
    }
}
