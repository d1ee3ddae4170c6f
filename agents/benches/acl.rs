//! ACL decide cost as the rule set grows: the index keeps it flat, with name rules alone and
//! with half of the rules selecting by labels.

use agents::kind::Stored;
use agents::kinds::acl::{Acl, AclPolicy};
use agents::AgentKind;
use bus::event::{Direction, Event, NewConnection};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

/// One policy from its JSON text, through the real decoder.
fn policy(id: String, doc: &str) -> Stored<AclPolicy> {
    let v: serde_json::Value = serde_json::from_str(doc).unwrap();
    let bytes = rmp_serde::to_vec_named(&v).unwrap();
    Stored::site(
        id,
        agents::kind::parse_policy(&Acl::default(), &bytes).unwrap(),
    )
}

fn rules(n: usize) -> Vec<Stored<AclPolicy>> {
    (0..n)
        .map(|i| {
            let doc = format!(
                "{{\"agent\":\"acl\",\"id\":\"r{i}\",\"priority\":{p},\"action\":\"{a}\",\"match\":{{\"dst_service\":\"svc-{s}\",\"src_peer\":\"peer-{i}\"}}}}",
                p = i % 10,
                a = if i % 2 == 0 { "allow" } else { "deny" },
                s = i % 500
            );
            policy(format!("r{i}"), &doc)
        })
        .collect()
}

/// `n` rules, half by names (as [`rules`]) and half by labels: each selects a destination
/// service by its `app` label (the index's key) and the source by a `matchExpressions` term.
fn mixed(n: usize) -> Vec<Stored<AclPolicy>> {
    let mut out = rules(n / 2);
    out.extend((0..n / 2).map(|i| {
        let doc = format!(
            "{{\"agent\":\"acl\",\"id\":\"l{i}\",\"priority\":{p},\"action\":\"{a}\",\"match\":{{\"dst_labels\":{{\"matchLabels\":{{\"app\":\"app-{s}\"}}}},\"src_labels\":{{\"matchExpressions\":[{{\"key\":\"tier\",\"operator\":\"In\",\"values\":[\"t-{i}\",\"frontend\"]}}]}}}}}}",
            p = i % 10,
            a = if i % 2 == 0 { "allow" } else { "deny" },
            s = i % 500
        );
        policy(format!("l{i}"), &doc)
    }));
    out
}

fn bench(c: &mut Criterion) {
    let acl = Acl::default();
    let ev = Event::NewConnection(NewConnection {
        src_service: "web".into(),
        dst_service: "svc-7".into(),
        direction: Direction::Outgoing,
        src_peer: Some("peer-7".into()),
        dst_peers: Some(vec!["a".into(), "b".into(), "c".into()]),
        connection_id: None,
        src_labels: None,
        dst_labels: None,
        peer_labels: None,
        namespace: None,
    });
    let state = ev.initial_state();
    let mut group = c.benchmark_group("acl_decide_new_connection");
    for n in [10, 1_000, 10_000, 100_000] {
        let compiled = acl.compile(rules(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| acl.decide(&compiled, &ev, &state))
        });
    }
    group.finish();

    let labelled = |pairs: &[(&str, &str)]| {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    };
    let ev = Event::NewConnection(NewConnection {
        src_service: "web".into(),
        dst_service: "svc-7".into(),
        direction: Direction::Outgoing,
        src_peer: Some("peer-7".into()),
        dst_peers: Some(vec!["a".into(), "b".into(), "c".into()]),
        connection_id: None,
        src_labels: labelled(&[("tier", "frontend"), ("team", "shop")]),
        dst_labels: labelled(&[("app", "app-7"), ("env", "prod")]),
        peer_labels: None,
        namespace: None,
    });
    let state = ev.initial_state();
    let mut group = c.benchmark_group("acl_decide_mixed_labels");
    for n in [10_000, 100_000] {
        let compiled = acl.compile(mixed(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| acl.decide(&compiled, &ev, &state))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
