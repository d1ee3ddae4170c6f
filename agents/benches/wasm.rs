//! What a WebAssembly agent kind costs per call, next to the sandbox's parts: a new instance
//! per call (instantiate, alloc, copy in), the module's own work, and copying the answer out.
//! `allow-v1` does no work, so it measures the ABI alone; `echo` copies its whole input back,
//! so it adds the input's size.

use agents::kinds::wasm::abi::{Limits, Sandbox};
use criterion::{criterion_group, criterion_main, Criterion};

fn example(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/../examples/wasm/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// A `decide` input as the kind builds it: a new-connection event, an empty state, two
/// policies.
fn input() -> Vec<u8> {
    let v = serde_json::json!({
        "event": "new-connection",
        "attributes": {"src_service": "web", "dst_service": "db", "direction": "outgoing",
                       "src_peer": "local", "dst_peers": ["peer-a", "peer-b", "peer-c"]},
        "state": {},
        "policies": [{"agent": "geo", "id": "eu", "region": "eu"},
                     {"agent": "geo", "id": "us", "region": "us"}],
    });
    rmp_serde::to_vec_named(&v).unwrap()
}

fn calls(c: &mut Criterion) {
    let sandbox = Sandbox::new(Limits::default());
    let input = input();
    let mut group = c.benchmark_group("wasm_decide");
    for module in ["allow-v1.wat", "echo.wat"] {
        let compiled = sandbox.compile(&example(module)).unwrap();
        group.bench_function(module.trim_end_matches(".wat"), |b| {
            b.iter(|| sandbox.call(&compiled, "decide", &input).unwrap())
        });
    }
    group.finish();
    c.bench_function("wasm_compile_allow_v1_text", |b| {
        let text = example("allow-v1.wat");
        b.iter(|| sandbox.compile(&text).unwrap())
    });
}

criterion_group!(benches, calls);
criterion_main!(benches);
