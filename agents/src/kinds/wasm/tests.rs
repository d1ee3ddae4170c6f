//! The sandbox and the kind against the example modules in WebAssembly text
//! (`examples/wasm/`), compiled here: no server needed.

use super::abi::{AbiError, Limits, Sandbox};
use super::*;
use bus::event::EventName;

fn example(name: &str) -> Vec<u8> {
    let path = format!("{}/../examples/wasm/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn kind(name: &str, module: &str, limits: Limits) -> WasmKind {
    let sandbox = Sandbox::new(limits);
    let compiled = sandbox.compile(&example(module)).expect("compiles");
    WasmKind::new(
        name.into(),
        sandbox,
        Arc::new(RwLock::new(Arc::new(compiled))),
        CallSlots::per_core(),
    )
}

fn event() -> Event {
    let name = EventName::new("new-connection").unwrap();
    let attrs = [
        ("src_service", Value::from("web")),
        ("dst_service", Value::from("db")),
        ("direction", Value::from("outgoing")),
        ("src_peer", Value::from("local")),
        ("dst_peers", Value::Array(vec![Value::from("peer-a")])),
    ];
    let payload = bus::codec::encode("event", &map(attrs.to_vec())).unwrap();
    Event::decode(&name, &payload).unwrap()
}

async fn decide(k: &WasmKind, policies: Vec<Value>) -> Result<State, String> {
    let rules = Arc::new(policies);
    k.decide_async(&rules, &event(), &State::new()).await
}

#[tokio::test]
async fn a_module_decides_and_its_answer_is_the_patch() {
    let k = kind("geo", "allow-v1.wat", Limits::default());
    let patch = decide(&k, vec![]).await.expect("decides");
    assert_eq!(patch.get_str("action"), Some("allow"));
    let reasons = patch.get("reasons").expect("reasons");
    assert_eq!(
        field_str(&reasons.as_array().unwrap()[0], "policy"),
        Some("v1")
    );
}

#[tokio::test]
async fn a_module_gets_the_event_its_attributes_the_state_and_its_policies() {
    let k = kind("echo", "echo.wat", Limits::default());
    let policy = map(vec![
        ("agent", Value::from("echo")),
        ("id", Value::from("p1")),
    ]);
    let patch = decide(&k, vec![policy.clone()]).await.expect("decides");
    assert_eq!(patch.get_str("event"), Some("new-connection"));
    let attrs = patch.get("attributes").expect("attributes");
    assert_eq!(field_str(attrs, "dst_service"), Some("db"));
    assert!(patch.get("state").is_some_and(|s| s.is_map()));
    assert_eq!(patch.get("policies"), Some(&Value::Array(vec![policy])));
}

#[tokio::test]
async fn an_endless_loop_runs_out_of_fuel_and_is_an_error() {
    let fuel = 100_000;
    let k = kind(
        "spin",
        "spin.wat",
        Limits {
            fuel,
            ..Limits::default()
        },
    );
    let err = decide(&k, vec![]).await.unwrap_err();
    assert_eq!(err, AbiError::OutOfFuel(fuel).to_string());
}

#[tokio::test]
async fn memory_is_capped_per_call() {
    // The echo module grows its memory to fit the input; 64 KiB of policies do not fit a
    // 64 KiB cap.
    let k = kind(
        "echo",
        "echo.wat",
        Limits {
            max_memory: 64 * 1024,
            ..Limits::default()
        },
    );
    let big = Value::from("x".repeat(70 * 1024));
    let err = decide(&k, vec![big]).await.unwrap_err();
    assert!(err.contains("outside its memory"), "{err}");
    assert!(decide(&k, vec![]).await.is_ok(), "a small input still fits");
}

#[test]
fn modules_that_break_the_abi_are_refused_with_the_reason() {
    let sandbox = Sandbox::new(Limits::default());
    let imports = r#"(module (import "env" "clock" (func)) (memory (export "memory") 1))"#;
    assert_eq!(
        sandbox.compile(imports.as_bytes()).unwrap_err(),
        AbiError::Imports {
            module: "env".into(),
            name: "clock".into()
        }
    );
    let no_decide = r#"(module (memory (export "memory") 1)
        (func (export "alloc") (param i32) (result i32) (i32.const 0)))"#;
    assert!(matches!(
        sandbox.compile(no_decide.as_bytes()),
        Err(AbiError::Missing(m)) if m.contains("decide")
    ));
    // One memory only: the cap must bound the module's whole memory.
    let two = r#"(module (memory (export "memory") 1) (memory 1))"#;
    assert!(matches!(
        sandbox.compile(two.as_bytes()),
        Err(AbiError::Invalid(_))
    ));
    let err = sandbox.compile(b"\x00asm garbage").unwrap_err();
    assert!(matches!(err, AbiError::Invalid(_)), "{err}");
}

#[test]
fn policies_must_name_the_kind() {
    let k = kind("geo", "allow-v1.wat", Limits::default());
    let ok = map(vec![
        ("agent", Value::from("geo")),
        ("id", Value::from("a")),
    ]);
    assert!(k.check(&ok).is_ok());
    let other = map(vec![
        ("agent", Value::from("acl")),
        ("id", Value::from("a")),
    ]);
    assert!(k.check(&other).unwrap_err().contains("agent"));
}

/// The AssemblyScript example (`examples/wasm/assemblyscript/`), as built and committed: it
/// reads its input with its own MessagePack reader and validates its policies.
#[tokio::test]
async fn the_assemblyscript_example_denies_listed_peers_and_validates_its_policies() {
    let k = kind(
        "peer-deny",
        "assemblyscript/peer-deny.wasm",
        Limits::default(),
    );
    let policy = |peers: Value| {
        map(vec![
            ("agent", Value::from("peer-deny")),
            ("id", Value::from("block-untrusted")),
            ("peers", peers),
        ])
    };
    let listed = policy(Value::Array(vec![Value::from("local")]));
    assert!(k.check(&listed).is_ok());
    let err = k.check(&policy(Value::from("local"))).unwrap_err();
    assert!(err.contains("field `peers`"), "{err}");
    // The test event comes from `local`.
    let patch = decide(&k, vec![listed]).await.expect("decides");
    assert_eq!(patch.get_str("action"), Some("deny"));
    let reason = &patch
        .get("reasons")
        .and_then(|r| r.as_array())
        .expect("reasons")[0];
    assert_eq!(field_str(reason, "policy"), Some("block-untrusted"));
    let other = policy(Value::Array(vec![Value::from("peer-x")]));
    let patch = decide(&k, vec![other]).await.expect("decides");
    assert_eq!(patch.get_str("action"), Some("allow"));
}

#[test]
fn a_start_function_that_loops_fails_the_deploy_check() {
    let sandbox = Sandbox::new(Limits {
        fuel: 100_000,
        ..Limits::default()
    });
    let looping = r#"(module (memory (export "memory") 1)
        (func (export "alloc") (param i32) (result i32) (i32.const 0))
        (func (export "decide") (param i32 i32) (result i64) (i64.const 0))
        (func $start (loop $l (br $l)))
        (start $start))"#;
    let compiled = sandbox.compile(looping.as_bytes()).expect("compiles");
    assert_eq!(
        sandbox.instantiate(&compiled).unwrap_err(),
        AbiError::OutOfFuel(100_000)
    );
    let fine = sandbox.compile(&example("allow-v1.wat")).expect("compiles");
    assert!(sandbox.instantiate(&fine).is_ok());
}
