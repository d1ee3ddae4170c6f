//! ACL decide cost as the rule set grows: the index keeps it flat.

use agents::kinds::acl::{Acl, AclPolicy};
use agents::AgentKind;
use bus::event::{Direction, Event, NewConnection};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn rules(n: usize) -> Vec<(String, AclPolicy)> {
    (0..n)
        .map(|i| {
            let doc = format!(
                "{{\"agent\":\"acl\",\"id\":\"r{i}\",\"priority\":{p},\"action\":\"{a}\",\"match\":{{\"dst_service\":\"svc-{s}\",\"src_peer\":\"peer-{i}\"}}}}",
                p = i % 10,
                a = if i % 2 == 0 { "allow" } else { "deny" },
                s = i % 500
            );
            let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
            let bytes = rmp_serde::to_vec_named(&v).unwrap();
            (format!("r{i}"), agents::kind::parse_policy(&Acl::default(), &bytes).unwrap())
        })
        .collect()
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
