//! conn-limit's undo and its copies, called as a dispatcher calls them: a copy of an admission
//! that runs after its event was undone, on whichever instance the queue group hands it to,
//! gives its slot back; a refused copy frees only its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::Action;

use bus::headers;
use bus::roles::Role;
use bus::state::keys;
use bus::{State, Value};
use e2e::{Engine, WAIT};
use serde_json::json;

use crate::battery::msgpack;
use crate::slots::{limited_engine, no_slot_held, slots_held};
use crate::*;

/// A dispatcher's call of conn-limit for `event` with `state` in its state header: the state
/// patch answered.
async fn call(engine: &Engine, event: &str, attributes: serde_json::Value, state: &State) -> State {
    let mut h = async_nats::HeaderMap::new();
    h.insert(
        headers::POLICY_STATE,
        state.to_header().expect("state header").as_str(),
    );
    let reply = bus::client::call(
        &engine.client_as(&Role::Dispatcher).await,
        format!("policy.agent.conn-limit.{event}"),
        h,
        msgpack(attributes).into(),
        WAIT,
    )
    .await
    .unwrap_or_else(|e| panic!("conn-limit on {event}: {e}"));
    State::from_reply(
        headers::get(reply.headers.as_ref(), headers::POLICY_STATE),
        &reply.payload,
        usize::MAX,
    )
    .expect("a state patch")
}

/// One copy of run `run`'s admission of `connection` (`web` → `db`).
async fn admit(engine: &Engine, connection: &str, run: &str) -> State {
    let mut state = State::new();
    state.insert(keys::RUN_ID, run);
    state.insert(keys::EVENT_ID, run);
    state.insert(keys::TARGET_PEER, "p1");
    let attributes = json!({"src_service": "web", "dst_service": "db", "direction": "outgoing",
        "src_peer": "local", "dst_peers": [], "connection_id": connection});
    call(engine, "new-connection", attributes, &state).await
}

/// The effects conn-limit's answer gives, per policy.
fn verdicts(patch: &State) -> Vec<(String, String)> {
    let Some(Value::Array(reasons)) = patch.get(keys::REASONS) else {
        return Vec::new();
    };
    reasons
        .iter()
        .filter_map(|r| {
            let m = r.as_map()?;
            let get = |k: &str| {
                m.iter()
                    .find(|(kk, _)| kk.as_str() == Some(k))?
                    .1
                    .as_str()
                    .map(String::from)
            };
            Some((get("policy")?, get("effect")?))
        })
        .collect()
}

/// A final decision in which conn-limit's reason is `policy` (a failure code, or the policy
/// that refused a hedged call).
fn said(policy: &str) -> State {
    let mut decision = State::new();
    let reason = bus::Reason::new("conn-limit", policy, bus::Effect::Deny);
    decision.insert(keys::REASONS, Value::Array(vec![reason.to_value()]));
    decision
}

/// The dispatcher's `_undo` for run `run` of `connection`, with the final decision: a deny
/// with what conn-limit `answered` (its patch, or [`said`]).
async fn undo(engine: &Engine, connection: &str, run: &str, answered: &State) {
    let mut decision = answered.clone();
    decision.insert(keys::ACTION, "deny");
    decision.insert(keys::CONNECTION_ID, connection);
    decision.insert(keys::RUN_ID, run);
    decision.insert(keys::EVENT_ID, run);
    let reply = bus::client::call(
        &engine.client_as(&Role::Dispatcher).await,
        "policy.agent.conn-limit._undo".to_string(),
        Default::default(),
        decision.encode().expect("decision").into(),
        WAIT,
    )
    .await;
    assert!(reply.is_ok(), "undo of {connection}: {reply:?}");
}

