//! The stateful agents: exact connection limits and global rate limits across instances.

use std::time::{Duration, Instant};

use bus::event::ConnectionClosed;
use bus::{Action, ConnectionDecision};
use e2e::Engine;
use serde_json::json;

use crate::*;

async fn conn_limit_engine(
    instances: usize,
    args: &[&str],
    limit: u32,
) -> (Engine, AdminClient, bus::Client) {
    let mut engine = Engine::new();
    engine.start_scaled("conn-limit", instances, args).await;
    let admin = engine.admin().await;
    subscribe(
        &admin,
        &[
            sub("new-connection", "conn-limit", 30),
            sub("connection-closed", "conn-limit", 30),
        ],
    )
    .await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "conn-limit", "id": "db-limit", "match": {"dst_service": "db"},
            "max_connections": limit}),
        )])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    // Every instance has the policy once a connection is counted by it; that one is closed.
    eventually("policy loaded", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        if effects(&d.reasons, "conn-limit")
            .first()
            .map(|(p, _)| p.as_str())
            != Some("db-limit")
        {
            return Err(format!("{d:?}"));
        }
        close(&hook, &d).await;
        Ok(())
    })
    .await;
    (engine, admin, hook)
}

async fn close(hook: &bus::Client, d: &ConnectionDecision) {
    hook.connection_closed(&ConnectionClosed {
        connection_id: d.connection_id.clone().expect("connection id"),
        src_service: "web".into(),
        dst_service: "db".into(),
        target_peer: d.target_peer.clone(),
    })
    .await
    .expect("close");
}

async fn burst(hook: &bus::Client, n: usize) -> Vec<ConnectionDecision> {
    let sends = (0..n).map(|_| {
        let hook = hook.clone();
        async move {
            hook.new_connection(&conn("web", "db", &["p1"]))
                .await
                .expect("decision")
        }
    });
    futures::future::join_all(sends).await
}

