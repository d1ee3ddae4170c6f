//! The subscription table: for each event, its chain as stages of equal priority. Rebuilt
//! from the config bucket on every change and swapped in whole, so the decision path only
//! clones an `Arc`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bus::admin::{FailureMode, Subscription};
use bus::config::ConfigKey;
use bus::watch::Snapshot;
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
    /// The kind's answer latency on this dispatcher, for its hedge delay.
    pub latency: std::sync::Arc<bus::hedge::Latency>,
    /// The kind's last answer said it may be cached (`Policy-Cache`) or that the kind never
    /// holds anything (`Policy-Undo: never`): a call of it that fails needs no undo either.
    /// Under overload, when calls time out by the thousand, that is an undo request saved per
    /// denied event.
    pub takes_nothing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Agents of one priority: they run concurrently.
#[derive(Debug, Clone)]
pub struct Stage {
    pub members: Vec<Member>,
}

/// A stored subscription record that does not decode or validate.
#[derive(Debug, Clone)]
pub struct Broken {
    pub key: String,
    pub error: String,
}

#[derive(Debug, Default)]
pub struct Chain {
    /// In priority order, lowest first.
    pub stages: Vec<Stage>,
    /// Records of this event that do not load: while any is here, the event is denied.
    pub broken: Vec<Broken>,
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

    /// The watch got to `revision` with no subscription changed: the table, as it is,
    /// reflects it. Without this, a command that wrote only policies would wait for a
    /// subscription change that never comes.
    pub fn reached(&self, revision: u64) {
        self.revision.send_if_modified(|r| {
            let newer = revision > *r;
            if newer {
                *r = revision;
            }
            newer
        });
    }

    pub fn chain(&self, event: &str) -> Option<Arc<Chain>> {
        self.chains
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(event)
            .cloned()
    }

    /// The events that have a chain (working or broken).
    pub fn events(&self) -> Vec<String> {
        let chains = self
            .chains
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        chains.keys().cloned().collect()
    }

    /// The agent kinds subscribed to any event.
    pub fn kinds(&self) -> Vec<String> {
        let chains = self
            .chains
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut kinds: Vec<String> = chains
            .values()
            .flat_map(|c| c.stages.iter().flat_map(|s| &s.members))
            .map(|m| m.kind.to_string())
            .collect();
        kinds.sort();
        kinds.dedup();
        kinds
    }

    /// Rebuilds every chain from the stored subscriptions. A record that does not decode or
    /// validate (version skew, or a write that bypassed the dispatcher) fails its event closed:
    /// it might have been the ACL's.
    pub fn load(&self, subjects: &Subjects, snap: &Snapshot) {
        let mut subs: Vec<Subscription> = Vec::new();
        let mut broken: Vec<(String, Broken)> = Vec::new();
        // The fleet's keys (`fleet.sub…`) sort first: its subscription of a kind to an event
        // shadows the site's (see `bus::fleet`).
        let mut taken = std::collections::HashSet::new();
        for (key, value) in &snap.values {
            let Some(ConfigKey::Subscription { event, kind, level }) = ConfigKey::parse(key) else {
                continue;
            };
            if !taken.insert((event.clone(), kind.clone())) {
                tracing::warn!(%key, %level, "a site subscription shadowed by the fleet's of the same kind to the same event");
                continue;
            }
            match check_record(&event, &kind, value) {
                Ok(s) => subs.push(s),
                Err(error) => {
                    tracing::error!(%key, %error, "stored subscription does not load; denying its event until it is fixed or removed");
                    broken.push((
                        event,
                        Broken {
                            key: key.clone(),
                            error,
                        },
                    ));
                }
            }
        }
        let mut chains = build(subjects, subs);
        for (event, b) in broken {
            let chain = chains.entry(event).or_default();
            Arc::get_mut(chain)
                .expect("chains are not shared until swapped in")
                .broken
                .push(b);
        }
        tracing::info!(
            events = chains.len(),
            revision = snap.revision,
            "subscriptions loaded"
        );
        *self.chains.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(chains);
        self.revision.send_replace(snap.revision);
    }
}

/// Decodes a stored record and checks it against its key, so that a record under
/// `sub.new-connection.acl` cannot put another kind in the chain.
pub fn check_record(event: &str, kind: &str, value: &[u8]) -> Result<Subscription, String> {
    let s = codec::decode::<Subscription>("subscription", value).map_err(|e| e.to_string())?;
    s.validate()?;
    if s.event.as_str() != event || s.agent != kind {
        return Err(format!(
            "the record is for {}/{} but stored under {event}/{kind}",
            s.event, s.agent
        ));
    }
    Ok(s)
}

fn build(subjects: &Subjects, mut subs: Vec<Subscription>) -> HashMap<String, Arc<Chain>> {
    subs.sort_by(|a, b| {
        (a.event.as_str(), a.priority, &a.agent).cmp(&(b.event.as_str(), b.priority, &b.agent))
    });
    let mut chains: HashMap<String, Chain> = HashMap::new();
    for s in subs {
        let Ok(kind) = s.validate() else {
            continue; // checked by the caller
        };
        let member = Member {
            subject: subjects.agent(&kind, s.event.as_str()),
            kind,
            priority: s.priority,
            timeout: s.timeout(),
            failure: s.failure,
            observe: s.observe,
            latency: Default::default(),
            takes_nothing: Default::default(),
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

    #[test]
    fn a_record_that_does_not_load_breaks_its_event_only() {
        let good = codec::encode("s", &sub("e", "acl", 1)).unwrap();
        let mut snap = Snapshot::default();
        snap.values
            .insert("sub.e.acl".into(), bytes::Bytes::from(good.clone()));
        snap.values
            .insert("sub.f.acl".into(), bytes::Bytes::from_static(b"\xc1"));
        // A valid record under another record's key.
        snap.values
            .insert("sub.g.lb".into(), bytes::Bytes::from(good));
        let table = Table::default();
        table.load(&Subjects::default(), &snap);
        assert!(table.chain("e").unwrap().broken.is_empty());
        let f = table.chain("f").unwrap();
        assert_eq!(f.broken[0].key, "sub.f.acl");
        assert!(f.stages.is_empty());
        let g = table.chain("g").unwrap();
        assert!(
            g.broken[0].error.contains("stored under g/lb"),
            "{:?}",
            g.broken
        );
    }
}
