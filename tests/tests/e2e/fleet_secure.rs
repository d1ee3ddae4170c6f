//! A fleet on the secured bus: every server runs the folder `policyctl auth fleet` wrote, every
//! process logs in with its own role's seed, and each site's leaf connections log in as the
//! site's leaf identities at the hub, with the permissions of `bus::leaf`. What a site may send
//! the hub is tried from a rogue site server that holds the site's real leaf seeds.

use std::time::Duration;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bus::roles::Role;
use bus::store::{Jet, Store};
use bus::Action;
use e2e::fleet::{start_hub_as, start_site_as, FleetServers};
use e2e::{Engine, NatsServer};
use serde_json::json;

use crate::fleet::decides;
use crate::*;

/// The fleet's policy every test here applies at the hub: no connection to db.
async fn deny_db(hub: &Engine) {
    let fleet = hub.admin().await;
    subscribe(&fleet, &[sub("new-connection", "acl", 10)]).await;
    fleet
        .policy_add(vec![doc(
            json!({"agent": "acl", "id": "no-db", "priority": 100,
            "action": "deny", "match": {"dst_service": "db"}}),
        )])
        .await
        .expect("fleet policy");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secured_fleet_carries_the_fleets_documents_and_the_sites_reports() {
    let servers = FleetServers::start_secured(&["site-a", "site-b"]);
    let (hub_auth, a_auth, b_auth) = (
        servers.auth("hub"),
        servers.auth("site-a"),
        servers.auth("site-b"),
    );
    let FleetServers { hub, mut sites, .. } = servers;
    let hub = start_hub_as(hub, &["site-a", "site-b"], hub_auth).await;
    let site_b = start_site_as(sites.pop().expect("site-b"), b_auth).await;
    let site_a = start_site_as(sites.pop().expect("site-a"), a_auth).await;
    deny_db(&hub).await;

    for (name, site) in [("site-a", &site_a), ("site-b", &site_b)] {
        let hook = site.hook().await;
        eventually(
            &format!("{name} denies db by the fleet's policy"),
            || async {
                let d = hook
                    .new_connection(&conn("web", "db", &["p1"]))
                    .await
                    .map_err(|e| e.to_string())?;
                (effects(&d.reasons, "acl") == [pair("no-db", "deny")])
                    .then_some(())
                    .ok_or(format!("{d:?}"))
            },
        )
        .await;
        assert_eq!(decides(&hook, "api").await, Ok(Action::Deny));
    }
    // The hub hears from both sites, through the status links, and has their decisions.
    let admin = hub.admin().await;
    eventually("the hub has both sites at its revision", || async {
        let s = admin.status().await.map_err(|e| e.to_string())?;
        let current = s.sites.iter().filter(|site| site.lag == Some(0)).count();
        (current == 2).then_some(()).ok_or(format!("{:?}", s.sites))
    })
    .await;
    eventually("the hub has both sites' decisions", || async {
        let (_, out, err) = policyctl(&hub, &["log", "--site", "all"]);
        let from = |site: &str| out.lines().any(|l| l.contains(&format!("[{site}]")));
        (from("site-a") && from("site-b"))
            .then_some(())
            .ok_or(format!("{out}{err}"))
    })
    .await;
}

/// A rogue site server: the site's real leaf seeds, each link bound to its account as
/// `policyctl auth fleet` binds it but with no deny list of its own (what reaches the hub is
/// then up to the hub), a user of the test's in each account the links bind, so that the test
/// can send what it likes through them, and one (`rogue-api`) whose requests to the hub's API
/// go through an import, as a site dispatcher's do, so that answers come back (the hub answers
/// a site on a service import's reply alone).
fn rogue_site(servers: &FleetServers, site: &str) -> NatsServer {
    let auth = servers.auth(site).expect("a secured fleet");
    let remotes: Vec<String> = bus::leaf::Link::ALL
        .iter()
        .map(|link| {
            let seed = std::fs::read_to_string(auth.path().join(format!("leaf/{link}.nk")))
                .expect("the site's leaf seed");
            format!(
                "{{ url: \"nats-leaf://127.0.0.1:{}\", account: {}, nkey: \"{}\" }}",
                servers.leaf_port,
                link.site_store().account(),
                seed.trim()
            )
        })
        .collect();
    let conf = auth.path().join("rogue.conf");
    std::fs::write(
        &conf,
        format!(
            "server_name: {site}\n\
             jetstream {{ domain: {site}, store_dir: \"jetstream\" }}\n\
             leafnodes {{ reconnect: 1, remotes: [{}] }}\n\
             accounts {{\n\
               POLICY_STORE_CONFIG: {{ jetstream: enabled, users: [{{ user: rogue, password: rogue }}], \
                 exports: [{{ service: \"$JS.hub.API.>\" }}, {{ service: \"$FLEET.{site}.api.>\" }}] }}\n\
               POLICY_STORE_LOG: {{ jetstream: enabled, users: [{{ user: rogue-log, password: rogue }}] }}\n\
               ROGUE: {{ users: [{{ user: rogue-api, password: rogue }}], \
                 imports: [{{ service: {{ account: POLICY_STORE_CONFIG, subject: \"$JS.hub.API.>\" }} }}, \
                   {{ service: {{ account: POLICY_STORE_CONFIG, subject: \"$FLEET.{site}.api.>\" }} }}] }}\n\
             }}\n",
            remotes.join(", ")
        ),
    )
    .expect("write the rogue configuration");
    NatsServer::start_with_conf(&conf, Vec::new())
}

async fn login(server: &NatsServer, user: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), "rogue".into())
        .connect(server.url())
        .await
        .expect("log in to the rogue site")
}