fn allowed(ds: &[ConnectionDecision]) -> Vec<&ConnectionDecision> {
    ds.iter().filter(|d| d.action == Action::Allow).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_never_admit_more_than_the_limit_and_close_frees_a_slot() {
    let (_engine, _admin, hook) = conn_limit_engine(2, &[], 5).await;
    let first = burst(&hook, 40).await;
    let admitted = allowed(&first);
    assert_eq!(admitted.len(), 5, "limit 5, admitted {}", admitted.len());
    let denied = first
        .iter()
        .find(|d| d.action == Action::Deny)
        .expect("some denied");
    assert_eq!(
        effects(&denied.reasons, "conn-limit"),
        [pair("db-limit", "deny")]
    );

    // Still full: another concurrent wave admits nothing.
    assert!(allowed(&burst(&hook, 20).await).is_empty());

    close(&hook, admitted[0]).await;
    close(&hook, admitted[1]).await;
    // Other instances see the freed slots a moment later; never more than two are taken.
    let mut got = 0;
    let deadline = Instant::now() + WAIT;
    while got < 2 && Instant::now() < deadline {
        got += allowed(&burst(&hook, 10).await).len();
    }
    assert_eq!(got, 2, "admitted after freeing 2");
    assert!(allowed(&burst(&hook, 10).await).is_empty(), "full again");
}

/// Writes to a bucket so far (its stream's last sequence).
async fn bucket_writes(engine: &Engine, bucket: &str) -> u64 {
    let js = async_nats::jetstream::new(engine.client().await);
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .expect("bucket stream");
    stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence
}

/// The burst of issue 19: 300 connections at once against a limit of 100 on two instances
/// admit exactly 100, each holding exactly one slot, and no slot is held by a refused one.
/// Hedged copies of a call (a burst makes the dispatcher hedge) share their connection's slot
/// instead of taking a second one, so the limit is not eaten by copies.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_three_times_the_limit_on_two_instances_admits_exactly_the_limit() {
    let limit = 100;
    let (engine, _admin, hook) = conn_limit_engine(2, &[], limit).await;
    let decisions = burst(&hook, 300).await;
    let admitted: Vec<String> = allowed(&decisions)
        .iter()
        .filter_map(|d| d.connection_id.clone())
        .collect();
    // Refused connections' runs are undone after the replies; a slot one of them still held
    // would show below as a connection that was not admitted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let connection = |h: &String| {
        h.split(" = ")
            .nth(1)
            .and_then(|l| l.split('#').next())
            .unwrap_or("?")
            .to_string()
    };
    let mut held = crate::slots::slots_held(&engine).await;
    while held.iter().any(|h| !admitted.contains(&connection(h))) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        held = crate::slots::slots_held(&engine).await;
    }
    println!(
        "{} of 300 admitted under a limit of {limit}; {} slots held",
        admitted.len(),
        held.len()
    );
    assert_eq!(admitted.len(), limit as usize, "exactly the limit admitted");
    let mut holders: Vec<String> = held.iter().map(connection).collect();
    holders.sort();
    let mut expected = admitted.clone();
    expected.sort();
    assert_eq!(
        holders, expected,
        "one slot per admitted connection, none for a refused one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn three_instances_racing_for_a_single_slot_admit_one() {
    let (_engine, _admin, hook) = conn_limit_engine(3, &[], 1).await;
    for round in 0..4 {
        let wave = burst(&hook, 30).await;
        let admitted = allowed(&wave);
        assert_eq!(
            admitted.len(),
            1,
            "round {round}: limit 1, admitted {}",
            admitted.len()
        );
        close(&hook, admitted[0]).await;
        // Wait until every instance sees the slot free again before the next race.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_is_released_when_a_later_agent_denies() {
    let (engine, admin, hook) = conn_limit_engine(1, &[], 1).await;
    foreign_agent(
        &engine.nats.url(),
        "veto",
        "new-connection",
        |attrs, _| async move {
            let src = attrs
                .as_map()?
                .iter()
                .find(|(k, _)| k.as_str() == Some("src_service"))?
                .1
                .as_str()?
                .to_string();
            let mut patch = Map::new();
            patch.insert(
                "action".into(),
                V::from(if src == "blocked" { "deny" } else { "allow" }),
            );
            Some(patch)
        },
    )
    .await;
    subscribe(&admin, &[sub("new-connection", "veto", 40)]).await;
    let d = hook
        .new_connection(&conn("blocked", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Deny);
    assert_eq!(
        effects(&d.reasons, "conn-limit"),
        [pair("db-limit", "allow")],
        "the slot was taken first"
    );
    eventually("the denied connection's slot is free again", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        (d.action == Action::Allow)
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_whose_close_never_comes_expires_with_the_lease() {
    let (_engine, _admin, hook) = conn_limit_engine(1, &["--lease", "1s"], 1).await;
    let d = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Allow);
    let held = Instant::now();
    let d = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Deny, "the slot is still held");
    eventually("the lease frees the slot", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        (d.action == Action::Allow)
            .then_some(())
            .ok_or("still held".to_string())
    })
    .await;
    assert!(
        held.elapsed() >= Duration::from_millis(900),
        "freed after {:?}, before the lease",
        held.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_instance_knows_the_live_connections() {
    let (mut engine, _admin, hook) = conn_limit_engine(1, &[], 2).await;
    let live = allowed(&burst(&hook, 2).await)
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(live.len(), 2);
    drop(engine.take("policy-agent conn-limit"));
    engine.agent("conn-limit", &[]);
    engine.wait_instances("policy-agent-conn-limit", 1).await;
    let d = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(
        d.action,
        Action::Deny,
        "a new instance forgot the live connections: {d:?}"
    );
    close(&hook, &live[0]).await;
    let d = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(
        d.action,
        Action::Allow,
        "the close reached the new instance: {d:?}"
    );
}

/// Sends `web -> dst` connections as fast as `workers` callers can for `span`, returning the
/// admitted and the sent counts and the time it really took.
async fn hammer(
    hook: &bus::Client,
    dst: &'static str,
    workers: usize,
    span: Duration,
) -> (usize, usize, Duration) {
    let start = Instant::now();
    let tasks = (0..workers).map(|_| {
        let hook = hook.clone();
        tokio::spawn(async move {
            let (mut ok, mut sent) = (0, 0);
            while start.elapsed() < span {
                let d = hook
                    .new_connection(&conn("web", dst, &["p1"]))
                    .await
                    .expect("decision");
                ok += usize::from(d.action == Action::Allow);
                sent += 1;
            }
            (ok, sent)
        })
    });
    let (admitted, sent) = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("join"))
        .fold((0, 0), |(a, s), (ok, n)| (a + ok, s + n));
    (admitted, sent, start.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rate_bound_holds_with_one_and_with_two_instances() {
    let (rate, burst_size) = (20.0, 5.0);
    for instances in [1, 2] {
        let mut engine = Engine::new();
        engine.start_scaled("rate-limit", instances, &[]).await;
        let admin = engine.admin().await;
        subscribe(&admin, &[sub("new-connection", "rate-limit", 40)]).await;
        admin
            .policy_add(vec![doc(
                json!({"agent": "rate-limit", "id": "db-rate", "match": {"dst_service": "db"},
                "rate": "20/s", "burst": 5}),
            )])
            .await
            .expect("policy add");
        let hook = engine.hook().await;
        eventually("rate policy loaded", || async {
            let d = hook
                .new_connection(&conn("web", "db", &["p1"]))
                .await
                .map_err(|e| e.to_string())?;
            (!effects(&d.reasons, "rate-limit").is_empty() || d.action == Action::Deny)
                .then_some(())
                .ok_or(format!("{d:?}"))
        })
        .await;
        // Let the budget refill, then push far more than the rate.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (admitted, _, took) = hammer(&hook, "db", 8, Duration::from_secs(2)).await;
        // At 20/s an allotment is one token (50 ms of the rate): each instance holds at most one.
        let bound = rate * took.as_secs_f64() + burst_size + 1.0 + instances as f64;
        assert!(
            admitted as f64 <= bound,
            "{instances} instance(s): {admitted} admitted in {took:?}, bound {bound:.1}"
        );
        assert!(
            admitted as f64 >= rate * 1.5,
            "{instances} instance(s): only {admitted} admitted in {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_instances_spend_allotments_within_the_bound_and_far_from_it_write_rarely() {
    // 200/s: an allotment holds at most 10 tokens (50 ms of the rate).
    let (rate, burst, cap, instances) = (200.0, 10.0, 10.0, 3.0);
    let mut engine = Engine::new();
    engine.start_scaled("rate-limit", 3, &[]).await;
    let admin = engine.admin().await;
    subscribe(&admin, &[sub("new-connection", "rate-limit", 40)]).await;
    admin
        .policy_add(vec![
            doc(
                json!({"agent": "rate-limit", "id": "db-rate", "match": {"dst_service": "db"},
                "rate": "200/s", "burst": 10}),
            ),
            doc(
                json!({"agent": "rate-limit", "id": "api-rate", "match": {"dst_service": "api"},
                "rate": "1000000/s", "burst": 1000, "bandwidth": "1Gbit/s"}),
            ),
        ])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    eventually("rate policies loaded", || async {
        let d = hook
            .new_connection(&conn("web", "api", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        (!effects(&d.reasons, "rate-limit").is_empty())
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;

    // Near the limit: every instance takes small allotments, and the bound holds.
    let (admitted, _, took) = hammer(&hook, "db", 32, Duration::from_secs(2)).await;
    let bound = rate * took.as_secs_f64() + burst + 1.0 + instances * cap;
    println!("near the limit: {admitted} admitted in {took:?}, bound {bound:.1}");
    assert!(
        admitted as f64 <= bound,
        "{admitted} admitted in {took:?}, bound {bound:.1}"
    );
    assert!(
        admitted as f64 >= 0.75 * rate * took.as_secs_f64(),
        "only {admitted} admitted in {took:?} at {rate}/s"
    );

    // Far from the limit: allotments cover the demand, so most admissions write nothing.
    let bucket = engine.subjects().rate_bucket();
    let before = bucket_writes(&engine, &bucket).await;
    let (admitted, sent, _) = hammer(&hook, "api", 32, Duration::from_secs(2)).await;
    assert_eq!(
        admitted, sent,
        "far from the limit, every connection is admitted"
    );
    let writes = bucket_writes(&engine, &bucket).await - before;
    println!("far from the limit: {admitted} admitted with {writes} writes");
    assert!(
        writes * 4 <= admitted as u64,
        "{writes} writes for {admitted} admissions: allotments should amortise them"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bandwidth_cap_is_the_most_restrictive_and_a_rate_deny_names_its_policy() {
    let mut engine = Engine::new();
    engine.start(&["rate-limit"]).await;
    let admin = engine.admin().await;
    subscribe(&admin, &[sub("new-connection", "rate-limit", 40)]).await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "rate-limit", "id": "all-10m", "bandwidth": "10Mbit/s"})),
            doc(json!({"agent": "rate-limit", "id": "db-2m", "match": {"dst_service": "db"}, "bandwidth": "2Mbit/s"})),
            doc(json!({"agent": "rate-limit", "id": "one-api", "match": {"dst_service": "api"}, "rate": "1/h"})),
        ])
        .await
        .expect("policy add");
    let hook = engine.hook().await;
    eventually("caps applied", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        let cap = d.rate_limit.map(|r| r.bits_per_second);
        if cap != Some(2_000_000) {
            return Err(format!("{d:?}"));
        }
        assert_eq!(
            effects(&d.reasons, "rate-limit"),
            [pair("all-10m", "limit"), pair("db-2m", "limit")]
        );
        Ok(())
    })
    .await;
    let d = hook
        .new_connection(&conn("web", "cache", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(d.rate_limit.map(|r| r.bits_per_second), Some(10_000_000));
    let first = hook
        .new_connection(&conn("web", "api", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(first.action, Action::Allow);
    let second = hook
        .new_connection(&conn("web", "api", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(second.action, Action::Deny);
    assert_eq!(
        effects(&second.reasons, "rate-limit"),
        [pair("one-api", "deny")]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_a_connection_no_limit_counted_is_answered_at_once() {
    let (_engine, admin, hook) = conn_limit_engine(1, &[], 5).await;
    // A tight timeout, failing closed: a close that waited on anything would be denied.
    let mut closing = sub("connection-closed", "conn-limit", 30);
    closing.timeout_ms = 100;
    subscribe(&admin, &[closing]).await;
    let d = hook
        .new_connection(&conn("web", "cache", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Allow);
    assert!(
        effects(&d.reasons, "conn-limit").is_empty(),
        "no policy matches cache"
    );
    for _ in 0..3 {
        let ack = hook
            .connection_closed(&ConnectionClosed {
                connection_id: d.connection_id.clone().expect("id"),
                src_service: "web".into(),
                dst_service: "cache".into(),
                target_peer: d.target_peer.clone(),
            })
            .await
            .expect("close");
        assert_eq!(ack.extra.get("action"), None, "the close failed: {ack:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_close_conn_limit_cannot_confirm_is_an_error_and_sending_it_again_frees_the_slot() {
    let (mut engine, _admin, hook) = conn_limit_engine(1, &[], 1).await;
    let held = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(held.action, Action::Allow);
    let limiter = engine.take("policy-agent conn-limit");
    assert!(limiter.terminate(), "conn-limit did not stop cleanly");
    let closed = ConnectionClosed {
        connection_id: held.connection_id.clone().expect("connection id"),
        src_service: "web".into(),
        dst_service: "db".into(),
        target_peer: held.target_peer.clone(),
    };
    // An ack here would hide that the slot is still held.
    let err = hook.connection_closed(&closed).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Some(bus::ErrorCode::AgentError | bus::ErrorCode::AgentTimeout)
        ),
        "{err}"
    );
    assert!(err.to_string().contains("send it again"), "{err}");
    engine.agent("conn-limit", &[]);
    engine.wait_instances("policy-agent-conn-limit", 1).await;
    hook.connection_closed(&closed)
        .await
        .expect("the close, again");
    eventually("the slot is free again", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        (d.action == Action::Allow)
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
}

/// A `connection-status` report for a connection.
fn status(d: &ConnectionDecision, state: &str) -> bus::State {
    let mut s = bus::State::new();
    s.insert(
        "connection_id",
        d.connection_id.clone().expect("connection id"),
    );
    s.insert("state", state);
    s.insert("bytes_in", 10);
    s.insert("bytes_out", 20);
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_reports_itself_open_keeps_its_slot_past_the_lease() {
    let (_engine, admin, hook) = conn_limit_engine(1, &["--lease", "1s"], 1).await;
    subscribe(&admin, &[sub("connection-status", "conn-limit", 30)]).await;
    let live = hook
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(live.action, Action::Allow);
    // Three leases long, reporting every 300 ms: the slot stays held.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        hook.emit("connection-status", &status(&live, "open"))
            .await
            .expect("status");
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .expect("decision");
        assert_eq!(
            d.action,
            Action::Deny,
            "the live connection lost its slot after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A `closed` status frees it as a close does.
    hook.emit("connection-status", &status(&live, "closed"))
        .await
        .expect("status");
    eventually("the closed connection's slot is free", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        (d.action == Action::Allow)
            .then_some(())
            .ok_or("still held".to_string())
    })
    .await;
}
