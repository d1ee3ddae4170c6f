//! conn-limit's slots under faults: a slot is never left held by a connection that is gone (or
//! never opened), well before the lease would drop it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus::Action;
use e2e::Engine;
use serde_json::json;

use crate::*;

/// conn-limit's store, as conn-limit reaches it (on a secured bus, only its role may).
pub(crate) async fn slot_store(engine: &Engine) -> async_nats::jetstream::Context {
    let role = bus::roles::Role::of_kind(&bus::Kind::new("conn-limit").expect("kind"));
    engine.jetstream_as(&role, bus::store::Store::Conns).await
}

/// Slots held under every conn-limit policy: `<policy> = <connection>#<runs>` each (a slot is
/// a message per connection in its policy's stream, listing the runs that hold it).
pub(crate) async fn slots_held(engine: &Engine) -> Vec<String> {
    use futures::TryStreamExt;
    let js = slot_store(engine).await;
    let policies = engine
        .admin()
        .await
        .policy_list(Some("conn-limit"))
        .await
        .expect("policy list");
    let mut held = Vec::new();
    for p in policies {
        let Some(id) = p
            .as_map()
            .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("id")))
            .and_then(|(_, v)| v.as_str())
        else {
            continue;
        };
        let Ok(stream) = js
            .get_stream(bus::slots::stream(&engine.subjects(), id))
            .await
        else {
            continue;
        };
        let subjects: Vec<(String, usize)> = stream
            .info_with_subjects(">")
            .await
            .expect("slot subjects")
            .try_collect()
            .await
            .expect("slot subjects");
        for (subject, _) in subjects {
            let Ok(m) = stream.get_last_raw_message_by_subject(&subject).await else {
                continue;
            };
            let connection = subject.rsplit('.').next().unwrap_or("?");
            let runs = String::from_utf8_lossy(&m.payload).replace('\n', ",");
            held.push(format!("{id} = {connection}#{runs}"));
        }
    }
    held.sort();
    held
}

/// Waits up to `within` for every slot to be free; fails naming the ones still held.
pub(crate) async fn no_slot_held(engine: &Engine, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        let held = slots_held(engine).await;
        if held.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            // What the engine said of those connections (with E2E_LOG=debug, everything).
            let logs = engine.logs();
            let said: Vec<&str> = held
                .iter()
                .filter_map(|h| h.split(" = ").nth(1)?.split('#').next())
                .flat_map(|token| logs.lines().filter(move |l| l.contains(token)))
                .take(40)
                .collect();
            panic!(
                "{what}: {} slots still held after {within:?}: {held:?}\n{}",
                held.len(),
                said.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// acl (allow all) and `instances` conn-limit instances with a limit the load never reaches,
/// on `new-connection` and `connection-closed`; the limit is checked to apply.
pub(crate) async fn limited_engine(instances: usize) -> Engine {
    let mut engine = Engine::new();
    for _ in 1..instances {
        engine.agent("conn-limit", &[]);
    }
    engine.start(&["acl", "conn-limit"]).await;
    engine
        .wait_instances("policy-agent-conn-limit", instances)
        .await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "conn-limit", 30),
            sub("connection-closed", "conn-limit", 30),
        ],
    )
    .await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "open", "action": "allow"})),
            doc(json!({"agent": "conn-limit", "id": "db", "match": {"dst_service": "db"}, "max_connections": 10000})),
        ])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    eventually("the limit applies", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        hook_closes(&engine, &d).await;
        (effects(&d.reasons, "conn-limit") == [pair("db", "allow")])
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    engine
}

