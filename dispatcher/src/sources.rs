//! Restarting a stream's JetStream sources: taking some away and putting back the ones
//! expected. nats-server resumes a source it is given again from the last message it stored
//! of it (its `Nats-Stream-Source` headers), so nothing is lost or taken twice. What is put
//! back is always the expected list, never what was read: a restart that raced another, or
//! failed halfway, would otherwise write back a stream with no source at all.

use async_nats::jetstream::stream::{self, Source, SourceInfo};
use bus::store::Jet;

/// Whether a source's live state is the one of `source` (same stream, same destinations).
pub(crate) fn is(info: &SourceInfo, source: &Source) -> bool {
    let dests = |t: &[stream::SubjectTransform]| {
        let mut d: Vec<&str> = t.iter().map(|t| t.destination.as_str()).collect();
        d.sort();
        d.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    info.name == source.name && dests(&info.subject_transforms) == dests(&source.subject_transforms)
}

/// Restarts the sources of `name` that `restart` picks from the live state, leaving the others
/// running; then the stream sources exactly `expected`. Returns how many were restarted.
pub(crate) async fn restart(
    jet: &Jet,
    name: &str,
    expected: &[Source],
    restart: impl Fn(&SourceInfo) -> bool,
) -> Result<usize, String> {
    let js = jet.context();
    let mut s = js.get_stream(name).await.map_err(|e| e.to_string())?;
    let info = s.info().await.map_err(|e| e.to_string())?.clone();
    let picked: Vec<&Source> = expected
        .iter()
        .filter(|src| info.sources.iter().any(|i| is(i, src) && restart(i)))
        .collect();
    if picked.is_empty() {
        return Ok(0);
    }
    let keep: Vec<Source> = expected
        .iter()
        .filter(|src| !picked.contains(src))
        .cloned()
        .collect();
    let config = info.config;
    js.update_stream(stream::Config {
        sources: (!keep.is_empty()).then_some(keep),
        ..config.clone()
    })
    .await
    .map_err(|e| e.to_string())?;
    js.update_stream(stream::Config {
        sources: Some(expected.to_vec()),
        ..config
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok(picked.len())
}