/// Sends `body` to `subject` and says whether anything answered within a second.
async fn answered(client: &async_nats::Client, subject: &str, body: &str) -> Option<String> {
    let request = client.request(subject.to_string(), body.to_string().into());
    match tokio::time::timeout(Duration::from_secs(1), request).await {
        Ok(Ok(m)) => Some(String::from_utf8_lossy(&m.payload).into_owned()),
        _ => None,
    }
}

/// A site's leaf identities reach what the sources need at the hub, and nothing else: from a
/// server holding them, the fleet's documents can be read, but no write (straight to a store's
/// subject, or through the hub's domain API), no stream change, no consumer whose deliveries
/// land in a store, and no forged log record or delivery for another site reaches the hub.
#[tokio::test(flavor = "multi_thread")]
async fn a_sites_leaf_identities_cannot_write_at_the_hub_nor_make_it_write() {
    let mut servers = FleetServers::start_secured(&["site-a", "site-b"]);
    // The site's own server gives way to the rogue one, which has its leaf identities.
    servers.sites[0].stop();
    let rogue = rogue_site(&servers, "site-a");
    let (hub_auth, b_auth) = (servers.auth("hub"), servers.auth("site-b"));
    let FleetServers { hub, mut sites, .. } = servers;
    let hub = start_hub_as(hub, &["site-a", "site-b"], hub_auth).await;
    let site_b = start_site_as(sites.pop().expect("site-b"), b_auth).await;
    // Whatever crosses the rogue's config link about another site: its deliveries, API
    // replies, consumers.
    let rogue_config = login(&rogue, "rogue").await;
    let mut others = Vec::new();
    for subject in ["$FLEET.site-b.>", "$JS.S.>", "$JSC.R.>", "_R_.>"] {
        others.push(rogue_config.subscribe(subject).await.expect("subscribe"));
    }
    rogue_config.flush().await.expect("flush");
    deny_db(&hub).await;
    let hook = site_b.hook().await;
    eventually("site-b denies db by the fleet's policy", || async {
        let got = decides(&hook, "db").await?;
        (got == Action::Deny)
            .then_some(())
            .ok_or(format!("{got:?}"))
    })
    .await;
    // Site-b took the fleet's documents (deliveries, consumer replies, direct gets): none of it
    // reached the rogue's link, which is bound to an account of its own at the hub.
    for mut sub in others {
        let seen = tokio::time::timeout(
            Duration::from_millis(500),
            futures::StreamExt::next(&mut sub),
        )
        .await;
        if let Ok(Some(m)) = seen {
            panic!("the rogue site saw {} (another site's traffic)", m.subject);
        }
    }

    // What the hub holds, as its dispatcher's store identity reads it.
    let subjects = hub.subjects();
    let (client, _errors) = hub.watched_store_client(&Role::Dispatcher).await;
    let jet = Jet::reach(&client, &subjects, Store::Config)
        .await
        .expect("reach the hub's config store");
    let js = jet.context();
    let stream = format!("KV_{}", subjects.config_bucket());
    let mut config = js.get_stream(&stream).await.expect("the fleet's bucket");
    let before = config.info().await.expect("info").state.clone();
    assert!(before.messages >= 2, "{before:?}");

    let rogue_api = login(&rogue, "rogue-api").await;
    let bucket = subjects.config_bucket();
    // The link works: the fleet's documents are there to read, as the site's dispatcher does.
    eventually("the rogue site reads the fleet's deny", || async {
        let get = format!("$FLEET.site-a.api.DIRECT.GET.{stream}.$KV.{bucket}.pol.acl.no-db");
        answered(&rogue_api, &get, "")
            .await
            .filter(|a| a.contains("no-db"))
            .map(|_| ())
            .ok_or_else(|| "no answer".to_string())
    })
    .await;
    // Writes, straight and through the hub's domain API.
    for subject in [
        format!("$KV.{bucket}.pol.acl.evil"),
        format!("$JS.hub.API.$KV.{bucket}.pol.acl.evil"),
    ] {
        if subject.starts_with("$JS.") {
            let put = answered(&rogue_api, &subject, r#"{"id":"evil"}"#).await;
            assert_eq!(put, None, "{subject} answered");
        }
        rogue_config
            .publish(subject, r#"{"id":"evil"}"#.into())
            .await
            .expect("publish");
    }
    // The stream's API beyond reading, at the site's API and at the hub's domain API:
    // nothing answers.
    for api in ["$FLEET.site-a.api", "$JS.hub.API"] {
        for call in ["PURGE", "DELETE", "UPDATE", "INFO"] {
            let subject = format!("{api}.STREAM.{call}.{stream}");
            let body = json!({"name": stream, "subjects": ["$KV.>"]}).to_string();
            assert_eq!(
                answered(&rogue_api, &subject, &body).await,
                None,
                "{subject}"
            );
        }
    }
    // A consumer the site may create, delivering into the fleet's bucket: refused as a cycle.
    let create = json!({"stream_name": stream, "config": {
        "deliver_subject": format!("$KV.{bucket}.pol.acl.cycled"),
        "deliver_policy": "all", "ack_policy": "none"}});
    let reply = answered(
        &rogue_api,
        &format!("$FLEET.site-a.api.CONSUMER.CREATE.{stream}"),
        &create.to_string(),
    )
    .await
    .unwrap_or_default();
    assert!(reply.contains("error"), "{reply}");
    // The log link: a record forged under the hub's log subjects, or into another site's
    // deliveries.
    let rogue_log = login(&rogue, "rogue-log").await;
    for subject in [
        subjects
            .decision_log_wildcard()
            .replace('>', "new-connection"),
        format!("{}.site.site-b.log.new-connection", subjects.prefix()),
        "$FLEET.site-b.up.S.forged".to_string(),
    ] {
        rogue_log
            .publish(subject, "forged".into())
            .await
            .expect("publish");
    }
    rogue_log.flush().await.expect("flush");
    rogue_config.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let after = config.info().await.expect("info").state.clone();
    assert_eq!(
        (after.messages, after.last_sequence, after.first_sequence),
        (before.messages, before.last_sequence, before.first_sequence),
        "the fleet's bucket changed"
    );
    let log_jet = Jet::reach(&client, &subjects, Store::Log)
        .await
        .expect("reach the hub's log");
    let log = log_jet
        .context()
        .get_stream(subjects.decisions_stream())
        .await
        .expect("the hub's log");
    for subject in [
        subjects.decision_log_wildcard(),
        format!("{}.site.site-b.log.>", subjects.prefix()),
    ] {
        match log.get_last_raw_message_by_subject(&subject).await {
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
            Ok(m) => assert_ne!(&m.payload[..], b"forged", "{subject}"),
            Err(e) => panic!("{subject}: {e}"),
        }
    }
}

/// Captures one delivery of the hub's source of the rogue site, in `account`'s view of the
/// rogue server (its own JetStream delivers it to the hub through the leaf), and delivers a
/// forged one after it, with the reply a real delivery has but the subject `forged_subject`
/// (the `@<subject>` tail of a `$JS.ACK` reply, which the hub's server takes as the subject).
async fn forge_after_a_real_delivery(
    client: &async_nats::Client,
    stream: &str,
    subjects: &[&str],
    write: (&str, &str),
    forged_subject: &str,
    payload: &str,
) {
    let mut deliveries = client
        .subscribe("$FLEET.site-a.up.S.>")
        .await
        .expect("watch the deliveries");
    client.flush().await.expect("flush");
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.to_string(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
    .expect("the rogue's own stream");
    js.publish(write.0.to_string(), write.1.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    // The hub's source reaches the stream (it retries a site not reached yet every 10 s).
    let real = loop {
        let m = tokio::time::timeout(
            Duration::from_secs(40),
            futures::StreamExt::next(&mut deliveries),
        )
        .await
        .expect("a delivery of the hub's source")
        .expect("subscription open");
        match &m.reply {
            Some(r) if r.starts_with("$JS.ACK.") => break m,
            _ => continue,
        }
    };
    let reply = real.reply.as_ref().expect("reply").to_string();
    let t: Vec<&str> = reply.split('.').collect();
    assert_eq!(t.len(), 9, "{reply}");
    let bump = |s: &str| s.parse::<u64>().expect("a number") + 1;
    let forged_reply = format!(
        "$JS.ACK.{}.{}.1.{}.{}.{}.0@{forged_subject}",
        t[2],
        t[3],
        bump(t[5]),
        bump(t[6]),
        t[7]
    );
    client
        .publish_with_reply(
            real.subject.clone(),
            forged_reply,
            payload.to_string().into(),
        )
        .await
        .expect("publish the forged delivery");
    client.flush().await.expect("flush");
}

/// A site that forges deliveries to the hub's sources (a client in the account its link binds,
/// sending after a real delivery what the site's JetStream would, with another site's subject
/// in the `$JS.ACK…@<subject>` of the reply) does not pass for that other site: the hub's status
/// and `policyctl log --site` read a site's records only when they came in through that site's
/// own source.
#[tokio::test(flavor = "multi_thread")]
async fn a_site_forging_its_deliveries_does_not_pass_for_another_site() {
    let mut servers = FleetServers::start_secured(&["site-a", "site-b"]);
    servers.sites[0].stop();
    let rogue = rogue_site(&servers, "site-a");
    let (hub_auth, b_auth) = (servers.auth("hub"), servers.auth("site-b"));
    let FleetServers { hub, mut sites, .. } = servers;
    let hub = start_hub_as(hub, &["site-a", "site-b"], hub_auth).await;
    let site_b = start_site_as(sites.pop().expect("site-b"), b_auth).await;
    deny_db(&hub).await;
    let admin = hub.admin().await;
    eventually("the hub has site-b's revision", || async {
        let s = admin.status().await.map_err(|e| e.to_string())?;
        s.sites
            .iter()
            .any(|x| x.name == "site-b" && x.revision.is_some())
            .then_some(())
            .ok_or(format!("{:?}", s.sites))
    })
    .await;
    let hook = site_b.hook().await;
    assert_eq!(decides(&hook, "db").await, Ok(Action::Deny));

    let subjects = hub.subjects();
    let forged_key = format!("$KV.{}.site-b.fleet-revision", subjects.sites_bucket());
    forge_after_a_real_delivery(
        &login(&rogue, "rogue").await,
        "KV_policy_config",
        &["$KV.policy_config.>"],
        ("$KV.policy_config.site.fleet-revision", "1"),
        &forged_key,
        "999",
    )
    .await;
    let forged_log = format!("{}.site.site-b.log.new-connection", subjects.prefix());
    forge_after_a_real_delivery(
        &login(&rogue, "rogue-log").await,
        "policy_decisions",
        &["policy.log.>"],
        ("policy.log.new-connection", "not a record"),
        &forged_log,
        "forged",
    )
    .await;

    // Whether the server stored the forgery under site-b's name is its business (it did not,
    // when this test was written: see the closing note of issue 20); the hub must not take it
    // for site-b's either way.
    let (client, _errors) = hub.watched_store_client(&Role::Dispatcher).await;
    let jet = Jet::reach(&client, &subjects, Store::Sites)
        .await
        .expect("reach the sites bucket");
    let sites_stream = jet
        .context()
        .get_stream(format!("KV_{}", subjects.sites_bucket()))
        .await
        .expect("the sites bucket");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stored = sites_stream
        .direct_get_last_for_subject(&forged_key)
        .await
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned());
    eprintln!("site-b's revision record at the hub after the forgery: {stored:?}");
    let s = admin.status().await.expect("status");
    let b = s.sites.iter().find(|x| x.name == "site-b").expect("site-b");
    assert_ne!(b.revision, Some(999), "{b:?}");
    let (code, out, err) = policyctl(&hub, &["log", "--site", "site-b"]);
    assert!(!out.contains("forged"), "{out}{err}");
    assert!(code == Some(0) || err.contains("no decision"), "{err}");
}
