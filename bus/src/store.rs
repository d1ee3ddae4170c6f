//! Where the engine's JetStream data lives, and how a process reaches it.
//!
//! On the secured bus (`policyctl auth`), no stream shares an account with the engine's
//! messaging, nor with another stream: each [`Store`] is alone in an account of its own, with
//! no users, and reaches the processes only through exports. A process that uses JetStream
//! opens a second connection, as its role's *store identity*, into an account of that role's
//! alone, which imports exactly the store paths the role needs under [`api_prefix`]
//! (`crate::accounts` lays the accounts out). JetStream is a deputy by design: a direct get's
//! reply, a push consumer's delivery subject and a pull request's reply are chosen by whoever
//! asks, and the server publishes there with its own rights. With this layout, what anyone
//! makes JetStream publish lands either in its own identity account (replies, which the
//! server maps back through the import) or in the store's account, where the only subjects are
//! the stream's own (a delivery there is refused as a cycle) and the JetStream API (which
//! ignores what carries no client's identity). Nothing reaches another store, and nothing
//! reaches a subject a process of the engine serves.
//!
//! On a plain bus every stream sits in the one account with everything else, and a process
//! reaches it over its only connection at `$JS.API`; [`Jet::reach`] finds out which it is.

use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::jetstream::{self, kv};

use crate::error::ConfigError;
use crate::subject::Subjects;

/// The JetStream API as a process's store identity sees the stores it imports: `$JS.API.X`
/// of a store account becomes `<prefix>._js.API.X` there. (An import under the API's own name
/// is not served: the server would look for JetStream in the importing account.)
pub fn api_prefix(subjects: &Subjects) -> String {
    format!("{}._js.API", subjects.prefix())
}

/// Where a store identity reaches another JetStream domain's API through its imports (see
/// [`Store::other_domain_reads`]): `<prefix>._js.fleet.<domain>.API`.
pub fn other_domain_api(subjects: &Subjects, domain: &str) -> String {
    format!("{}._js.fleet.{domain}.API", subjects.prefix())
}

/// Where a store's API and writes are imported in an identity account: [`api_prefix`], but for
/// conn-limit's slots, `<prefix>._js.conns.API`. Its streams are named by policy, so its API is
/// imported with a wildcard stream name (`STREAM.INFO.*`), which under the shared prefix would
/// overlap the config's `STREAM.INFO.KV_<prefix>_config` in the same account (an account
/// nats-server 2.10 refuses in operator mode, and an ambiguous route in any).
pub fn store_api_prefix(store: Store, subjects: &Subjects) -> String {
    match store {
        Store::Conns => format!("{}._js.conns.API", subjects.prefix()),
        _ => api_prefix(subjects),
    }
}

/// One of the engine's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Store {
    /// Subscriptions, policies and removed peers: the dispatcher writes, every process reads.
    Config,
    /// WebAssembly modules: the dispatcher writes, wasm hosts read.
    Modules,
    /// The durable decision log: the dispatcher writes, `policyctl log` reads.
    Log,
    /// conn-limit's slots (a stream per policy, see [`crate::slots`]) and its markers:
    /// conn-limit alone.
    Conns,
    /// rate-limit's budgets: rate-limit alone.
    Rates,
    /// At a fleet's hub, each site's standing, which the bucket sources from the sites
    /// (`crate::fleet`): the dispatcher creates it, and nothing but the sources writes it.
    Sites,
}

/// What a store account may hold: its streams (one, but conn-limit's: one per policy besides),
/// and bounded consumers and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_mem: i64,
    pub max_file: i64,
    pub max_streams: i64,
    pub max_consumers: i64,
}

const MIB: i64 = 1024 * 1024;

impl Store {
    pub const ALL: [Store; 6] = [
        Store::Config,
        Store::Modules,
        Store::Log,
        Store::Conns,
        Store::Rates,
        Store::Sites,
    ];

