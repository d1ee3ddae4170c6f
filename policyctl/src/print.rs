//! What policyctl prints, one line at a time: a line that fails quietly on a closed pipe, a
//! decision as `up` and `tap` show it, and the `key=value` attributes the commands take. A leaf:
//! the commands, `up`, `log` and the output formats all print through it.

use std::time::Duration;

use anyhow::{anyhow, Context};
use bus::tap::TapRecord;
use bus::{codec, State, Value};

use crate::TapOutput;

/// Writes one line to stdout; fails when nobody reads it any more (a closed pipe), where
/// `println!` would panic.
pub fn line(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// Prints a line of a command's output; a reader that went away (`| head`) ends the command
/// quietly instead of a panic.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::print::line(&format!($($arg)*)).map_err(anyhow::Error::from)?
    };
}
pub(crate) use out;

/// `key=value` pairs; a value in brackets (`[a,b]`) or braces is parsed as YAML, so lists and
/// maps can be given, anything else is a string.
pub fn parse_attributes(pairs: &[String]) -> anyhow::Result<State> {
    let mut state = State::new();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| anyhow!("attribute {pair:?} is not key=value"))?;
        let value = if v.starts_with('[') || v.starts_with('{') {
            serde_norway::from_str::<Value>(v)
                .with_context(|| format!("attribute {k}: {v:?} is not a YAML list or map"))?
        } else {
            Value::from(v)
        };
        state.insert(k, value);
    }
    Ok(state)
}

/// A tap record as `policyctl up` prints decisions, or as JSON.
pub fn tap_line(rec: &TapRecord, output: TapOutput) -> anyhow::Result<String> {
    Ok(match output {
        TapOutput::Json => serde_json::to_string(rec)?,
        TapOutput::Human => {
            let attrs: State =
                codec::decode("attributes", &codec::encode("attributes", &rec.attributes)?)
                    .unwrap_or_default();
            let took = std::time::Duration::from_micros(rec.total_us);
            describe(&rec.event, &attrs, &rec.decision, took)
        }
    })
}

pub fn describe(event: &str, attrs: &State, d: &State, took: Duration) -> String {
    let reasons: Vec<String> = match d.get("reasons") {
        Some(Value::Array(rs)) => rs
            .iter()
            .filter_map(|r| {
                let m = r.as_map()?;
                let get = |k: &str| {
                    m.iter()
                        .find(|(kk, _)| kk.as_str() == Some(k))
                        .and_then(|(_, v)| v.as_str())
                        .unwrap_or("?")
                };
                Some(format!(
                    "{}/{} {}",
                    get("agent"),
                    get("policy"),
                    get("effect")
                ))
            })
            .collect(),
        _ => Vec::new(),
    };
    let what = match event {
        "new-connection" => format!(
            "{} -> {} [{}] => {} {}{}",
            attrs.get_str("src_service").unwrap_or("?"),
            attrs.get_str("dst_service").unwrap_or("?"),
            list(attrs.get("dst_peers")),
            d.get_str("action").unwrap_or("?"),
            d.get_str("target_peer")
                .map(|p| format!("to {p}"))
                .unwrap_or_default(),
            cap(d)
        ),
        "connection-closed" => format!("{} closed", attrs.get_str("connection_id").unwrap_or("?")),
        "expose-service" => format!(
            "{} to [{}] => [{}]",
            attrs.get_str("service").unwrap_or("?"),
            list(attrs.get("peers")),
            list(d.get("target_peers"))
        ),
        _ => format!(
            "{} sees [{}] => [{}]",
            attrs.get_str("src_peer").unwrap_or("?"),
            list(attrs.get("services")),
            list(d.get("services"))
        ),
    };
    format!(
        "{event:<21} {what}  ({})  {:.1}ms",
        reasons.join(", "),
        took.as_secs_f64() * 1000.0
    )
}

fn list(v: Option<&Value>) -> String {
    match v {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str())
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}

/// The bandwidth cap of a decision, for display.
fn cap(d: &State) -> String {
    let bps = d
        .get("rate_limit")
        .and_then(|r| r.as_map())
        .and_then(|m| {
            m.iter()
                .find(|(k, _)| k.as_str() == Some("bits_per_second"))
        })
        .and_then(|(_, v)| v.as_u64());
    bps.map(|b| format!(", cap {} Mbit/s", b / 1_000_000))
        .unwrap_or_default()
}

/// A site's standing with its fleet's hub, in one line.
pub fn fleet_status(f: &bus::fleet::FleetStatus) -> String {
    let seen = match f.hub_seen_ms_ago {
        None => "not reached since this dispatcher started".to_string(),
        Some(ms) if ms < 5_000 => "answering".to_string(),
        Some(ms) => format!("last answered {}s ago", ms / 1000),
    };
    let hub = match f.hub_revision {
        Some(h) => format!("hub at revision {h}, {} behind", f.lag),
        None => "hub revision unknown".to_string(),
    };
    let synced = if f.synced {
        ""
    } else {
        "; DENYING every event until it has had the fleet's configuration"
    };
    let reset = if f.hub_reset {
        "; THE HUB'S BUCKET WAS MADE AGAIN (its revisions started over): this site keeps the fleet's documents it has and takes none of the new bucket's below its revision (docs/fleet.md, A hub made again)"
    } else {
        ""
    };
    format!(
        "fleet: site of hub `{}` ({seen}): has fleet revision {}, {hub}{synced}{reset}",
        f.hub, f.revision
    )
}

/// A site as the hub sees it: name, revision applied, lag, when last heard from.
pub fn site_row(s: &bus::fleet::SiteStatus) -> Vec<String> {
    let or_dash = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    // Its revisions are of a bucket the hub no longer has: its lag means nothing.
    let lag = match s.hub_reset {
        true => "hub made again".to_string(),
        false => or_dash(s.lag),
    };
    vec![
        s.name.clone(),
        or_dash(s.revision),
        lag,
        match s.seen_ms_ago {
            None => "never".to_string(),
            Some(ms) if ms < 5_000 => "now".to_string(),
            Some(ms) => format!("{}s ago", ms / 1000),
        },
    ]
}
