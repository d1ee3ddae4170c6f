//! Comparing JetStream stream sources, as the server returns them with what the engine
//! expects (a fleet's sources, see `crate::fleet`).

use async_nats::jetstream::stream::Source;

/// Whether two sources take the same messages the same way (the server fills in defaults,
/// such as an empty delivery prefix, in what it returns).
pub fn same_source(a: &Source, b: &Source) -> bool {
    let api = |s: &Source| s.external.as_ref().map(|e| e.api_prefix.clone());
    let transforms = |s: &Source| {
        let mut t: Vec<(String, String)> = s
            .subject_transforms
            .iter()
            .map(|t| (t.source.clone(), t.destination.clone()))
            .collect();
        t.sort();
        t
    };
    let deliver = |s: &Source| {
        s.external
            .as_ref()
            .and_then(|e| e.delivery_prefix.clone())
            .unwrap_or_default()
    };
    a.name == b.name
        && api(a) == api(b)
        && deliver(a) == deliver(b)
        && a.filter_subject.as_deref().unwrap_or_default()
            == b.filter_subject.as_deref().unwrap_or_default()
        && transforms(a) == transforms(b)
}
