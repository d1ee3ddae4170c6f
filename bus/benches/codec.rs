//! Per-hop costs on the decision path: the state header codec and the merge.

use bus::merge::merge;
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
            |(mut s, p)| merge(&mut s, p).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
