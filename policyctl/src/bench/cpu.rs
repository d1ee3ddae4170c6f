//! CPU time of the engine's processes on this host, so `policyctl bench` can say what each
//! one costs per decision. Read from `/proc/<pid>/task/*/schedstat` (nanoseconds on a CPU,
//! per thread, summed): exact, where `/proc/<pid>/stat` counts in 10 ms ticks. Processes on
//! other hosts (a cluster, containers in their own PID namespace) are simply not seen.

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use serde::Serialize;

/// A process of the engine, found by its executable's name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Proc {
    pub pid: u32,
    /// `dispatcher`, `acl`, `nats-server`, `bench` (this process)...
    pub label: String,
}

/// The processes worth measuring: nats-servers, dispatchers, agents and this process.
pub fn engine_processes() -> Vec<Proc> {
    let me = std::process::id();
    let mut found = vec![Proc {
        pid: me,
        label: "policyctl bench".into(),
    }];
    let Ok(dir) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if let Some(label) = label_of(&cmdline) {
            found.push(Proc { pid, label });
        }
    }
    found.sort_by(|a, b| a.label.cmp(&b.label).then(a.pid.cmp(&b.pid)));
    found
}

/// What a command line is, if it is one of the engine's: its arguments are NUL-separated.
fn label_of(cmdline: &[u8]) -> Option<String> {
    let args: Vec<&str> = cmdline
        .split(|b| *b == 0)
        .filter_map(|a| std::str::from_utf8(a).ok())
        .collect();
    let exe = args.first()?.rsplit('/').next()?;
    match exe {
        "nats-server" => {
            // Several servers on one host (a cluster, the system's own): name them by port.
            let port = args
                .windows(2)
                .find(|w| matches!(w[0], "-p" | "--port" | "-port"))
                .map(|w| w[1]);
            Some(match port {
                Some(p) => format!("nats-server :{p}"),
                None => "nats-server".into(),
            })
        }
        "policy-dispatcher" => Some("dispatcher".into()),
        // `policy-agent [flags] <kind> [flags]`: the kind is the first word that is not a flag
        // or a flag's value; the known kinds are enough to find it.
        "policy-agent" => {
            let kind = args
                .iter()
                .skip(1)
                .find(|a| bus::subject::SHIPPED_KINDS.contains(a))
                .copied()
                .unwrap_or("agent");
            Some(format!("agent {kind}"))
        }
        _ => None,
    }
}

/// Nanoseconds the process has spent on a CPU, all its threads; `None` once it is gone.
fn cpu_ns(pid: u32) -> Option<u64> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        let Ok(text) = fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

/// Resident memory of a process now, in bytes (`VmRSS`); `None` once it is gone.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// The largest resident memory each process reached while a phase ran, sampled every 50 ms.
#[derive(Default)]
pub struct PeakRss(BTreeMap<u32, u64>);

impl PeakRss {
    pub fn sample(&mut self, procs: &[Proc]) {
        for p in procs {
            if let Some(rss) = rss_bytes(p.pid) {
                let peak = self.0.entry(p.pid).or_default();
                *peak = (*peak).max(rss);
            }
        }
    }
}

/// CPU time of each process at one instant.
pub struct Sample(BTreeMap<Proc, u64>);

pub fn sample(procs: &[Proc]) -> Sample {
    Sample(
        procs
            .iter()
            .filter_map(|p| Some((p.clone(), cpu_ns(p.pid)?)))
            .collect(),
    )
}

/// One process's CPU per request over a phase.
#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    pub process: String,
    pub pid: u32,
    /// Microseconds of CPU per request answered in the phase.
    pub us_per_request: f64,
    /// Share of one core over the phase.
    pub cores: f64,
    /// The most resident memory seen during the phase, in MB.
    pub peak_rss_mb: f64,
}

/// What each process spent between two samples, per request; processes that spent nothing
/// (an idle server of another test, say) are left out.
pub fn costs(
    before: &Sample,
    after: &Sample,
    peak: &PeakRss,
    requests: u64,
    elapsed: Duration,
) -> Vec<Cost> {
    before
        .0
        .iter()
        .filter_map(|(p, start)| {
            let spent = after.0.get(p)?.checked_sub(*start)?;
            (spent > 0).then(|| Cost {
                process: p.label.clone(),
                pid: p.pid,
                us_per_request: spent as f64 / 1000.0 / requests.max(1) as f64,
                cores: spent as f64 / 1e9 / elapsed.as_secs_f64().max(1e-9),
                peak_rss_mb: peak.0.get(&p.pid).copied().unwrap_or(0) as f64 / 1e6,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(args: &[&str]) -> Vec<u8> {
        args.join("\0").into_bytes()
    }

    #[test]
    fn engine_processes_are_named_by_what_they_are() {
        assert_eq!(
            label_of(&cmd(&["/x/.nats/bin/nats-server", "-js", "-p", "4335"])).as_deref(),
            Some("nats-server :4335")
        );
        assert_eq!(
            label_of(&cmd(&[
                "target/release/policy-dispatcher",
                "--nats-url",
                "n"
            ]))
            .as_deref(),
            Some("dispatcher")
        );
        assert_eq!(
            label_of(&cmd(&[
                "policy-agent",
                "--nats-url",
                "nats://x",
                "conn-limit"
            ]))
            .as_deref(),
            Some("agent conn-limit")
        );
        assert_eq!(label_of(&cmd(&["bash", "-c", "x"])), None);
    }

    #[test]
    fn this_process_spends_cpu_and_is_measured() {
        let me = engine_processes();
        assert_eq!(me[..1].len(), 1);
        let before = sample(&me);
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let after = sample(&me);
        let mut peak = PeakRss::default();
        peak.sample(&me);
        let own = costs(&before, &after, &peak, 1, Duration::from_secs(1));
        assert!(
            own.iter().any(|c| c.process == "policyctl bench"
                && c.us_per_request > 0.0
                && c.peak_rss_mb > 0.0),
            "{own:?}"
        );
    }
}
