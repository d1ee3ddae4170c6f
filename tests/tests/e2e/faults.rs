//! Faults under load, with every outcome counted: correct, wrong, error, timeout. A retry or a
//! sleep that hid a lost decision would be a defect, so the load never retries: each request
//! is one outcome.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus::Action;
use e2e::{bin, free_port, Engine};
use serde_json::json;

use crate::*;

/// What one request of the load came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Correct,
    Wrong,
    Error,
    Timeout,
}

#[derive(Default)]
pub(crate) struct Tally {
    /// (when, what), in the order they came back.
    pub(crate) outcomes: Vec<(Instant, Kind, Duration)>,
    pub(crate) wrong: Vec<String>,
}

impl Tally {
    pub(crate) fn count(&self, kind: Kind) -> usize {
        self.outcomes.iter().filter(|(_, k, _)| *k == kind).count()
    }

    pub(crate) fn summary(&self) -> String {
        format!(
            "{} decisions: {} correct, {} wrong, {} errors, {} timeouts",
            self.outcomes.len(),
            self.count(Kind::Correct),
            self.count(Kind::Wrong),
            self.count(Kind::Error),
            self.count(Kind::Timeout)
        )
    }
}

/// A closed loop of `workers` gateways, each sending `web -> db` over `[p1, p2]` and counting
/// what comes back, until `stop` is set. Correct is the allow-all ACL's allow to p1 or p2.
type Load = (
    Arc<Mutex<Tally>>,
    tokio::sync::watch::Sender<bool>,
    Vec<tokio::task::JoinHandle<()>>,
);

fn load(engine: &Engine, workers: usize) -> Load {
    load_at(engine, &engine.url(), workers)
}