/// Gateways that open connections and close them, as the contract asks: a close the engine
/// cannot confirm is sent again. A connection refused or undecided is not opened (the client
/// cancels an undecided one itself).
struct Gateways {
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// decisions, closes sent again, errors
    counts: Arc<Mutex<(usize, usize, usize)>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Gateways {
    fn start(hook: &bus::Client, n: usize) -> Gateways {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let counts = Arc::new(Mutex::new((0usize, 0usize, 0usize)));
        let workers = (0..n)
            .map(|_| {
                let (hook, stop, counts) = (hook.clone(), stop.clone(), counts.clone());
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let Ok(d) = hook.new_connection(&conn("web", "db", &["p1"])).await else {
                            counts.lock().unwrap().2 += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        };
                        counts.lock().unwrap().0 += 1;
                        if d.action != Action::Allow {
                            continue;
                        }
                        let closed = bus::event::ConnectionClosed {
                            connection_id: d.connection_id.clone().expect("connection id"),
                            src_service: "web".into(),
                            dst_service: "db".into(),
                            target_peer: d.target_peer.clone(),
                        };
                        while hook.connection_closed(&closed).await.is_err() {
                            counts.lock().unwrap().1 += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                })
            })
            .collect();
        Gateways {
            stop,
            counts,
            workers,
        }
    }

    /// Stops them once every connection they opened is closed: (decisions, closes sent
    /// again, errors).
    async fn finish(self) -> (usize, usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in self.workers {
            let _ = w.await;
        }
        let counts = *self.counts.lock().unwrap();
        counts
    }

    fn decisions(&self) -> usize {
        self.counts.lock().unwrap().0
    }