/// A copy of `run`'s admission that arrives after the run was undone. What it answers is used
/// by no one (the run was decided without it): it takes the slot, and gives it back right
/// after its answer.
async fn late_copy_gives_its_slot_back(engine: &Engine, connection: &str, run: &str, what: &str) {
    let late = admit(engine, connection, run).await;
    assert_eq!(
        verdicts(&late),
        [("db".to_string(), "allow".to_string())],
        "{what}"
    );
    no_slot_held(
        engine,
        Duration::from_secs(2),
        &format!("{what} after its undo"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_admitted_after_its_undo_gives_its_slot_back_on_either_instance() {
    let engine = limited_engine(2).await;
    no_slot_held(&engine, Duration::from_secs(5), "the probe's slot").await;
    // The dispatcher timed out on conn-limit and undid the run, while a copy of the call was
    // still on its way: the copy reaches an instance (either of two) after the undo. With the
    // undo known only to the instance it reached, half of these would keep their slot.
    for i in 0..16 {
        let (connection, run) = (format!("late-{i}"), format!("run-{i}"));
        undo(&engine, &connection, &run, &said("agent-timeout")).await;
        late_copy_gives_its_slot_back(&engine, &connection, &run, &format!("late copy {i}")).await;
    }
    // A hedged call whose first answer was a refusal, while another copy admitted: the undo
    // of the refusal frees the other copy's slot, wherever it was taken.
    for i in 0..8 {
        let (connection, run) = (format!("hedged-{i}"), format!("run-h{i}"));
        let other = admit(&engine, &connection, &run).await;
        assert_eq!(verdicts(&other), [("db".to_string(), "allow".to_string())]);
        undo(&engine, &connection, &run, &said("db")).await;
    }
    // An answered admission, undone: freed wherever it was taken; a copy of it after the undo
    // gives back what it writes too.
    for i in 0..8 {
        let (connection, run) = (format!("answered-{i}"), format!("run-a{i}"));
        let first = admit(&engine, &connection, &run).await;
        assert_eq!(verdicts(&first), [("db".to_string(), "allow".to_string())]);
        undo(&engine, &connection, &run, &first).await;
        late_copy_gives_its_slot_back(&engine, &connection, &run, &format!("answered run {i}"))
            .await;
    }
    no_slot_held(&engine, Duration::from_secs(2), "undone runs").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_of_an_admitted_run_shares_its_slots_under_every_policy() {
    let engine = limited_engine(1).await;
    no_slot_held(&engine, Duration::from_secs(5), "the probe's slot").await;
    engine
        .admin()
        .await
        .policy_add(vec![doc(json!({"agent": "conn-limit", "id": "one",
            "match": {"dst_service": "db"}, "max_connections": 1}))])
        .await
        .expect("policy add");
    let allowed = vec![
        ("db".to_string(), "allow".to_string()),
        ("one".to_string(), "allow".to_string()),
    ];
    // Once the new policy applies (a probe admitted under both), the probe is closed.
    eventually("the second policy applies", || async {
        let probe = admit(&engine, "probe", "probe-run").await;
        let closed = json!({"connection_id": "probe", "src_service": "web", "dst_service": "db"});
        call(&engine, "connection-closed", closed, &State::new()).await;
        (verdicts(&probe) == allowed)
            .then_some(())
            .ok_or(format!("{probe:?}"))
    })
    .await;
    no_slot_held(&engine, Duration::from_secs(2), "the probe").await;
    let first = admit(&engine, "c", "r").await;
    assert_eq!(verdicts(&first), allowed, "{first:?}");
    // A copy of the same run, and a run of the same event on another dispatcher: `one`
    // (limit 1) is full, with this very connection, so both are admitted, and the connection
    // still holds one slot per policy.
    for run in ["r", "r2"] {
        let copy = admit(&engine, "c", run).await;
        assert_eq!(verdicts(&copy), allowed, "{run}: {copy:?}");
    }
    let held = slots_held(&engine).await;
    assert_eq!(held, ["db = c#r,r2", "one = c#r,r2"], "one slot per policy");
    // Another connection is refused by `one`; what it took under `db` stays for its run's
    // undo (another copy's allow might have been the answer used).
    let other = admit(&engine, "d", "rd").await;
    assert!(
        verdicts(&other).contains(&("one".to_string(), "deny".to_string())),
        "{other:?}"
    );
    undo(&engine, "d", "rd", &other).await;
    // The second run is denied in the end: the first still holds the slots.
    undo(&engine, "c", "r2", &said("db")).await;
    assert_eq!(slots_held(&engine).await, ["db = c#r", "one = c#r"]);
}

/// A kind that answers `new-connection` with an empty patch while `answering` is set (with
/// `Policy-Cache` if `pure`: it takes nothing), and is silent after; and a spy recording the
/// event id of each `_undo` request it is sent (never answered).
async fn silent_kind(
    engine: &Engine,
    kind: &'static str,
    pure: bool,
    answering: Arc<AtomicBool>,
) -> Arc<Mutex<Vec<String>>> {
    use futures::StreamExt;
    let client = engine.client_as(&Role::Operator).await;
    let mut calls = client
        .queue_subscribe(format!("policy.agent.{kind}.new-connection"), kind.into())
        .await
        .expect("subscribe");
    let undos = client
        .subscribe(format!("policy.agent.{kind}._undo"))
        .await
        .expect("subscribe undo");
    client.flush().await.expect("flush");
    let responder = client.clone();
    tokio::spawn(async move {
        while let Some(msg) = calls.next().await {
            let (Some(reply), true) = (msg.reply, answering.load(Ordering::SeqCst)) else {
                continue;
            };
            let mut h = async_nats::HeaderMap::new();
            h.insert(headers::POLICY_STATE, "gA=="); // an empty map
            if pure {
                h.insert(headers::POLICY_CACHE, "00 attrs=src_service state=");
            }
            let _ = responder
                .publish_with_headers(reply, h, Default::default())
                .await;
        }
    });
    spy(undos)
}

/// Records the event id of each `_undo` request `undos` sees.
fn spy(mut undos: async_nats::Subscriber) -> Arc<Mutex<Vec<String>>> {
    use futures::StreamExt;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Some(msg) = undos.next().await {
            let id = State::decode(&msg.payload)
                .ok()
                .and_then(|d| d.get_str(keys::EVENT_ID).map(String::from))
                .unwrap_or_default();
            record.lock().expect("spy").push(id);
        }
    });
    seen
}

/// A spy on the `_undo` requests a shipped kind is sent (the kind answers them itself).
async fn undo_spy(engine: &Engine, kind: &str) -> Arc<Mutex<Vec<String>>> {
    let client = engine.client_as(&Role::Operator).await;
    let undos = client
        .subscribe(format!("policy.agent.{kind}._undo"))
        .await
        .expect("subscribe undo");
    client.flush().await.expect("flush");
    spy(undos)
}

/// A kind `veto` that denies every `new-connection`.
async fn veto(engine: &Engine) {
    foreign_agent(&engine.nats.url(), "veto", "new-connection", |_, _| async {
        let mut patch = Map::new();
        patch.insert("action".into(), rmpv::Value::from("deny"));
        Some(patch)
    })
    .await;
}

/// How many undo requests of event `id` the spy saw.
fn undos_of(spy: &Mutex<Vec<String>>, id: &str) -> usize {
    spy.lock().expect("spy").iter().filter(|e| *e == id).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_undo_is_one_request_per_attempt_and_none_to_a_failed_kind_whose_answers_are_pure() {
    let mut engine = Engine::new();
    engine.start(&["acl"]).await;
    let answering = Arc::new(AtomicBool::new(true));
    let taker = silent_kind(&engine, "taker", false, Arc::new(AtomicBool::new(true))).await;
    let pure = silent_kind(&engine, "pure", true, answering.clone()).await;
    veto(&engine).await;
    let admin = engine.admin().await;
    let mut short = sub("new-connection", "pure", 20);
    short.timeout_ms = 300;
    subscribe_forced(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "taker", 20),
            short,
            sub("new-connection", "veto", 40),
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
    // Denied by the veto: taker (which said nothing) is undone, pure (which said it takes
    // nothing) is not. taker never confirms, and is asked once per attempt, not hedged.
    eventually("the veto denies", || async {
        let d = hook.new_connection(&conn("web", "db", &["p1"])).await;
        match d {
            Ok(d) if d.action == Action::Deny && !format!("{:?}", d.reasons).contains("agent-") => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let d = hook
        .new_connection(&conn("web2", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(d.action, Action::Deny, "{d:?}");
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        undos_of(&taker, &d.event_id),
        1,
        "one undo request in the first attempt's second"
    );
    assert_eq!(
        undos_of(&pure, &d.event_id),
        0,
        "a pure answer took nothing"
    );
    // pure stops answering: its call fails, and its last answer said it takes nothing.
    answering.store(false, Ordering::SeqCst);
    let d = hook
        .new_connection(&conn("web3", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(effects(&d.reasons, "pure"), [pair("agent-timeout", "deny")]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        undos_of(&pure, &d.event_id),
        0,
        "a failed kind whose answers are pure"
    );
    assert_eq!(
        undos_of(&taker, &d.event_id),
        1,
        "the kind that said nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_an_agent_answers_as_real_is_denied_and_undone() {
    let mut engine = Engine::new();
    engine.start(&["acl"]).await;
    // A kind that knows nothing of dry runs: it answers without echoing the header, so it may
    // have taken something for real.
    let spy = silent_kind(&engine, "legacy", false, Arc::new(AtomicBool::new(true))).await;
    let admin = engine.admin().await;
    subscribe_forced(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "legacy", 20),
        ],
    )
    .await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "open", "action": "allow"}),
        )])
        .await
        .expect("policy add");
    let dry = engine.hook().await.with_dry_run(true);
    eventually("the chain runs", || async {
        let d = dry
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        (effects(&d.reasons, "acl") == [pair("open", "allow")])
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    let d = dry
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert!(d.dry_run, "{d:?}");
    assert_eq!(d.action, Action::Deny, "{d:?}");
    assert_eq!(
        effects(&d.reasons, "dispatcher"),
        [pair("dry-run-ignored", "deny")]
    );
    eventually("what it may have taken is undone", || async {
        (undos_of(&spy, &d.event_id) >= 1)
            .then_some(())
            .ok_or("no undo yet".to_string())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_event_is_undone_by_the_kinds_that_hold_and_only_them() {
    let mut engine = Engine::new();
    engine.start(&["acl", "conn-limit", "rate-limit"]).await;
    veto(&engine).await;
    let admin = engine.admin().await;
    subscribe_forced(
        &admin,
        &[
            sub("new-connection", "acl", 10),
            sub("new-connection", "conn-limit", 20),
            sub("new-connection", "rate-limit", 20),
            sub("new-connection", "veto", 40),
        ],
    )
    .await;
    admin
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "open", "action": "allow"})),
            doc(json!({"agent": "conn-limit", "id": "db", "match": {"dst_service": "db"}, "max_connections": 100})),
            doc(json!({"agent": "rate-limit", "id": "db", "match": {"dst_service": "db"}, "rate": "1000/s", "burst": 1000})),
        ])
        .await
        .expect("policy add");
    let (conn_limit, rate_limit) = (
        undo_spy(&engine, "conn-limit").await,
        undo_spy(&engine, "rate-limit").await,
    );
    let hook = engine.hook().await;
    // rate-limit answers every call (it allows here, without a reason); conn-limit once its
    // policy is loaded.
    eventually("conn-limit counts", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        (!effects(&d.reasons, "conn-limit").is_empty())
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .expect("decision");
        assert_eq!(d.action, Action::Deny, "{d:?}");
        ids.push(d.event_id);
    }
    // conn-limit said it held a slot for each; rate-limit says it never holds anything: a
    // spent token stays spent, and an undo would be a round trip for nothing.
    no_slot_held(&engine, Duration::from_secs(3), "denied events").await;
    for id in &ids {
        assert_eq!(undos_of(&conn_limit, id), 1, "conn-limit, {id}");
        assert_eq!(undos_of(&rate_limit, id), 0, "rate-limit, {id}");
    }
}
