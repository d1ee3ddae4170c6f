//! The event `policyctl bench` sends: a representative sample, with the given attributes
//! overriding its fields.

use anyhow::anyhow;
use bus::state::State;

use crate::print::parse_attributes;

/// The sample event, each given attribute overriding its field; an event with no sample
/// takes the given attributes alone.
pub fn attributes(event: &str, given: &[String]) -> anyhow::Result<State> {
    let given = parse_attributes(given)?;
    let mut attributes = match sample(event) {
        Ok(sample) => sample,
        Err(_) if !given.is_empty() => State::new(),
        Err(e) => return Err(e),
    };
    for (k, v) in given.0 {
        attributes.insert(k, v);
    }
    Ok(attributes)
}

/// A representative event for `bench` when no attributes are given.
fn sample(event: &str) -> anyhow::Result<State> {
    let pairs: &[&str] = match event {
        bus::event::NEW_CONNECTION => &[
            "src_service=web",
            "dst_service=db",
            "direction=outgoing",
            "src_peer=local",
            "dst_peers=[peer-a,peer-b,peer-c]",
        ],
        bus::event::EXPOSE_SERVICE => &["service=db", "peers=[peer-a,peer-b,peer-c]"],
        bus::event::SERVICE_LIST_REQUEST => &["src_peer=peer-a", "services=[db,web,api]"],
        _ => {
            return Err(anyhow!(
                "no sample attributes for {event}: give them as key=value"
            ))
        }
    };
    parse_attributes(&pairs.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_attributes_override_the_sample_field_by_field() {
        let a = attributes("new-connection", &["dst_service=api".into()]).unwrap();
        assert_eq!(a.get_str("dst_service"), Some("api"));
        assert_eq!(
            a.get_str("src_service"),
            Some("web"),
            "the rest of the sample stays"
        );
        assert!(a.get("dst_peers").is_some());
        let own = attributes("my-event", &["k=v".into()]).unwrap();
        assert_eq!(own.0.len(), 1);
        assert!(attributes("my-event", &[]).is_err());
    }
}