    /// The stream's name.
    pub fn stream(self, s: &Subjects) -> String {
        match self {
            Store::Config => format!("KV_{}", s.config_bucket()),
            Store::Modules => format!("OBJ_{}", s.modules_bucket()),
            Store::Log => s.decisions_stream(),
            Store::Conns => format!("KV_{}", s.conn_bucket()),
            Store::Rates => format!("KV_{}", s.rate_bucket()),
            Store::Sites => format!("KV_{}", s.sites_bucket()),
        }
    }

    /// The account it lives in on the secured bus.
    pub fn account(self) -> &'static str {
        match self {
            Store::Config => "POLICY_STORE_CONFIG",
            Store::Modules => "POLICY_STORE_MODULES",
            Store::Log => "POLICY_STORE_LOG",
            Store::Conns => "POLICY_STORE_CONNS",
            Store::Rates => "POLICY_STORE_RATES",
            Store::Sites => "POLICY_STORE_SITES",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Store::Config => "the config bucket (subscriptions, policies, removed peers)",
            Store::Modules => "the WebAssembly modules",
            Store::Log => "the durable decision log",
            Store::Conns => "conn-limit's slots",
            Store::Rates => "rate-limit's budgets",
            Store::Sites => "a fleet hub's view of its sites",
        }
    }

    /// What its account may hold. Bytes allow the largest stream the engine creates at three
    /// replicas (the config bucket 64 MiB, the modules 256 MiB, a limiter's state 256 MiB by
    /// default, the decision log 1 GiB by default and up to about 5 GiB).
    pub fn limits(self) -> Limits {
        let (max_file, max_consumers) = match self {
            Store::Config => (256 * MIB, 512),
            Store::Sites => (64 * MIB, 128),
            Store::Modules => (1024 * MIB, 128),
            Store::Log => (16 * 1024 * MIB, 128),
            Store::Conns | Store::Rates => (1024 * MIB, 128),
        };
        Limits {
            max_mem: 64 * MIB,
            max_file,
            max_streams: match self {
                Store::Conns => 1 + crate::slots::MAX_POLICIES,
                _ => 1,
            },
            max_consumers,
        }
    }

    /// The subjects the stream takes messages on, as its owner writes them: `(subject in the
    /// store account, subject in the owner's identity account)`. async-nats puts a key-value
    /// write behind the API prefix of a context that has one; an object chunk or a log record
    /// goes out under its own subject.
    pub fn write_subjects(self, s: &Subjects) -> Vec<(String, String)> {
        let api = store_api_prefix(self, s);
        let kv = |bucket: String| {
            let subject = format!("$KV.{bucket}.>");
            vec![(subject.clone(), format!("{api}.{subject}"))]
        };
        match self {
            Store::Config => kv(s.config_bucket()),
            Store::Conns => {
                let slots = crate::slots::wildcard(s);
                let mut subjects = kv(s.conn_bucket());
                subjects.push((slots.clone(), format!("{api}.{slots}")));
                subjects
            }
            Store::Rates => kv(s.rate_bucket()),
            // Its sources write it, with the server's rights.
            Store::Sites => Vec::new(),
            Store::Modules => {
                let subject = format!("$O.{}.>", s.modules_bucket());
                vec![(subject.clone(), subject)]
            }
            Store::Log => {
                let subject = s.decision_log_wildcard();
                vec![(subject.clone(), subject)]
            }
        }
    }

    /// What its owner's store identity may publish of [`Self::write_subjects`]: all of it,
    /// but in the config bucket only the keys an owner writes (subscriptions, policies,
    /// removed peers, a site's own records). A site of a fleet holds the fleet's documents
    /// under `fleet.`, written by the bucket's source alone: its dispatcher's identity cannot
    /// change them.
    pub fn write_permissions(self, s: &Subjects) -> Vec<String> {
        match self {
            Store::Config => {
                let api = store_api_prefix(self, s);
                let bucket = s.config_bucket();
                ["sub", "pol", "peer", "site"]
                    .iter()
                    .map(|tag| format!("{api}.$KV.{bucket}.{tag}.>"))
                    .collect()
            }
            _ => self
                .write_subjects(s)
                .into_iter()
                .map(|(_, local)| local)
                .collect(),
        }
    }

    /// The JetStream API reading it takes (after `$JS.API.`): open, get, watch, pull. The
    /// second of each pair says whether one request may get several answers.
    pub fn read_api(self, s: &Subjects) -> Vec<(String, bool)> {
        let st = self.stream(s);
        if self == Store::Conns {
            // Its slot streams are named by policy: any stream of the account (only its own).
            return vec![
                ("STREAM.INFO.*".into(), false),
                ("CONSUMER.CREATE.*".into(), false),
                ("CONSUMER.CREATE.*.>".into(), false),
                ("CONSUMER.DELETE.*.*".into(), false),
                ("CONSUMER.INFO.*.*".into(), false),
                ("CONSUMER.MSG.NEXT.*.*".into(), true),
                ("DIRECT.GET.*".into(), true),
                ("DIRECT.GET.*.>".into(), true),
                ("STREAM.MSG.GET.*".into(), false),
            ];
        }
        vec![
            (format!("STREAM.INFO.{st}"), false),
            (format!("CONSUMER.CREATE.{st}"), false),
            (format!("CONSUMER.CREATE.{st}.>"), false),
            (format!("CONSUMER.DELETE.{st}.*"), false),
            (format!("CONSUMER.INFO.{st}.*"), false),
            (format!("CONSUMER.MSG.NEXT.{st}.*"), true),
            (format!("DIRECT.GET.{st}"), true),
            (format!("DIRECT.GET.{st}.>"), true),
            (format!("STREAM.MSG.GET.{st}"), false),
        ]
    }

    /// The JetStream API its owner takes besides reading: create the stream; for a key-value
    /// store, update it (to put back what routes messages, see [`crate::streams::repair`]); for the decision
    /// log and the sites bucket, update it (a fleet's hub makes them source the sites); for the modules
    /// store, purge the chunks of a replaced or removed module; for conn-limit's, create and
    /// update a policy's slot stream (its limit follows the policy) and delete a slot
    /// (a release). Nothing deletes a stream, and nothing updates or purges another role's.
    pub fn own_api(self, s: &Subjects) -> Vec<String> {
        let st = self.stream(s);
        let mut api = vec![format!("STREAM.CREATE.{st}")];
        match self {
            Store::Modules => api.push(format!("STREAM.PURGE.{st}")),
            // The log and the sites bucket: to source the sites, at a fleet's hub.
            Store::Config | Store::Rates | Store::Log | Store::Sites => {
                api.push(format!("STREAM.UPDATE.{st}"))
            }
            Store::Conns => {
                api = ["STREAM.CREATE.*", "STREAM.UPDATE.*", "STREAM.MSG.DELETE.*"]
                    .map(String::from)
                    .to_vec();
            }
        }
        api
    }

    /// What its owner reads of another JetStream domain through the store's account: `(subject
    /// in the store account, subject in the owner's identity account)`. A fleet's site reaches
    /// the hub's config bucket over the leaf connection of its own config account, at
    /// `$FLEET.<site>.api` (`crate::leaf`), and its dispatcher reads there, by direct get, the
    /// hub's newest revision; the import keeps the site a wildcard, so one configuration serves
    /// any site.
    pub fn other_domain_reads(self, s: &Subjects) -> Vec<(String, String)> {
        if self != Store::Config {
            return Vec::new();
        }
        let hub = format!("KV_{}", s.fleet().config_bucket());
        let local = other_domain_api(s, "*");
        [format!("DIRECT.GET.{hub}"), format!("DIRECT.GET.{hub}.>")]
            .into_iter()
            .map(|a| (format!("$FLEET.*.api.{a}"), format!("{local}.{a}")))
            .collect()
    }

    /// Flow control of its push consumers: a consumer asks, the client answers here.
    pub fn flow_control(self, s: &Subjects) -> String {
        format!("$JS.FC.{}.>", self.stream(s))
    }
}

