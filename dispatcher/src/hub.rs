//! At the hub of a fleet (`--fleet-sites`, see `bus::fleet`): each site's standing and its
//! decision log, taken from the sites by JetStream sources through their leaf connections.
//! Each site's dispatcher records the hub revision it has applied in its own bucket
//! (`bus::fleet::REVISION_KEY`); the hub's sites bucket sources those keys, and its decision
//! log sources each site's. Nothing here is on a site's decision path: a site cut off from
//! the hub just stops reporting, and the hub shows for how long.

use std::time::Duration;

use async_nats::jetstream::{kv, stream};
use bus::fleet;
use bus::fleet::SiteStatus;
use bus::{store::Jet, Subjects};

use crate::DispatcherError;

pub(crate) struct Hub {
    subjects: Subjects,
    sites: Vec<String>,
    bucket: kv::Store,
    /// The streams that source from the sites (the sites bucket's, the decision log's), each
    /// with the sources it must have.
    streams: Vec<(String, Vec<stream::Source>)>,
}

/// How often the hub first looks for sources that never reached their site; it waits twice
/// as long after each restart that did not help, up to [`RETRY_AT_MOST`].
const RETRY_EVERY: Duration = Duration::from_secs(10);
const RETRY_AT_MOST: Duration = Duration::from_secs(300);

fn io(what: &str, e: impl std::fmt::Display) -> DispatcherError {
    DispatcherError::Fleet(format!("{what}: {e}"))
}

/// Makes `stream` source exactly `sources` (an update only when they differ).
async fn source_exactly(
    jet: &Jet,
    name: &str,
    sources: Vec<stream::Source>,
) -> Result<(), DispatcherError> {
    let js = jet.context();
    let mut s = js.get_stream(name).await.map_err(|e| io(name, e))?;
    let config = s.info().await.map_err(|e| io(name, e))?.config.clone();
    let have = config.sources.clone().unwrap_or_default();
    let same = have.len() == sources.len()
        && have
            .iter()
            .zip(&sources)
            .all(|(a, b)| fleet::same_source(a, b));
    if !same {
        tracing::info!(stream = %name, sites = sources.len(), "following the fleet's sites");
        js.update_stream(stream::Config {
            sources: Some(sources),
            ..config
        })
        .await
        .map_err(|e| io(name, e))?;
    }
    Ok(())
}

/// Makes a stream refuse rollups: a site could otherwise have one delivered (a forged
/// delivery's header) and empty the sites bucket. Nothing of the engine's rolls it up.
async fn forbid_rollups(jet: &Jet, name: &str) -> Result<(), DispatcherError> {
    let js = jet.context();
    let mut s = js.get_stream(name).await.map_err(|e| io(name, e))?;
    let config = s.info().await.map_err(|e| io(name, e))?.config.clone();
    if config.allow_rollup {
        js.update_stream(stream::Config {
            allow_rollup: false,
            ..config
        })
        .await
        .map_err(|e| io(name, e))?;
    }
    Ok(())
}

impl Hub {
    /// A site's record `key` of the sites bucket, if it came in through that site's own source:
    /// a record another site forged under this site's key is not this site's (see
    /// `bus::fleet::came_through`).
    async fn record(&self, site: &str, key: &str) -> Option<bytes::Bytes> {
        let subject = format!("$KV.{}.{key}", self.subjects.sites_bucket());
        let m = self
            .bucket
            .stream
            .direct_get_last_for_subject(&subject)
            .await
            .ok()?;
        let header = m.headers.get(fleet::SOURCE_HEADER).map(|v| v.as_str());
        if !fleet::came_through(
            header,
            &fleet::site_status_destination(&self.subjects, site),
        ) {
            tracing::warn!(%site, %subject, "a record under this site's key did not come in through its source: ignored (another site forging records?)");
            return None;
        }
        let deleted = m
            .headers
            .get("KV-Operation")
            .is_some_and(|op| op.as_str() != "PUT");
        (!deleted).then_some(m.payload)
    }