    /// Waits until the gateways have had `n` more decisions than `since`, or `within` passed:
    /// on a loaded machine a restarted server's JetStream may take seconds to be back, and the
    /// test needs load on both sides of the fault, not a fixed number of seconds of it.
    async fn until_decided(&self, since: usize, n: usize, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        while self.decisions() < since + n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.decisions() - since
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_a_conn_limit_instance_leaks_no_slot() {
    let mut engine = limited_engine(2).await;
    let gateways = Gateways::start(&engine.hook().await, 6);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..2 {
        drop(engine.take_oldest("policy-agent conn-limit"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        engine.agent("conn-limit", &[]);
        engine.wait_instances("policy-agent-conn-limit", 2).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (decisions, resent, errors) = gateways.finish().await;
    println!("conn-limit killed twice: {decisions} decisions, {resent} closes sent again, {errors} errors");
    assert!(decisions > 100);
    // Every admitted connection was closed, and every denied one undone (after the reply, so
    // the last may still be on its way): no slot is left, well before the 1 h lease.
    no_slot_held(&engine, Duration::from_secs(5), "conn-limit killed twice").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_restart_under_gateways_leaks_no_slot() {
    let mut engine = limited_engine(1).await;
    let gateways = Gateways::start(&engine.hook().await, 6);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Decisions the server drops on its way down (an admission made, its answer lost) are
    // cancelled by the gateways' client once it is back.
    let before = gateways.decisions();
    engine.nats.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    engine.nats.restart();
    let restarted = gateways.decisions();
    let after = gateways
        .until_decided(restarted, 100, Duration::from_secs(20))
        .await;
    let (decisions, resent, errors) = gateways.finish().await;
    println!("server down 2 s: {decisions} decisions ({before} before the stop, {after} after the restart), {resent} closes sent again, {errors} errors");
    assert!(before > 0, "no load before the stop");
    assert!(
        after >= 100,
        "only {after} decisions in 20 s after the restart"
    );
    // The undos and cancels the outage left behind are retried with pauses of up to 5 s, and
    // a write whose acknowledgement was lost is looked at again every 5 s (`Slots::settle`).
    no_slot_held(&engine, Duration::from_secs(15), "server down 2 s").await;
    assert!(engine.exited().is_empty(), "{:?}", engine.exited());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_confirmed_close_has_freed_slots_another_instance_took_a_moment_before() {
    let engine = limited_engine(1).await;
    let hook = engine.hook().await;
    no_slot_held(&engine, Duration::from_secs(5), "the probe's slot").await;
    // Another instance takes a slot (written to the store as it would) and the gateway closes
    // the connection at once. Once the close is confirmed, the slot must already be free.
    let js = slot_store(&engine).await;
    let subjects = engine.subjects();
    let stream = js
        .get_stream(bus::slots::stream(&subjects, "db"))
        .await
        .expect("db's slots");
    // Other instances busy with the store meanwhile.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut noise = Vec::new();
    for w in 0..4 {
        let (js, stop, subject) = (
            js.clone(),
            stop.clone(),
            bus::slots::subject(&subjects, "db", &format!("noise-{w}")),
        );
        noise.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(ack) = js.publish(subject.clone(), "noise".into()).await {
                    let _ = ack.await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..50 {
        let connection = format!("gw-{i}");
        let subject = bus::slots::subject(&subjects, "db", &connection);
        js.publish(subject.clone(), "elsewhere".into())
            .await
            .expect("take a slot as another instance")
            .await
            .expect("slot written");
        hook.connection_closed(&bus::event::ConnectionClosed {
            connection_id: connection.clone(),
            src_service: "web".into(),
            dst_service: "db".into(),
            target_peer: None,
        })
        .await
        .expect("close confirmed");
        let held = stream.get_last_raw_message_by_subject(&subject).await;
        assert!(
            held.is_err(),
            "close {i} confirmed, yet its slot is still held: {held:?}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for n in noise {
        let _ = n.await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_decision_made_after_the_hookpoints_deadline_is_a_deny_and_gives_its_slot_back() {
    let mut engine = Engine::new();
    engine.start(&["acl", "conn-limit"]).await;
    // An agent after conn-limit that answers in 800 ms: every run ends after the gateway's
    // 300 ms timeout, with a slot already taken.
    foreign_agent(&engine.nats.url(), "slow", "new-connection", |_, _| async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        Some(Map::new())
    })
    .await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "conn-limit", 20),
            sub("new-connection", "slow", 30),
            sub("connection-closed", "conn-limit", 30),
        ],
    )
    .await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "open", "action": "allow"})),
            doc(json!({"agent": "conn-limit", "id": "db", "match": {"dst_service": "db"}, "max_connections": 10})),
        ])
        .await
        .expect("policy add");
    let d = engine
        .hook()
        .await
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("a patient gateway's decision");
    assert_eq!(d.action, Action::Allow, "{d:?}");
    hook_closes(&engine, &d).await;
    no_slot_held(
        &engine,
        Duration::from_secs(2),
        "the patient gateway's close",
    )
    .await;

    let mut tap = engine
        .client()
        .await
        .subscribe("policy.tap.new-connection")
        .await
        .expect("tap");
    let impatient = engine.hook().await.with_timeout(Duration::from_millis(300));
    let r = impatient.new_connection(&conn("web", "db", &["p1"])).await;
    assert!(r.is_err(), "the gateway gave up, yet got {r:?}");
    // Each copy the gateway sent was decided after it stopped waiting: denied, and its slot
    // given back rather than held for the lease.
    let record = tokio::time::timeout(Duration::from_secs(3), tap.next())
        .await
        .expect("a tap record")
        .expect("tap open");
    let record: bus::tap::TapRecord =
        bus::codec::decode("tap record", &record.payload).expect("tap record");
    assert_eq!(
        record.decision.get_str("action"),
        Some("deny"),
        "{record:?}"
    );
    let reasons = format!("{:?}", record.decision.get("reasons"));
    assert!(reasons.contains("past-deadline"), "{reasons}");
    no_slot_held(&engine, Duration::from_secs(3), "decisions nobody received").await;
}

/// The gateway closes a connection it was allowed.
async fn hook_closes(engine: &Engine, d: &bus::decision::ConnectionDecision) {
    engine
        .hook()
        .await
        .connection_closed(&bus::event::ConnectionClosed {
            connection_id: d.connection_id.clone().expect("connection id"),
            src_service: "web".into(),
            dst_service: "db".into(),
            target_peer: d.target_peer.clone(),
        })
        .await
        .expect("close confirmed");
}
