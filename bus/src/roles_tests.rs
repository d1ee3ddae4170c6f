use super::*;

fn perms(role: &str) -> Permissions {
    Role::parse(role)
        .expect("role")
        .permissions(&Subjects::default())
}

#[test]
fn role_names_round_trip() {
    for r in Role::shipped() {
        assert_eq!(Role::parse(&r.name()), Some(r));
    }
    assert_eq!(
        Role::parse("agent-geo"),
        Some(Role::Agent(Kind::new("geo").unwrap()))
    );
    assert_eq!(Role::parse("agent-monitor"), Some(Role::Monitor));
    assert_eq!(Role::parse("agent-"), None);
    assert_eq!(Role::parse("root"), None);
}

#[test]
fn messaging_identities_touch_no_store_and_store_identities_only_their_own() {
    let s = Subjects::default();
    for r in Role::shipped() {
        let p = r.permissions(&s);
        assert!(
            !p.publish.iter().any(|x| x.starts_with("$KV.")
                || x.starts_with("$O.")
                || x.starts_with("$JS.")
                || x.contains("._js.")
                || x.contains(".log.")),
            "{r}: {:?}",
            p.publish
        );
        let store = r.store_permissions(&s);
        let writes = |bucket: &str| {
            store
                .publish
                .iter()
                .any(|x| x.contains(&format!("API.$KV.{bucket}.")))
        };
        assert_eq!(writes("policy_config"), r == Role::Dispatcher, "{r}");
        // A site's fleet documents come from the hub alone (see `crate::fleet`).
        assert!(
            !store.publish.iter().any(
                |x| x.contains("$KV.policy_config.>") || x.contains("$KV.policy_config.fleet.")
            ),
            "{r}: {:?}",
            store.publish
        );
        assert_eq!(
            writes("policy_conns"),
            r.name() == "agent-conn-limit",
            "{r}"
        );
        assert_eq!(
            writes("policy_rates"),
            r.name() == "agent-rate-limit",
            "{r}"
        );
        assert_eq!(r.store_account().is_some(), r != Role::Gateway, "{r}");
        assert!(!store.publish.iter().any(|x| x.contains("STREAM.DELETE")));
        // conn-limit alone deletes messages: slots, in its own account's streams.
        assert_eq!(
            store
                .publish
                .iter()
                .any(|x| x.contains("STREAM.MSG.DELETE")),
            r.name() == "agent-conn-limit",
            "{r}"
        );
        // An update only of a stream the role owns: a key-value stream (to put back its
        // routing), or conn-limit's slot streams (whose limits follow its policies).
        for update in store.publish.iter().filter(|x| x.contains("STREAM.UPDATE")) {
            let owned: Vec<String> = r
                .stores()
                .into_iter()
                .filter(|(_, how)| *how == Use::Own)
                .flat_map(|(st, _)| {
                    let api = store_api_prefix(st, &s);
                    st.own_api(&s)
                        .into_iter()
                        .map(move |a| format!("{api}.{a}"))
                })
                .collect();
            assert!(owned.contains(update), "{r}: {update}");
            let slots = r.name() == "agent-conn-limit" && update.ends_with(".*");
            let log = r.name() == "dispatcher" && update.ends_with(".policy_decisions");
            assert!(update.contains("KV_") || slots || log, "{r}: {update}");
        }
    }
    // Only the wasm host reads the modules; only the operator reads the decision log.
    let reads = |r: &str, stream: &str| {
        perms_store(r)
            .publish
            .contains(&format!("policy._js.API.STREAM.INFO.{stream}"))
    };
    assert!(reads("wasm-host", "OBJ_policy_modules"));
    assert!(!reads("agent-acl", "OBJ_policy_modules"));
    assert!(reads("operator", "policy_decisions"));
    assert!(!reads("monitor", "policy_decisions"));
    assert!(!reads("operator", "KV_policy_config"));
}

fn perms_store(role: &str) -> Permissions {
    Role::parse(role)
        .expect("role")
        .store_permissions(&Subjects::default())
}

#[test]
fn a_role_answers_only_the_inboxes_of_the_roles_that_ask_it() {
    let s = Subjects::default();
    for r in Role::shipped() {
        let p = r.permissions(&s);
        let inboxes: Vec<&String> = p
            .publish
            .iter()
            .filter(|x| x.starts_with("_INBOX."))
            .collect();
        let expected: Vec<String> = r
            .askers()
            .iter()
            .map(|a| format!("{}.>", a.inbox_prefix(&s)))
            .collect();
        assert_eq!(inboxes, expected.iter().collect::<Vec<_>>(), "{r}");
    }
    assert_eq!(
        perms("agent-acl")
            .publish
            .iter()
            .filter(|x| x.starts_with("_INBOX."))
            .collect::<Vec<_>>(),
        ["_INBOX.policy.dispatcher.>", "_INBOX.policy.operator.>"]
    );
    assert!(perms("operator")
        .publish
        .iter()
        .all(|x| !x.starts_with("_INBOX.")));
}

#[test]
fn agents_serve_their_own_queue_group_only_and_the_gateway_only_sends_events() {
    let acl = perms("agent-acl");
    assert!(acl
        .subscribe
        .contains(&"policy.agent.acl.> acl".to_string()));
    assert!(!acl.subscribe.iter().any(|s| s.contains("agent.lb")));
    assert!(!acl.publish.iter().any(|s| s.starts_with("policy.")));
    let gw = perms("gateway");
    assert!(gw.publish.contains(&"policy.event.>".to_string()));
    assert!(!gw
        .publish
        .iter()
        .any(|s| s.contains(".admin.") || s.contains(".tap.") || s.contains(".agent.")));
    assert!(!gw.subscribe.iter().any(|s| s.contains("tap")));
    // The wasm host serves any kind but the shipped ones.
    let host = perms("wasm-host");
    assert!(host.subscribe.contains(&"policy.agent.>".to_string()));
    assert!(host
        .deny_subscribe
        .contains(&"policy.agent.acl.>".to_string()));
    assert!(host
        .deny_subscribe
        .contains(&"$SRV.*.policy-dispatcher".to_string()));
    // Only the dispatcher publishes on the tap.
    for r in Role::shipped() {
        let p = r.permissions(&Subjects::default());
        let taps = p.publish.iter().any(|s| s.contains(".tap."));
        assert_eq!(taps, r == Role::Dispatcher, "{r}");
    }
}

#[test]
fn the_wasm_host_is_denied_every_native_kind_on_the_bus() {
    let s = Subjects::default();
    let geo = Role::parse("agent-geo").expect("role");
    let mut roles = Role::shipped();
    roles.push(geo.clone());
    let host = Role::WasmHost.permissions_among(&s, &roles);
    for denied in [
        "policy.agent.geo.>",
        "$SRV.*.policy-agent-geo",
        "$SRV.*.policy-agent-geo.*",
        "policy.agent.acl.>",
    ] {
        assert!(
            host.deny_subscribe.contains(&denied.to_string()),
            "{denied}"
        );
    }
    // Only the host: geo's own role is unchanged.
    assert_eq!(geo.permissions_among(&s, &roles), geo.permissions(&s));
}

#[test]
fn inboxes_are_per_role_and_per_engine() {
    let s = Subjects::new("team.pb").unwrap();
    assert_eq!(Role::Gateway.inbox_prefix(&s), "_INBOX.team.pb.gateway");
    assert!(Role::Gateway
        .permissions(&s)
        .subscribe
        .contains(&"_INBOX.team.pb.gateway.>".to_string()));
}
