//! A fleet under faults, with every outcome counted as in the fault suite: a site's link to
//! the hub cut (a proxy on loopback that adds WAN latency and drops everything while cut),
//! the hub down, a site restarted while cut off. Sites keep deciding on their last fleet
//! configuration; the fleet's changes made meanwhile arrive once the link is back, in order.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus::Action;
use e2e::fleet::{hub_engine, start_hub_as, start_site, start_site_as, FleetServers, HUB_DOMAIN};
use e2e::proxy::Proxy;
use e2e::{free_port, Engine};
use serde_json::json;

use crate::faults::{Kind, Tally};
use crate::fleet::decides;
use crate::*;

/// Each way's added latency on the leaf links: a WAN.
const WAN: Duration = Duration::from_millis(25);

/// How long until `hook` decides `want` for `web -> dst` (polled every 10 ms, bounded).
async fn time_until(hook: &bus::Client, dst: &str, want: Action, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        if decides(hook, dst).await == Ok(want) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "web -> {dst} not {want:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The fleet change the tests make: allow `cache`.
fn cache_ok() -> bus::Value {
    doc(json!({"agent": "acl", "id": "cache-ok", "priority": 100,
        "action": "allow", "match": {"dst_service": "cache"}}))
}

/// The fleet every test here starts from: the ACL on new connections, db denied and api
/// allowed by the fleet.
async fn apply_fleet(hub: &Engine) {
    let fleet = hub.admin().await;
    subscribe(&fleet, &[sub("new-connection", "acl", 10)]).await;
    fleet
        .policy_add(vec![
            doc(
                json!({"agent": "acl", "id": "no-db", "priority": 100, "action": "deny",
                "match": {"dst_service": "db"}}),
            ),
            doc(
                json!({"agent": "acl", "id": "api-ok", "priority": 100, "action": "allow",
                "match": {"dst_service": "api"}}),
            ),
        ])
        .await
        .expect("fleet policies");
}

type Load = (
    Arc<Mutex<Tally>>,
    tokio::sync::watch::Sender<bool>,
    Vec<tokio::task::JoinHandle<()>>,
);

/// A closed loop of `workers` gateways at one site, alternating `web -> db` (correct: the
/// fleet's deny) and `web -> api` (correct: the fleet's allow), never retrying.
async fn load(site: &Engine, workers: usize) -> Load {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let subjects = site.subjects();
    // Each gateway its own connection, as the gateway role on a secured bus.
    let mut clients = Vec::new();
    for _ in 0..workers {
        clients.push(site.client_as(&bus::roles::Role::Gateway).await);
    }
    let handles = clients
        .into_iter()
        .enumerate()
        .map(|(w, nats)| {
            let (tally, stopped, subjects) = (tally.clone(), stopped.clone(), subjects.clone());
            tokio::spawn(async move {
                let hook = bus::Client::new(nats, subjects).with_timeout(Duration::from_secs(2));
                let mut i = w;
                while !*stopped.borrow() {
                    i += 1;
                    let (dst, want, by) = if i % 2 == 0 {
                        ("db", Action::Deny, pair("no-db", "deny"))
                    } else {
                        ("api", Action::Allow, pair("api-ok", "allow"))
                    };
                    let t0 = Instant::now();
                    let (kind, wrong) = match hook.new_connection(&conn("web", dst, &["p1"])).await
                    {
                        Ok(d) if d.action == want && effects(&d.reasons, "acl") == [by.clone()] => {
                            (Kind::Correct, None)
                        }
                        Ok(d) => (Kind::Wrong, Some(format!("{d:?}"))),
                        Err(bus::ClientError::Timeout { .. }) => (Kind::Timeout, None),
                        Err(e) => (Kind::Error, Some(e.to_string())),
                    };
                    let mut t = tally.lock().unwrap();
                    t.outcomes.push((Instant::now(), kind, t0.elapsed()));
                    t.wrong.extend(wrong);
                }
            })
        })
        .collect();
    (tally, stop, handles)
}

async fn finish(site: &str, (tally, stop, handles): Load) -> String {
    let _ = stop.send(true);
    for h in handles {
        h.await.expect("load task");
    }
    let t = tally.lock().unwrap();
    let summary = format!("{site}: {}", t.summary());
    assert!(t.count(Kind::Correct) > 100, "{summary}");
    assert_eq!(
        t.count(Kind::Correct),
        t.outcomes.len(),
        "{summary}; {:?}",
        t.wrong.iter().take(3).collect::<Vec<_>>()
    );
    summary
}

/// The stream sequences, at the hub, of the fleet messages a site holds, in the site's order;
/// and the hub's own sequences of its subscriptions and policies. Equal lists mean every
/// change arrived, once, in order.
async fn sourced_and_written(site: &Engine, hub: &Engine) -> (Vec<u64>, Vec<u64>) {
    async fn all(
        engine: &Engine,
        stream: &str,
    ) -> Vec<async_nats::jetstream::message::StreamMessage> {
        // As the dispatcher's store identity, which reaches the config bucket on either bus.
        let (client, _errors) = engine
            .watched_store_client(&bus::roles::Role::Dispatcher)
            .await;
        let jet = bus::store::Jet::reach(&client, &engine.subjects(), bus::store::Store::Config)
            .await
            .expect("reach the config store");
        let s = jet.context().get_stream(stream).await.expect("stream");
        let last = s.get_info().await.expect("info").state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            if let Ok(m) = s.get_raw_message(seq).await {
                out.push(m);
            }
        }
        out
    }
    let site_bucket = site.subjects().config_bucket();
    let hub_bucket = hub.subjects().config_bucket();
    let sourced = all(site, &format!("KV_{site_bucket}"))
        .await
        .into_iter()
        .filter(|m| m.subject.starts_with(&format!("$KV.{site_bucket}.fleet.")))
        .map(|m| {
            let source = m
                .headers
                .get("Nats-Stream-Source")
                .map(|v| v.to_string())
                .unwrap_or_default();
            source
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("a sourced message says where from: {source:?}"))
        })
        .collect();
    let written = all(hub, &format!("KV_{hub_bucket}"))
        .await
        .into_iter()
        .filter(|m| {
            [".sub.", ".pol."]
                .iter()
                .any(|t| m.subject.starts_with(&format!("$KV.{hub_bucket}{t}")))
        })
        .map(|m| m.sequence)
        .collect();
    (sourced, written)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_site_cut_off_from_the_hub_keeps_deciding_and_catches_up_in_order() {
    cut_off(false).await;
}

