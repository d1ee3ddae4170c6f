//! `policyctl up --sites 2`: a hub and two sites on this machine, each its own nats-server and
//! engine, in one command; the fleet's examples at the hub, the site examples at each site,
//! traffic to both; Ctrl-C stops all of it.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use e2e::{bin, free_port};

use crate::faults::{ctrl_c_to_the_group, group_members};

/// A port with the next two free as well: the hub's and the sites' client ports.
fn three_free_ports() -> u16 {
    loop {
        let p = free_port();
        let free = |q: u16| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok();
        if p < u16::MAX - 2 && free(p + 1) && free(p + 2) {
            return p;
        }
    }
}

/// `up --sites 2`, then the same fleet secured (`--secure`): every server runs its folder of
/// `auth fleet`, every process its role's seed, every leaf connection its site's leaf
/// identity. One after the other, in one test: each takes ports next to each other, and two at
/// once could take the same.
#[test]
fn policyctl_up_sites_2_runs_a_fleet_plain_and_secured_and_ctrl_c_stops_all_of_it() {
    up_sites_2(None);
    let dir = tempfile::tempdir().expect("temp dir");
    let said = up_sites_2(Some(dir.path()));
    assert!(said.iter().any(|l| l.contains("secured fleet")), "{said:?}");
    for server in ["hub", "site-1", "site-2"] {
        let conf = dir.path().join("fleet").join(server).join("nats.conf");
        assert!(conf.exists(), "{}", conf.display());
    }
    let hub = std::fs::read_to_string(dir.path().join("fleet/hub/accounts.conf")).expect("hub");
    assert!(hub.contains("site site-2's leaf connection (log)"), "{hub}");
}

/// Runs `up --sites 2` (secured with the seeds under `auth`) until both sites decide, and
/// stops it with Ctrl-C; returns what it said.
fn up_sites_2(auth: Option<&std::path::Path>) -> Vec<String> {
    let port = three_free_ports();
    let metrics = three_free_ports();
    let mut cmd = std::process::Command::new(bin("policyctl"));
    cmd.args(["--nats-url", &format!("nats://127.0.0.1:{port}"), "up"]);
    if let Some(dir) = auth {
        cmd.arg("--secure").arg("--auth-dir").arg(dir);
    }
    let mut up = cmd
        .args(["--sites", "2", "--every", "50ms"])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .current_dir(env!("CARGO_MANIFEST_DIR").to_string() + "/..")
        .env("RUST_LOG", "warn")
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("policyctl up --sites 2");
    let pgid = up.id();
    let (tx, rx) = std::sync::mpsc::channel();
    for out in [
        Box::new(up.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
        Box::new(up.stderr.take().expect("stderr")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    // Each site decides on the fleet's rules and its own: batch -> billing, which the fleet
    // leaves open, is allowed by the site's rule at both.
    let mut seen = [false, false];
    let mut said = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen != [true, true] {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                panic!("no decision from both sites; up said:\n{}", said.join("\n"))
            });
        for (i, site) in ["[site-1] ", "[site-2] "].iter().enumerate() {
            if line.starts_with(site)
                && line.contains("batch -> billing")
                && line.contains("acl/site-batch-billing allow")
            {
                seen[i] = true;
            }
        }
        said.push(line);
    }
    assert!(
        said.iter()
            .any(|l| l.contains("hub at") && l.contains("JetStream domain `hub`")),
        "{}",
        said.join("\n")
    );
    assert!(
        group_members(pgid) >= 1 + 3 + 3 * 6,
        "up, three nats-servers, and per engine a dispatcher and five agents"
    );
    ctrl_c_to_the_group(&mut up, Duration::from_secs(15));
    said
}