/// [`load`], with the gateways connected to `url` (a list, or one node of a cluster).
pub(crate) fn load_at(engine: &Engine, url: &str, workers: usize) -> Load {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let url: Vec<String> = url.split(',').map(str::to_string).collect();
    let subjects = engine.subjects();
    let handles = (0..workers)
        .map(|_| {
            let (tally, stopped, url, subjects) = (
                tally.clone(),
                stopped.clone(),
                url.clone(),
                subjects.clone(),
            );
            tokio::spawn(async move {
                let nats = async_nats::ConnectOptions::new()
                    .retry_on_initial_connect()
                    .reconnect_delay_callback(bus::client::reconnect_delay)
                    .connect(url)
                    .await
                    .expect("connect");
                let hook = bus::Client::new(nats, subjects).with_timeout(Duration::from_secs(2));
                while !*stopped.borrow() {
                    let t0 = Instant::now();
                    let r = hook.new_connection(&conn("web", "db", &["p1", "p2"])).await;
                    let (kind, wrong) = match r {
                        Ok(d)
                            if d.action == Action::Allow
                                && matches!(d.target_peer.as_deref(), Some("p1" | "p2"))
                                && effects(&d.reasons, "acl") == [pair("open", "allow")] =>
                        {
                            (Kind::Correct, None)
                        }
                        Ok(d) => (Kind::Wrong, Some(format!("{d:?}"))),
                        Err(bus::ClientError::Timeout { .. }) => (Kind::Timeout, None),
                        Err(_) => (Kind::Error, None),
                    };
                    {
                        let mut t = tally.lock().unwrap();
                        t.outcomes.push((Instant::now(), kind, t0.elapsed()));
                        t.wrong.extend(wrong);
                    }
                    if kind != Kind::Correct {
                        // Not a retry: the next request is a new decision, counted on its own.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect();
    (tally, stop, handles)
}

async fn allow_all_acl_lb() -> Engine {
    let mut engine = Engine::new();
    engine.start(&["acl", "lb"]).await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "lb", 20),
        ],
    )
    .await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "open", "action": "allow"}),
        )])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    eventually_allowed(&hook, "allow-all loaded").await;
    engine
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_long_outage_the_server_is_used_again_within_a_second() {
    let mut engine = allow_all_acl_lb().await;
    let (tally, stop, workers) = load(&engine, 4);
    tokio::time::sleep(Duration::from_millis(800)).await;
    engine.nats.stop();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    engine.nats.restart();
    let back = Instant::now();
    // Run on until a few seconds after the server is back, whatever happens.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send_replace(true);
    for w in workers {
        let _ = w.await;
    }
    let t = tally.lock().unwrap();
    println!("server restart after 6 s: {}", t.summary());
    assert!(t.wrong.is_empty(), "wrong decisions: {:?}", t.wrong);
    let first_correct = t
        .outcomes
        .iter()
        .find(|(at, k, _)| *at > back && *k == Kind::Correct)
        .map(|(at, _, _)| *at - back)
        .expect("no correct decision after the server came back");
    println!("first correct decision {first_correct:?} after the server was back");
    assert!(
        first_correct <= Duration::from_millis(1500),
        "{first_correct:?}"
    );
    // During the outage the gateway got prompt errors, not a hang until its timeout.
    let slowest_error = t
        .outcomes
        .iter()
        .filter(|(at, k, _)| {
            *at > down + Duration::from_millis(500) && *at < back && *k != Kind::Correct
        })
        .map(|(_, _, took)| *took)
        .max()
        .unwrap_or_default();
    assert!(
        slowest_error < Duration::from_millis(500),
        "an error took {slowest_error:?}"
    );
    // When each timed-out request was sent, against the outage, for whoever has to chase one.
    let timeouts: Vec<String> = t
        .outcomes
        .iter()
        .filter(|(_, k, _)| *k == Kind::Timeout)
        .map(|(at, _, took)| {
            let sent = *at - *took;
            format!(
                "sent {:?} after the stop, {:.3}s relative to the restart",
                sent.saturating_duration_since(down),
                sent.saturating_duration_since(back).as_secs_f64()
                    - back.saturating_duration_since(sent).as_secs_f64()
            )
        })
        .collect();
    assert!(
        timeouts.is_empty(),
        "{}: {timeouts:#?}\nengine logs:\n{}",
        t.summary(),
        engine.logs()
    );
    assert!(engine.exited().is_empty(), "{:?}", engine.exited());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_nats_unreachable_stops_every_process_within_three_seconds() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut engine = Engine::new();
    engine.agent("monitor", &["--metrics-addr", &metrics]);
    engine.dispatcher();
    engine
        .start(&["acl", "lb", "conn-limit", "rate-limit"])
        .await;
    engine.wait_instances("policy-agent-monitor", 1).await;
    engine.wait_instances("policy-dispatcher", 2).await;
    engine.nats.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let results = engine.terminate_all(Duration::from_secs(5));
    assert_eq!(results.len(), 7);
    for (name, took, clean) in &results {
        println!("{name}: {took:?}, clean {clean}");
        let took = took.unwrap_or_else(|| panic!("{name} did not exit within 5 s"));
        assert!(took <= Duration::from_secs(3), "{name} took {took:?}");
        assert!(clean, "{name} exited with an error");
    }
    let logs = engine.logs();
    assert!(
        logs.contains("NATS is unreachable: abandoning") || logs.contains("could not"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_ctrl_c_stops_policyctl_up_and_everything_it_started() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let url = format!("nats://127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut up = std::process::Command::new(bin("policyctl"))
        .args([
            "--nats-url",
            &url,
            "up",
            "--every",
            "50ms",
            "--metrics-addr",
            &metrics,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR").to_string() + "/..")
        .env("RUST_LOG", "warn")
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("policyctl up");
    let pgid = up.id();
    // The signal below goes to this group: make sure it is up's own, not the test's.
    let group = std::process::Command::new("ps")
        .args(["-o", "pgid=", "-p", &pgid.to_string()])
        .output()
        .expect("ps");
    assert_eq!(
        String::from_utf8_lossy(&group.stdout).trim(),
        pgid.to_string(),
        "policyctl up is not in a process group of its own"
    );
    let stderr = up.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("policyctl up never said it loaded the examples");
        if line.starts_with("loaded ") {
            break;
        }
    }
    assert!(
        group_members(pgid) >= 7,
        "up, nats-server, the dispatcher and five agents"
    );
    let gone = ctrl_c_to_the_group(&mut up, Duration::from_secs(8));
    println!("policyctl up and everything it started gone {gone:?} after Ctrl-C");
}

/// How many processes are in the process group `pgid` (a zombie counts).
pub(crate) fn group_members(pgid: u32) -> usize {
    let out = std::process::Command::new("pgrep")
        .args(["-g", &pgid.to_string()])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// What a terminal does on Ctrl-C: SIGINT to the whole process group of `leader` (which leads
/// a group of its own), NATS included; then waits until every member is gone, for at most
/// `within`. Returns how long that took.
pub(crate) fn ctrl_c_to_the_group(leader: &mut std::process::Child, within: Duration) -> Duration {
    let pgid = leader.id();
    let pressed = Instant::now();
    // `--`: without it, procps's kill does not take `-<pgid>` as a process group.
    let _ = std::process::Command::new("kill")
        .args(["-s", "INT", "--", &format!("-{pgid}")])
        .status();
    // Reap the leader as soon as it exits: a zombie still counts as a member of its group.
    while leader.try_wait().expect("wait").is_none() || group_members(pgid) > 0 {
        assert!(
            pressed.elapsed() < within,
            "{} processes left after {within:?}",
            group_members(pgid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone = pressed.elapsed();
    let _ = leader.wait();
    gone
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_of_every_process_fails_no_decision() {
    let mut engine = Engine::new();
    engine.dispatcher();
    engine.agent("acl", &[]);
    engine.agent("lb", &[]);
    engine.start(&["acl", "lb"]).await;
    engine.wait_instances("policy-dispatcher", 2).await;
    engine.wait_instances("policy-agent-acl", 2).await;
    engine.wait_instances("policy-agent-lb", 2).await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "lb", 20),
        ],
    )
    .await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "open", "action": "allow"}),
        )])
        .await
        .expect("policy add");
    eventually_allowed(&engine.hook().await, "allow-all loaded").await;

    let (tally, stop, workers) = load(&engine, 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // One at a time, oldest first: SIGTERM, wait for it to exit, start its replacement, wait
    // until it is ready. Each kind always has an instance serving.
    for (name, service) in [
        ("policy-dispatcher", "policy-dispatcher"),
        ("policy-dispatcher", "policy-dispatcher"),
        ("policy-agent acl", "policy-agent-acl"),
        ("policy-agent acl", "policy-agent-acl"),
        ("policy-agent lb", "policy-agent-lb"),
        ("policy-agent lb", "policy-agent-lb"),
    ] {
        let old = engine.take_oldest(name);
        let clean = tokio::task::spawn_blocking(move || old.terminate())
            .await
            .expect("terminate");
        assert!(clean, "{name} did not stop cleanly");
        match name {
            "policy-dispatcher" => engine.dispatcher(),
            _ => engine.agent(name.trim_start_matches("policy-agent "), &[]),
        };
        engine.wait_instances(service, 2).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send_replace(true);
    for w in workers {
        let _ = w.await;
    }
    let t = tally.lock().unwrap();
    println!("rolling restart of 6 processes: {}", t.summary());
    assert!(t.count(Kind::Correct) > 100, "{}", t.summary());
    assert_eq!(
        t.count(Kind::Correct),
        t.outcomes.len(),
        "{}; wrong: {:?}",
        t.summary(),
        t.wrong.iter().take(3).collect::<Vec<_>>()
    );
}

/// Two instances each of acl and lb behind one dispatcher, with the default 250 ms timeout.
async fn two_of_each() -> Engine {
    let mut engine = Engine::new();
    engine.agent("acl", &[]);
    engine.agent("lb", &[]);
    engine.start(&["acl", "lb"]).await;
    engine.wait_instances("policy-agent-acl", 2).await;
    engine.wait_instances("policy-agent-lb", 2).await;
    let admin = engine.admin().await;
    let mut subs = [
        sub("new-connection", "acl", 10),
        sub("new-connection", "lb", 20),
    ];
    for s in &mut subs {
        s.timeout_ms = bus::admin::DEFAULT_TIMEOUT_MS;
    }
    subscribe(&admin, &subs).await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "open", "action": "allow"}),
        )])
        .await
        .expect("policy add");
    eventually_allowed(&engine.hook().await, "allow-all loaded").await;
    engine
}