/// The same on the secured bus: each site's three leaf connections (config, status, log) go
/// through its proxy, and are cut together.
#[tokio::test(flavor = "multi_thread")]
async fn a_secured_site_cut_off_from_the_hub_keeps_deciding_and_catches_up_in_order() {
    cut_off(true).await;
}

async fn cut_off(secured: bool) {
    let leaf_port = free_port();
    let proxies = [
        Proxy::start(leaf_port, WAN).await,
        Proxy::start(leaf_port, WAN).await,
    ];
    let names = ["site-a", "site-b"];
    let servers = match secured {
        true => FleetServers::start_secured_via(&names, leaf_port, |i| proxies[i].port()),
        false => FleetServers::start_via(&names, leaf_port, |i| proxies[i].port()),
    };
    let auth: Vec<_> = ["hub", "site-a", "site-b"]
        .iter()
        .map(|n| servers.auth(n))
        .collect();
    let FleetServers {
        hub,
        mut sites,
        confs: _confs,
        auth: _root,
        ..
    } = servers;
    let hub = start_hub_as(hub, &names, auth[0].clone()).await;
    let site_b = start_site_as(sites.pop().expect("site-b"), auth[2].clone()).await;
    let site_a = start_site_as(sites.pop().expect("site-a"), auth[1].clone()).await;
    apply_fleet(&hub).await;
    let (hook_a, hook_b) = (site_a.hook().await, site_b.hook().await);
    for hook in [&hook_a, &hook_b] {
        time_until(hook, "api", Action::Allow, WAIT).await;
        time_until(hook, "db", Action::Deny, WAIT).await;
    }

    let hub_admin = hub.admin().await;
    eventually_within(
        "the hub hears from both sites",
        Duration::from_secs(60),
        || async {
            let s = hub_admin.status().await.map_err(|e| e.to_string())?;
            let heard = s.sites.iter().filter(|site| site.lag == Some(0)).count() == 2;
            heard.then_some(()).ok_or(format!("{:?}", s.sites))
        },
    )
    .await;
    let (load_a, load_b) = (load(&site_a, 4).await, load(&site_b, 4).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxies[0].cut();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The fleet changes while site A is cut off: B has each change at once.
    let fleet = hub.admin().await;
    fleet
        .policy_add(vec![cache_ok()])
        .await
        .expect("fleet change");
    let at_b = time_until(&hook_b, "cache", Action::Allow, WAIT).await;
    fleet
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "brief", "priority": 100,
            "action": "deny", "match": {"dst_service": "brief"}}),
        )])
        .await
        .expect("fleet change");
    fleet
        .policy_remove("acl", "brief")
        .await
        .expect("fleet change");
    // Site A's own change still applies.
    site_a
        .admin()
        .await
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "local-ok", "priority": 0,
            "action": "allow", "match": {"dst_service": "local"}}),
        )])
        .await
        .expect("a site change while cut off");
    let local_at_a = time_until(&hook_a, "local", Action::Allow, WAIT).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        decides(&hook_a, "cache").await,
        Ok(Action::Deny),
        "site A cannot have the fleet's change while cut off"
    );
    // The hub sees that site A lags, from its last report; site B is up to date.
    let at_hub = hub.admin().await.status().await.expect("the hub's status");
    let lag = |name: &str| {
        at_hub
            .sites
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.lag)
    };
    assert!(lag("site-a").is_some_and(|l| l > 0), "{:?}", at_hub.sites);
    assert_eq!(lag("site-b"), Some(0), "{:?}", at_hub.sites);
    let cut = site_a.admin().await.status().await.expect("status");
    let cut = cut
        .fleet
        .expect("a site's status says where it stands with the hub");
    assert!(cut.synced, "{cut:?}");
    assert!(
        cut.hub_seen_ms_ago.is_some_and(|ms| ms > 2_000),
        "the hub has not answered for seconds: {cut:?}"
    );

    proxies[0].heal();
    let healed = Instant::now();
    let at_a = time_until(&hook_a, "cache", Action::Allow, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (a, b) = (
        finish("site-a", load_a).await,
        finish("site-b", load_b).await,
    );

    let (sourced, written) = sourced_and_written(&site_a, &hub).await;
    assert_eq!(
        sourced, written,
        "site A holds every fleet change once, in order"
    );
    let healed_status = site_a.admin().await.status().await.expect("status");
    let f = healed_status.fleet.expect("fleet status");
    assert_eq!(
        (f.lag, f.hub_revision, Some(f.revision)),
        (0, written.last().copied(), written.last().copied()),
        "{f:?}"
    );
    let (code, out, err) = policyctl(&site_a, &["status"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("fleet: site of hub `hub` (answering)"),
        "{out}"
    );
    eprintln!(
        "fleet partition{} ({} ms each way): {a}; {b}; a fleet change reached the linked site in \
         {} ms, the cut site {} ms after healing; a site change applied at the cut site in {} ms; \
         {} fleet changes sourced in order",
        if secured { ", secured" } else { "" },
        WAN.as_millis(),
        at_b.as_millis(),
        at_a.as_millis(),
        local_at_a.as_millis(),
        sourced.len()
    );
    assert!(healed.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_hub_down_every_site_keeps_deciding() {
    let FleetServers {
        hub,
        mut sites,
        confs: _confs,
        ..
    } = FleetServers::start(&["site-a", "site-b"]);
    let mut hub = hub_engine(hub);
    hub.start(&["acl"]).await;
    let site_b = start_site(sites.pop().expect("site-b")).await;
    let site_a = start_site(sites.pop().expect("site-a")).await;
    apply_fleet(&hub).await;
    let (hook_a, hook_b) = (site_a.hook().await, site_b.hook().await);
    for hook in [&hook_a, &hook_b] {
        time_until(hook, "api", Action::Allow, WAIT).await;
        time_until(hook, "db", Action::Deny, WAIT).await;
    }
    let (load_a, load_b) = (load(&site_a, 4).await, load(&site_b, 4).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    hub.nats.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    hub.nats.restart();
    hub.wait_instances(bus::headers::DISPATCHER_SERVICE, 1)
        .await;
    hub.wait_instances("policy-agent-acl", 1).await;
    let fleet = hub.admin().await;
    fleet
        .policy_add(vec![cache_ok()])
        .await
        .expect("a fleet change once the hub is back");
    let at_a = time_until(&hook_a, "cache", Action::Allow, Duration::from_secs(30)).await;
    let at_b = time_until(&hook_b, "cache", Action::Allow, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (a, b) = (
        finish("site-a", load_a).await,
        finish("site-b", load_b).await,
    );
    eprintln!(
        "hub down 4 s: {a}; {b}; the first fleet change after it reached the sites in {} and {} ms",
        at_a.as_millis(),
        at_b.as_millis()
    );
}

/// A site whose server and engine restart while it is cut off from the hub decides at once on
/// the fleet configuration it last had (it is in its own JetStream), and catches up on heal.
#[tokio::test(flavor = "multi_thread")]
async fn a_site_restarted_while_cut_off_decides_on_what_it_last_had() {
    let leaf_port = free_port();
    let proxy = Proxy::start(leaf_port, WAN).await;
    let FleetServers {
        hub,
        mut sites,
        confs: _confs,
        ..
    } = FleetServers::start_via(&["site-a"], leaf_port, |_| proxy.port());
    let mut hub = hub_engine(hub);
    hub.start(&["acl"]).await;
    let mut site = start_site(sites.pop().expect("site-a")).await;
    apply_fleet(&hub).await;
    let hook = site.hook().await;
    time_until(&hook, "api", Action::Allow, WAIT).await;
    time_until(&hook, "db", Action::Deny, WAIT).await;

    proxy.cut();
    let fleet = hub.admin().await;
    fleet
        .policy_add(vec![cache_ok()])
        .await
        .expect("fleet change");
    for name in ["policy-agent", "policy-dispatcher"] {
        assert!(site.take(name).terminate(), "{name} drains and exits");
    }
    site.nats.restart();
    site.spawn("policy-dispatcher", &["--fleet-hub", HUB_DOMAIN]);
    site.agent("acl", &[]);
    site.wait_instances(bus::headers::DISPATCHER_SERVICE, 1)
        .await;
    site.wait_instances("policy-agent-acl", 1).await;

    let load_a = load(&site, 4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hook = site.hook().await;
    assert_eq!(decides(&hook, "cache").await, Ok(Action::Deny));
    proxy.heal();
    let at = time_until(&hook, "cache", Action::Allow, Duration::from_secs(30)).await;
    let summary = finish("site-a restarted while cut off", load_a).await;
    let (sourced, written) = sourced_and_written(&site, &hub).await;
    assert_eq!(sourced, written, "every fleet change once, in order");
    eprintln!(
        "{summary}; the fleet change made during the cut arrived {} ms after healing",
        at.as_millis()
    );
}

/// A site that starts cut off and has never had the fleet's configuration fails closed, with a
/// reason a person can act on, even where its own documents would allow; it decides on the
/// fleet's configuration once the link comes back.
#[tokio::test(flavor = "multi_thread")]
async fn a_site_that_never_had_the_fleets_configuration_fails_closed() {
    let leaf_port = free_port();
    let proxy = Proxy::start(leaf_port, WAN).await;
    proxy.cut();
    let FleetServers {
        hub,
        mut sites,
        confs: _confs,
        ..
    } = FleetServers::start_via(&["site-a"], leaf_port, |_| proxy.port());
    let mut hub = hub_engine(hub);
    hub.start(&["acl"]).await;
    apply_fleet(&hub).await;
    let site = start_site(sites.pop().expect("site-a")).await;
    let admin = site.admin().await;
    subscribe(&admin, &[sub("new-connection", "acl", 10)]).await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "all", "priority": 0,
            "action": "allow", "match": {}}),
        )])
        .await
        .expect("a site policy");
    let hook = site.hook().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for dst in ["db", "api"] {
        let d = hook
            .new_connection(&conn("web", dst, &["p1"]))
            .await
            .expect("a decision");
        assert_eq!(d.action, Action::Deny, "{d:?}");
        let why = d
            .reasons
            .iter()
            .find(|r| r.agent == "dispatcher" && r.policy == "fleet")
            .unwrap_or_else(|| panic!("the reason names the fleet: {d:?}"));
        assert!(
            why.detail
                .as_deref()
                .is_some_and(|t| t.contains("never had the fleet's configuration")),
            "{why:?}"
        );
    }
    proxy.heal();
    let at = time_until(&hook, "api", Action::Allow, Duration::from_secs(30)).await;
    assert_eq!(decides(&hook, "db").await, Ok(Action::Deny));
    eprintln!(
        "a site that started cut off decided once healed, {} ms after",
        at.as_millis()
    );
}
