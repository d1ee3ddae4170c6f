//! The subscription table: for each event, its chain as stages of equal priority. Rebuilt
//! from the config bucket on every change and swapped in whole, so the decision path only
//! clones an `Arc`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bus::admin::{FailureMode, Subscription};
use bus::config::{ConfigKey, Snapshot};
use bus::{codec, Kind, Subjects};

/// One subscribed agent, with its subject formatted once.
#[derive(Debug, Clone)]
pub struct Member {
    pub kind: Kind,
    pub subject: String,
    pub priority: i32,
    pub timeout: Duration,
    pub failure: FailureMode,
    pub observe: bool,
}

/// Agents of one priority: they run concurrently.
#[derive(Debug, Clone)]
pub struct Stage {
    pub members: Vec<Member>,
}

#[derive(Debug, Default)]
pub struct Chain {
    /// In priority order, lowest first.
    pub stages: Vec<Stage>,
}

pub struct Table {
    chains: RwLock<Arc<HashMap<String, Arc<Chain>>>>,
    /// The bucket revision the table reflects, so an admin command can wait until its own
    /// write is live here before it answers.
    revision: tokio::sync::watch::Sender<u64>,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            chains: Default::default(),
            revision: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Table {
    pub fn revision(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revision.subscribe()
    }

    pub fn chain(&self, event: &str) -> Option<Arc<Chain>> {
        self.chains
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(event)
            .cloned()
    }

    /// Rebuilds every chain from the stored subscriptions. A record that does not decode is
    /// logged and left out (it was validated when stored, so this means version skew).
    pub fn load(&self, subjects: &Subjects, snap: &Snapshot) {
        let mut subs: Vec<Subscription> = Vec::new();
        for (key, value) in &snap.values {
            if !matches!(ConfigKey::parse(key), Some(ConfigKey::Subscription { .. })) {
                continue;
            }
            match codec::decode::<Subscription>("subscription", value) {
                Ok(s) => subs.push(s),
                Err(e) => tracing::error!(%key, error = %e, "stored subscription does not load"),
            }
        }
        let chains = build(subjects, subs);
        tracing::info!(
            events = chains.len(),
            revision = snap.revision,
            "subscriptions loaded"
        );
        *self.chains.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(chains);
        self.revision.send_replace(snap.revision);
    }
}

fn build(subjects: &Subjects, mut subs: Vec<Subscription>) -> HashMap<String, Arc<Chain>> {
    subs.sort_by(|a, b| {
        (a.event.as_str(), a.priority, &a.agent).cmp(&(b.event.as_str(), b.priority, &b.agent))
    });
    let mut chains: HashMap<String, Chain> = HashMap::new();
    for s in subs {
        let kind = match s.validate() {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(event = %s.event, agent = %s.agent, error = %e, "invalid stored subscription");
                continue;
            }
        };
        let member = Member {
            subject: subjects.agent(&kind, s.event.as_str()),
            kind,
            priority: s.priority,
            timeout: s.timeout(),
            failure: s.failure,
            observe: s.observe,
        };
        let chain = chains.entry(s.event.as_str().to_string()).or_default();
        match chain.stages.last_mut() {
            Some(stage) if stage.members[0].priority == member.priority => {
                stage.members.push(member)
            }
            _ => chain.stages.push(Stage {
                members: vec![member],
            }),
        }
    }
    chains.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus::EventName;

    fn sub(event: &str, agent: &str, priority: i32) -> Subscription {
        Subscription {
            event: EventName::new(event).unwrap(),
            agent: agent.into(),
            priority,
            timeout_ms: 250,
            failure: FailureMode::Closed,
            observe: false,
        }
    }

    #[test]
    fn chains_are_ordered_by_priority_with_equal_priorities_grouped() {
        let chains = build(
            &Subjects::default(),
            vec![
                sub("e", "lb", 20),
                sub("e", "acl", 10),
                sub("e", "mon", 10),
                sub("f", "acl", 1),
            ],
        );
        let e = &chains["e"];
        let names: Vec<Vec<&str>> = e
            .stages
            .iter()
            .map(|s| s.members.iter().map(|m| m.kind.as_str()).collect())
            .collect();
        assert_eq!(names, vec![vec!["acl", "mon"], vec!["lb"]]);
        assert_eq!(e.stages[1].members[0].subject, "policy.agent.lb.e");
        assert_eq!(chains["f"].stages.len(), 1);
    }
}