async fn finish(
    tally: Arc<Mutex<Tally>>,
    stop: tokio::sync::watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    what: &str,
) {
    stop.send_replace(true);
    for w in workers {
        let _ = w.await;
    }
    let t = tally.lock().unwrap();
    println!("{what}: {}", t.summary());
    assert!(t.count(Kind::Correct) > 100, "{}", t.summary());
    assert_eq!(
        t.count(Kind::Correct),
        t.outcomes.len(),
        "{}; wrong: {:?}",
        t.summary(),
        t.wrong.iter().take(3).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_an_instance_under_load_makes_no_wrong_decision() {
    let mut engine = two_of_each().await;
    let (tally, stop, workers) = load(&engine, 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for kind in ["acl", "lb", "acl", "lb"] {
        // Dropping a process is kill -9: it answers nothing it had received.
        drop(engine.take_oldest(&format!("policy-agent {kind}")));
        tokio::time::sleep(Duration::from_millis(300)).await;
        engine.agent(kind, &[]);
        engine
            .wait_instances(&format!("policy-agent-{kind}"), 2)
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    finish(tally, stop, workers, "4 kill -9 of one of two instances").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_a_dispatcher_or_a_rate_limiter_under_load_makes_no_wrong_decision() {
    // Two dispatchers and two rate-limit instances (with a rate the load never reaches, so
    // every decision is the allow-all ACL's), one acl and one lb.
    let mut engine = Engine::new();
    engine.dispatcher();
    engine.agent("rate-limit", &[]);
    engine.start(&["acl", "lb", "rate-limit"]).await;
    engine.wait_instances("policy-dispatcher", 2).await;
    engine.wait_instances("policy-agent-rate-limit", 2).await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "rate-limit", 15),
            sub("new-connection", "lb", 20),
        ],
    )
    .await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "open", "action": "allow"})),
            doc(json!({"agent": "rate-limit", "id": "db", "match": {"dst_service": "db"}, "rate": "1000000/s", "burst": 100000})),
        ])
        .await
        .expect("policy add");
    eventually_allowed(&engine.hook().await, "allow-all loaded").await;
    let (tally, stop, workers) = load(&engine, 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, service) in [
        ("policy-dispatcher", "policy-dispatcher"),
        ("policy-agent rate-limit", "policy-agent-rate-limit"),
        ("policy-dispatcher", "policy-dispatcher"),
        ("policy-agent rate-limit", "policy-agent-rate-limit"),
    ] {
        drop(engine.take_oldest(name));
        tokio::time::sleep(Duration::from_millis(300)).await;
        match name {
            "policy-dispatcher" => engine.dispatcher(),
            _ => engine.agent("rate-limit", &[]),
        };
        engine.wait_instances(service, 2).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    finish(
        tally,
        stop,
        workers,
        "4 kill -9 of one of two dispatchers or rate limiters",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_instance_under_load_makes_no_wrong_decision() {
    let mut engine = two_of_each().await;
    let (tally, stop, workers) = load(&engine, 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SIGSTOP: its connection stays open, so the server keeps routing to it.
    let frozen = engine.take_oldest("policy-agent acl");
    let pid = frozen.pid().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    tokio::time::sleep(Duration::from_millis(700)).await;
    finish(tally, stop, workers, "one of two acl instances frozen 3 s").await;
    drop(frozen);
}

#[tokio::test(flavor = "multi_thread")]
async fn policyctl_up_cluster_3_runs_the_engine_spread_over_three_servers() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    // Three consecutive free client ports from here.
    let port = loop {
        let p = free_port();
        if (1..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            break p;
        }
    };
    let url = format!("nats://127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut up = std::process::Command::new(bin("policyctl"))
        .args([
            "--nats-url",
            &url,
            "up",
            "--cluster",
            "3",
            "--every",
            "0",
            "--metrics-addr",
            &metrics,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR").to_string() + "/..")
        .env("RUST_LOG", "warn")
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("policyctl up --cluster 3");
    let pgid = up.id();
    let stderr = up.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut said = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("policyctl up never loaded the examples: {said:?}"));
        let done = line.starts_with("loaded ");
        said.push(line);
        if done {
            break;
        }
    }
    assert!(said.iter().any(|l| l.contains("3-node")), "{said:?}");
    let servers = std::process::Command::new("pgrep")
        .args(["-g", &pgid.to_string(), "nats-server"])
        .output()
        .expect("pgrep");
    assert_eq!(String::from_utf8_lossy(&servers.stdout).lines().count(), 3);
    // A hookpoint on the third server is decided, and the config bucket has three replicas.
    let third = format!("nats://127.0.0.1:{}", port + 2);
    let out = std::process::Command::new(bin("policyctl"))
        .args([
            "--nats-url",
            &third,
            "emit",
            "expose-service",
            "service=db",
            "peers=[peer-a,peer-b]",
        ])
        .output()
        .expect("policyctl emit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let js =
        async_nats::jetstream::new(async_nats::connect(third.as_str()).await.expect("connect"));
    let mut stream = js
        .get_stream("KV_policy_config")
        .await
        .expect("config stream");
    assert_eq!(stream.info().await.expect("info").config.num_replicas, 3);
    let _ = std::process::Command::new("kill")
        .args(["-s", "INT", "--", &format!("-{pgid}")])
        .status();
    let pressed = Instant::now();
    while up.try_wait().expect("wait").is_none() {
        assert!(
            pressed.elapsed() < Duration::from_secs(10),
            "policyctl up did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
