//! Per-hop costs on the decision path: the state header codec, the merge, and a verdict cache
//! lookup (key built from the inputs, then found).

use bus::merge::{merge, Holds};
use bus::state::{keys, State, Value};
use criterion::{criterion_group, criterion_main, Criterion};

fn state(peers: usize) -> State {
    let mut s = State::new();
    let names: Vec<String> = (0..peers).map(|i| format!("peer-{i}")).collect();
    s.set_strings(keys::DST_PEERS, &names);
    s.insert(
        keys::REASONS,
        Value::Array(vec![bus::Reason::new(
            "acl",
            "allow-all",
            bus::Effect::Allow,
        )
        .to_value()]),
    );
    s
}

fn bench(c: &mut Criterion) {
    let s = state(8);
    let header = s.to_header().unwrap();
    c.bench_function("state_to_header_8_peers", |b| {
        b.iter(|| s.to_header().unwrap())
    });
    c.bench_function("state_from_header_8_peers", |b| {
        b.iter(|| State::from_header(&header).unwrap())
    });
    let patch = {
        let mut p = state(4);
        p.insert(keys::ACTION, "allow");
        p
    };
    c.bench_function("merge_narrow_8_to_4", |b| {
        b.iter_batched(
            || (s.clone(), patch.clone()),
            |(mut s, p)| merge(&mut s, p, "acl", &mut Holds::default()).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    let inputs = bus::cache::Inputs {
        attrs: ["src_service", "dst_service", "src_peer", "direction"]
            .map(String::from)
            .to_vec(),
        state: vec![keys::DST_PEERS.to_string()],
    };
    let attributes = Value::Map(vec![
        ("src_service".into(), "web".into()),
        ("dst_service".into(), "db".into()),
        ("src_peer".into(), "local".into()),
        ("direction".into(), "outgoing".into()),
        ("connection_id".into(), "c1".into()),
    ]);
    let fp = bus::cache::fingerprint([]);
    let mut cache = bus::cache::VerdictCache::new(10_000);
    for i in 0..5_000 {
        let mut a = attributes.clone();
        if let Value::Map(m) = &mut a {
            m[0].1 = format!("svc-{i}").into();
        }
        let key = bus::cache::key("acl", "new-connection", &fp, &inputs, &a, &s);
        cache.insert(key, patch.clone());
    }
    let key = bus::cache::key("acl", "new-connection", &fp, &inputs, &attributes, &s);
    cache.insert(key, patch.clone());
    c.bench_function("verdict_cache_lookup_hit_5000_entries", |b| {
        b.iter(|| {
            let key = bus::cache::key("acl", "new-connection", &fp, &inputs, &attributes, &s);
            cache.get(&key).expect("a hit")
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