    /// Opens the sites bucket, sourcing every site's standing, and makes the decision log (if
    /// this dispatcher keeps one) source every site's.
    pub(crate) async fn open(
        jet: &Jet,
        subjects: &Subjects,
        replicas: usize,
        sites: Vec<String>,
        log: bool,
    ) -> Result<Hub, DispatcherError> {
        let Some(site_subjects) = fleet::sites_of(subjects) else {
            return Err(DispatcherError::Fleet(format!(
                "--fleet-sites is for the hub's engine, whose prefix ends in `.fleet` (this one's is `{}`)",
                subjects.prefix()
            )));
        };
        let version = jet.client().server_info().version;
        if jet.api().is_some() && !bus::leaf::hub_checks_leaf_messages(&version) {
            tracing::warn!(
                %version,
                "this hub's nats-server does not check what a site's leaf connection sends against its permissions (2.12.7 and later do): a site running a modified server could write here; run the hub on nats-server 2.12.7 or later"
            );
        }
        let status = |site: &String| fleet::site_status_source(subjects, &site_subjects, site);
        let status_sources: Vec<stream::Source> = sites.iter().map(status).collect();
        let config = kv::Config {
            bucket: subjects.sites_bucket(),
            description: "policy-bus fleet: each site's standing, sourced from the sites".into(),
            history: 1,
            num_replicas: replicas.max(1),
            sources: Some(status_sources.clone()),
            ..Default::default()
        };
        let bucket = bus::config::open_bucket(jet, config, true)
            .await
            .map_err(|e| io("the sites bucket", e))?;
        let mut streams = vec![(format!("KV_{}", subjects.sites_bucket()), status_sources)];
        if log {
            let logs: Vec<stream::Source> = sites
                .iter()
                .map(|site| fleet::site_log_source(subjects, &site_subjects, site))
                .collect();
            source_exactly(jet, &subjects.decisions_stream(), logs.clone()).await?;
            streams.push((subjects.decisions_stream(), logs));
        }
        forbid_rollups(jet, &format!("KV_{}", subjects.sites_bucket())).await?;
        Ok(Hub {
            subjects: subjects.clone(),
            sites,
            bucket,
            streams,
        })
    }

    /// Restarts the sources that have never reached their site since they started: a site
    /// whose stream did not exist yet when the hub started (its engine came up later) is
    /// otherwise retried by nats-server only after a backoff of tens of seconds. A source that
    /// did reach its site and lost it is left to JetStream, and so are the running ones. While
    /// some source stays unreached, the wait doubles, up to [`RETRY_AT_MOST`].
    pub(crate) async fn follow(&self, jet: &Jet) {
        let mut wait = RETRY_EVERY;
        loop {
            tokio::time::sleep(wait).await;
            let mut restarted = 0;
            for (name, expected) in &self.streams {
                match crate::sources::restart(jet, name, expected, |i| i.active.is_none()).await {
                    Ok(n) => restarted += n,
                    Err(e) => {
                        tracing::warn!(stream = %name, error = %e, "cannot restart the sources of sites not reached yet")
                    }
                }
            }
            wait = match restarted {
                0 => RETRY_EVERY,
                _ => (wait * 2).min(RETRY_AT_MOST),
            };
            if restarted > 0 {
                tracing::info!(restarted, next = ?wait, "restarted the sources of sites not reached yet");
            }
        }
    }

    /// Every site's standing: the revision it last reported, what it lacks of `newest` (the
    /// hub's newest configuration revision), and when the hub last heard from it.
    pub(crate) async fn status(&self, newest: u64) -> Vec<SiteStatus> {
        let sources = match self.bucket.stream.get_info().await {
            Ok(info) => info.sources,
            Err(_) => Vec::new(),
        };
        let mut out = Vec::new();
        for site in &self.sites {
            let revision = self
                .record(site, &fleet::site_revision_key(site))
                .await
                .and_then(|v| String::from_utf8_lossy(&v).trim().parse::<u64>().ok());
            let expected = self.streams.first().and_then(|(_, sources)| {
                sources
                    .iter()
                    .find(|s| fleet::site_of_source(s) == Some(site.as_str()))
            });
            let seen = sources
                .iter()
                .find(|s| expected.is_some_and(|e| crate::sources::is(s, e)))
                .and_then(|s| s.active)
                .map(|d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let hub_reset = self
                .record(site, &fleet::site_reset_key(site))
                .await
                .is_some();
            out.push(SiteStatus {
                name: site.clone(),
                revision,
                lag: revision.map(|r| newest.saturating_sub(r)),
                seen_ms_ago: seen,
                hub_reset,
            });
        }
        out
    }
}
