//! A fleet: a hub and two sites, each a real nats-server with its own JetStream domain, the
//! sites leaf nodes of the hub, each running its own engine. The fleet's documents, applied at
//! the hub, reach both sites; a site's stay there; the fleet's decide first.

use std::time::Duration;

use bus::{Action, ErrorCode};
use e2e::fleet::{hub_engine, start_hub, start_site, FleetServers, HUB_DOMAIN};
use e2e::Engine;
use serde_json::json;

use crate::*;

/// The action a site's engine decides for `web -> dst`, as the gateway there would see it.
pub(crate) async fn decides(hook: &bus::Client, dst: &str) -> Result<Action, String> {
    hook.new_connection(&conn("web", dst, &["p1"]))
        .await
        .map(|d| d.action)
        .map_err(|e| e.to_string())
}

async fn eventually_decides(hook: &bus::Client, site: &str, dst: &str, want: Action) {
    eventually(
        &format!("{site} decides {want:?} for web -> {dst}"),
        || async {
            let got = decides(hook, dst).await?;
            (got == want).then_some(()).ok_or(format!("{got:?}"))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fleet_documents_reach_every_site_and_decide_before_a_sites_own() {
    let FleetServers {
        hub,
        mut sites,
        confs: _confs,
        ..
    } = FleetServers::start(&["site-a", "site-b"]);
    let hub = start_hub(hub, &["site-a", "site-b"]).await;
    let site_b = start_site(sites.pop().expect("site-b")).await;
    let site_a = start_site(sites.pop().expect("site-a")).await;

    // The fleet: the ACL on every new connection, and no connection to db.
    let fleet = hub.admin().await;
    subscribe(&fleet, &[sub("new-connection", "acl", 10)]).await;
    fleet
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "no-db", "priority": 100,
            "action": "deny", "match": {"dst_service": "db"}}),
        )])
        .await
        .expect("fleet policy");
    // Site A allows everything, at a priority that would come first among its own rules.
    let admin_a = site_a.admin().await;
    admin_a
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "all", "priority": -100,
            "action": "allow", "match": {}}),
        )])
        .await
        .expect("site policy");

    let (hook_a, hook_b) = (site_a.hook().await, site_b.hook().await);
    // The fleet's subscription and deny are at both sites; site A's allow only at A: the
    // fleet's deny decides first there.
    eventually_decides(&hook_a, "site-a", "api", Action::Allow).await;
    eventually_decides(&hook_b, "site-b", "db", Action::Deny).await;
    assert_eq!(decides(&hook_a, "db").await, Ok(Action::Deny));
    assert_eq!(decides(&hook_b, "api").await, Ok(Action::Deny));
    let d = hook_a
        .new_connection(&conn("web", "db", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(effects(&d.reasons, "acl"), [pair("no-db", "deny")]);
    // The reason says the deny is the fleet's; a site's own allow is not marked.
    let level = |d: &bus::ConnectionDecision, id: &str| {
        d.reasons.iter().find(|r| r.policy == id).map(|r| r.level)
    };
    assert_eq!(
        level(&d, "no-db"),
        Some(Some(bus::fleet::Level::Fleet)),
        "{d:?}"
    );
    let api = hook_a
        .new_connection(&conn("web", "api", &["p1"]))
        .await
        .expect("decision");
    assert_eq!(level(&api, "all"), Some(None), "{api:?}");
    let (code, out, err) = policyctl(
        &site_a,
        &[
            "explain",
            "new-connection",
            "src_service=web",
            "dst_service=db",
            "direction=outgoing",
            "src_peer=local",
            "dst_peers=[p1]",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("decided by: acl no-db (fleet): deny"), "{out}");

    // A site cannot take a fleet document's id: the fleet's would shadow it. Nothing of such a
    // request is stored.
    let err = admin_a
        .policy_add(vec![
            doc(json!({"agent": "acl", "id": "fresh", "priority": 0,
                "action": "allow", "match": {"dst_service": "fresh"}})),
            doc(json!({"agent": "acl", "id": "no-db", "priority": 0,
                "action": "allow", "match": {}})),
        ])
        .await
        .expect_err("a site policy with a fleet policy's id");
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");
    assert!(err.to_string().contains("is the fleet's"), "{err}");
    let stored = admin_a.policy_list(Some("acl")).await.expect("list");
    assert!(
        !stored.iter().any(|p| format!("{p}").contains("fresh")),
        "{stored:?}"
    );

    // A fleet change reaches both sites; removing the fleet's deny lets site A's allow decide.
    fleet
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "cache-ok", "priority": 100,
            "action": "allow", "match": {"dst_service": "cache"}}),
        )])
        .await
        .expect("fleet policy");
    eventually_decides(&hook_b, "site-b", "cache", Action::Allow).await;
    fleet.policy_remove("acl", "no-db").await.expect("remove");
    eventually_decides(&hook_a, "site-a", "db", Action::Allow).await;
    eventually_decides(&hook_a, "site-a", "cache", Action::Allow).await;
    assert_eq!(decides(&hook_b, "db").await, Ok(Action::Deny));

    // The operator's tools at a site say which level each document comes from.
    let (code, out, err) = policyctl(&site_a, &["policy", "list"]);
    assert_eq!(code, Some(0), "{err}");
    let level_of = |id: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(id))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
    };
    assert_eq!(level_of("all").as_deref(), Some("site"), "{out}");
    assert_eq!(level_of("cache-ok").as_deref(), Some("fleet"), "{out}");
    let (code, out, err) = policyctl(&site_a, &["subscriptions"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("new-connection") && l.trim_end().ends_with("fleet")),
        "{out}"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let (code, _, err) = policyctl(&site_a, &["export", dir.path().to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{err}");
    let fleet_docs =
        std::fs::read_to_string(dir.path().join("fleet/policies.yaml")).expect("fleet/");
    assert!(
        fleet_docs.contains("cache-ok") && !fleet_docs.contains("id: all"),
        "{fleet_docs}"
    );
    let (code, out, err) = policyctl(&site_a, &["diff", dir.path().to_str().expect("utf-8")]);
    assert_eq!(
        code,
        Some(0),
        "the site's export diffs equal to the site: {out}{err}"
    );

    // One view of the fleet at the hub: every site's revision and lag, and their decisions.
    let hub_admin = hub.admin().await;
    eventually("the hub sees both sites up to date", || async {
        let s = hub_admin.status().await.map_err(|e| e.to_string())?;
        let fresh = s.sites.len() == 2
            && s.sites.iter().all(|site| {
                site.lag == Some(0)
                    && site.revision.is_some_and(|r| r > 0)
                    && site.seen_ms_ago.is_some()
            });
        fresh.then_some(()).ok_or(format!("{:?}", s.sites))
    })
    .await;
    let (code, out, err) = policyctl(&hub, &["status"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("SITE") && out.contains("site-a") && out.contains("site-b"),
        "{out}"
    );
    eventually("the hub has both sites' decisions", || async {
        let (_, out, err) = policyctl(&hub, &["log", "--site", "all", "--event", "new-connection"]);
        let from = |site: &str| out.lines().any(|l| l.contains(&format!("[{site}]")));
        (from("site-a") && from("site-b"))
            .then_some(())
            .ok_or(format!("{out}{err}"))
    })
    .await;
    let (code, out, err) = policyctl(&hub, &["log", "--site", "site-b"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!out.is_empty() && !out.contains("[site-a]"), "{out}");
}

/// A site whose engine ran alone joins the fleet: its dispatcher, started again with
/// `--fleet-hub`, adds the source to the bucket it made before, and the site keeps its own
/// documents beside the fleet's.
#[tokio::test(flavor = "multi_thread")]
async fn an_engine_that_ran_alone_joins_the_fleet_keeping_its_own_documents() {
    let FleetServers {
        hub,
        mut sites,
        confs: _confs,
        ..
    } = FleetServers::start(&["site-a"]);
    let mut hub = hub_engine(hub);
    hub.start(&["acl"]).await;
    let fleet = hub.admin().await;
    subscribe(&fleet, &[sub("new-connection", "acl", 10)]).await;
    fleet
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "no-db", "priority": 100,
            "action": "deny", "match": {"dst_service": "db"}}),
        )])
        .await
        .expect("fleet policy");

    let mut site = Engine::on(sites.pop().expect("site-a"));
    site.start(&["acl"]).await;
    let admin = site.admin().await;
    subscribe(&admin, &[sub("new-connection", "acl", 10)]).await;
    admin
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "all", "priority": 0,
            "action": "allow", "match": {}}),
        )])
        .await
        .expect("site policy");
    let hook = site.hook().await;
    eventually_decides(&hook, "the lone engine", "db", Action::Allow).await;

    let alone = site.take("policy-dispatcher");
    assert!(alone.terminate(), "the dispatcher drains and exits");
    site.spawn("policy-dispatcher", &["--fleet-hub", HUB_DOMAIN]);
    site.wait_instances(bus::headers::DISPATCHER_SERVICE, 1)
        .await;
    // Once the site has the fleet's configuration: the fleet's deny, and the site's own allow.
    eventually("the site denies db by the fleet's policy", || async {
        let d = hook
            .new_connection(&conn("web", "db", &["p1"]))
            .await
            .map_err(|e| e.to_string())?;
        (effects(&d.reasons, "acl") == [pair("no-db", "deny")])
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    assert_eq!(decides(&hook, "api").await, Ok(Action::Allow));
}

/// On the secured bus, a dispatcher's store identity writes its config bucket's own keys, not
/// the `fleet.` ones: at a site those come from the hub's source alone, so not even the site's
/// own dispatcher seed can change or remove a fleet deny there.
#[tokio::test(flavor = "multi_thread")]
async fn a_dispatchers_identity_cannot_write_the_fleets_documents() {
    let mut engine = Engine::secured();
    engine.start(&["acl"]).await;
    let subjects = engine.subjects();
    let (client, mut errors) = engine
        .watched_store_client(&bus::roles::Role::Dispatcher)
        .await;
    let jet = bus::store::Jet::reach(&client, &subjects, bus::store::Store::Config)
        .await
        .expect("reach the config store");
    let kv = jet
        .context()
        .get_key_value(subjects.config_bucket())
        .await
        .expect("the config bucket");
    kv.put("site.probe", "x".into())
        .await
        .expect("a site's own record is the dispatcher's to write");
    let injected = tokio::time::timeout(
        Duration::from_secs(5),
        kv.put("fleet.pol.acl.injected", "x".into()),
    )
    .await;
    assert!(
        !matches!(injected, Ok(Ok(_))),
        "a fleet key written by the dispatcher's identity"
    );
    let said = tokio::time::timeout(Duration::from_secs(5), errors.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    assert!(said.contains("Permissions Violation"), "{said}");
    assert!(said.contains("fleet.pol.acl.injected"), "{said}");
    assert_eq!(
        kv.get("fleet.pol.acl.injected").await.expect("read"),
        None,
        "nothing stored"
    );
}

/// A hub rebuilt without its store makes its bucket again, and its revisions start over: a
/// site's source would take only what the new bucket writes past the revision the site had.
/// The site says so, for good (its status, and `policyctl status`), keeps deciding on the
/// fleet's documents it has, and the hub shows it.
#[tokio::test(flavor = "multi_thread")]
async fn a_site_notices_a_hub_made_again_and_keeps_what_it_has() {
    let FleetServers {
        hub,
        mut sites,
        confs: _confs,
        ..
    } = FleetServers::start(&["site-a"]);
    let mut hub = start_hub(hub, &["site-a"]).await;
    let site = start_site(sites.pop().expect("site-a")).await;
    let fleet = hub.admin().await;
    subscribe(&fleet, &[sub("new-connection", "acl", 10)]).await;
    fleet
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "no-db", "priority": 100,
            "action": "deny", "match": {"dst_service": "db"}}),
        )])
        .await
        .expect("fleet policy");
    let hook = site.hook().await;
    eventually_decides(&hook, "site-a", "db", Action::Deny).await;
    let admin = site.admin().await;
    let standing = || async {
        admin
            .status()
            .await
            .map_err(|e| e.to_string())?
            .fleet
            .ok_or_else(|| "no fleet status".to_string())
    };
    eventually("the site has the hub's revision", || async {
        let f = standing().await?;
        (f.synced && f.lag == 0 && f.hub_revision.is_some())
            .then_some(())
            .ok_or(format!("{f:?}"))
    })
    .await;
    assert!(!standing().await.expect("status").hub_reset);

    // The hub's server loses its store; its dispatcher makes the bucket again.
    let old = hub.take("policy-dispatcher");
    assert!(old.terminate(), "the hub's dispatcher stops");
    hub.nats.restart_empty();
    hub.spawn("policy-dispatcher", &["--fleet-sites", "site-a"]);
    hub.wait_instances(bus::headers::DISPATCHER_SERVICE, 1)
        .await;
    eventually("the site says the hub was made again", || async {
        let f = standing().await?;
        f.hub_reset.then_some(()).ok_or(format!("{f:?}"))
    })
    .await;
    let (code, out, err) = policyctl(&site, &["status"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("THE HUB'S BUCKET WAS MADE AGAIN"), "{out}");
    // It keeps deciding on what it has: the fleet's deny holds.
    assert_eq!(decides(&hook, "db").await, Ok(Action::Deny));
    let hub_admin = hub.admin().await;
    eventually(
        "the hub shows the site's fleet documents are of its old bucket",
        || async {
            let s = hub_admin.status().await.map_err(|e| e.to_string())?;
            s.sites
                .iter()
                .any(|site| site.name == "site-a" && site.hub_reset)
                .then_some(())
                .ok_or(format!("{:?}", s.sites))
        },
    )
    .await;
    // For good: the record is in the site's bucket, and a restarted dispatcher reads it.
    let mut site = site;
    let first = site.take("policy-dispatcher");
    assert!(first.terminate(), "the site's dispatcher stops");
    site.spawn("policy-dispatcher", &["--fleet-hub", HUB_DOMAIN]);
    site.wait_instances(bus::headers::DISPATCHER_SERVICE, 1)
        .await;
    let f = standing().await.expect("status");
    assert!(f.hub_reset, "{f:?}");
}