/// How a process reaches one store: a connection (its store identity's on the secured bus,
/// else its only one) and the JetStream API prefix the store answers on there.
#[derive(Clone, Debug)]
pub struct Jet {
    client: async_nats::Client,
    /// `None`: the server's own `$JS.API`.
    api: Option<String>,
}

/// How long the probe of [`Jet::reach`] waits for JetStream to answer at the engine's prefix.
const PROBE: Duration = Duration::from_secs(2);

impl Jet {
    /// Finds where `store` answers over `client`: at [`store_api_prefix`] when the connection is a
    /// store identity on the secured bus (any answer, "stream not found" included, says so),
    /// else at `$JS.API`.
    pub async fn reach(
        client: &async_nats::Client,
        subjects: &Subjects,
        store: Store,
    ) -> Result<Jet, ConfigError> {
        let api = store_api_prefix(store, subjects);
        let probe = format!("{api}.STREAM.INFO.{}", store.stream(subjects));
        let request = async_nats::Request::new().timeout(Some(PROBE));
        match client.send_request(probe, request).await {
            Ok(_) => Ok(Jet {
                client: client.clone(),
                api: Some(api),
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    RequestErrorKind::NoResponders | RequestErrorKind::TimedOut
                ) =>
            {
                Ok(Jet {
                    client: client.clone(),
                    api: None,
                })
            }
            Err(e) => Err(ConfigError::io(e)),
        }
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The API prefix of a store identity's imports (writes go under it too), or `None`.
    pub fn api(&self) -> Option<&str> {
        self.api.as_deref()
    }

    pub fn context(&self) -> jetstream::Context {
        match &self.api {
            Some(api) => jetstream::with_prefix(self.client.clone(), api),
            None => jetstream::new(self.client.clone()),
        }
    }

    /// The subject a write of `key` into `bucket` goes to, as async-nats's own puts send it.
    pub fn kv_subject(&self, store: &kv::Store, key: &str) -> String {
        match &self.api {
            Some(api) => format!("{api}.{}{key}", store.prefix),
            None => format!("{}{key}", store.prefix),
        }
    }

    /// Why a store could not be reached, for the error a person reads.
    pub fn hint(&self) -> &'static str {
        if self.api.is_some() {
            ""
        } else {
            " (on a secured bus, a process reaches JetStream as its role's store identity: \
             give it <role>.store.nk beside <role>.nk, or --store-nkey-file)"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_store_has_its_own_stream_and_account() {
        let s = Subjects::default();
        let mut streams: Vec<String> = Store::ALL.iter().map(|st| st.stream(&s)).collect();
        let mut accounts: Vec<&str> = Store::ALL.iter().map(|st| st.account()).collect();
        streams.dedup();
        accounts.dedup();
        assert_eq!(streams.len(), Store::ALL.len());
        assert_eq!(accounts.len(), Store::ALL.len());
        assert_eq!(Store::Config.stream(&s), "KV_policy_config");
        assert_eq!(api_prefix(&s), "policy._js.API");
        assert_eq!(
            Store::Config.write_subjects(&s),
            [(
                "$KV.policy_config.>".to_string(),
                "policy._js.API.$KV.policy_config.>".to_string()
            )]
        );
        for st in Store::ALL {
            let streams = if st == Store::Conns {
                1 + crate::slots::MAX_POLICIES
            } else {
                1
            };
            assert_eq!(st.limits().max_streams, streams, "{st:?}");
            // Only the modules store may be purged, by its owner.
            assert_eq!(
                st.own_api(&s).iter().any(|a| a.starts_with("STREAM.PURGE")),
                st == Store::Modules
            );
            // Only conn-limit deletes anything: a slot, a message of its own streams.
            let deletes = |a: &String| a.contains("DELETE.") && !a.starts_with("CONSUMER.DELETE");
            let own = st.own_api(&s);
            assert!(own
                .iter()
                .filter(|a| deletes(a))
                .all(|a| a == "STREAM.MSG.DELETE.*"));
            assert_eq!(own.iter().any(deletes), st == Store::Conns);
            assert!(!st.read_api(&s).iter().any(|(a, _)| deletes(a)));
            assert!(!own.iter().any(|a| a.starts_with("STREAM.DELETE")));
            // Only a key-value store's owner may update it (to repair its routing), and the
            // decision log's (a fleet's hub makes it source the sites').
            assert_eq!(
                own.iter().any(|a| a.starts_with("STREAM.UPDATE")),
                st.stream(&s).starts_with("KV_") || st == Store::Log
            );
        }
    }
}
