//! The container files, checked without a container engine: compose files against the
//! compose-spec schema (check-jsonschema), the Dockerfile by hadolint, and what each must do.

use bus::roles::Role;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(root().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn run(tool: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(e2e::tool(tool))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

#[test]
fn compose_files_follow_the_compose_spec() {
    let files = [
        "compose.yaml",
        "compose.cluster.yaml",
        "compose.host.yaml",
        "compose.fleet.yaml",
    ];
    let mut args = vec!["--builtin-schema", "vendor.compose-spec"];
    args.extend(files);
    let (ok, said) = run("check-jsonschema", &args);
    assert!(ok, "{said}");
}

#[test]
fn the_dockerfile_passes_hadolint_and_does_what_it_must() {
    let (ok, said) = run("hadolint", &["Dockerfile"]);
    assert!(ok, "hadolint: {said}");
    let text = read("Dockerfile");
    let at = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("the Dockerfile has no `{needle}`"))
    };
    // The dependencies build in their own layer, before the sources are copied.
    assert!(at("COPY Cargo.toml Cargo.lock") < at("COPY . ."));
    assert!(at("cargo build --locked --release --bins") < at("COPY . ."));
    assert!(text.contains("ca-certificates"), "tls:// needs the roots");
    let user = text
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("a USER");
    assert!(
        user.trim() != "root" && user.trim() != "0",
        "runs as {user}"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("ENTRYPOINT")),
        "no fixed entrypoint: the image runs any of the three binaries"
    );
}

#[test]
fn compose_checks_readiness_outlasts_the_drain_and_keeps_nats_off_the_host() {
    let doc: serde_json::Value = serde_norway::from_str(&read("compose.yaml")).expect("yaml");
    let services = doc["services"].as_object().expect("services");
    assert!(
        services["nats"].get("ports").is_none(),
        "NATS is published only by compose.host.yaml"
    );
    let daemon = &doc["x-daemon"];
    let grace = daemon["stop_grace_period"].as_str().expect("grace");
    let secs: u64 = grace.trim_end_matches('s').parse().expect("seconds");
    assert!(secs > 10, "stop grace {grace} must exceed the 10 s drain");
    let probe = daemon["healthcheck"]["test"].to_string();
    assert!(probe.contains("/readyz"), "{probe}");
    for name in [
        "dispatcher",
        "acl",
        "lb",
        "conn-limit",
        "rate-limit",
        "wasm",
        "monitor",
    ] {
        let svc = &services[name];
        let health = svc
            .get("healthcheck")
            .or_else(|| (svc.get("<<").is_some()).then_some(&daemon["healthcheck"]))
            .unwrap_or_else(|| panic!("{name} has no healthcheck"));
        assert!(health["test"].to_string().contains("/readyz"), "{name}");
        let metrics = svc["environment"]["POLICY_METRICS_ADDR"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} serves no /readyz"));
        let port = metrics.rsplit(':').next().unwrap_or_default();
        assert!(
            health["test"].to_string().contains(&format!(":{port}/")),
            "{name}"
        );
    }
}

/// The fleet's compose file runs a secured fleet as `auth fleet` writes it: one job writes every
/// server's folder for the sites the hub follows, each server runs its own folder's nats.conf,
/// every process logs in with its own role's seed from its engine's folder, the hub's engine
/// has the fleet's prefix, and every site's dispatcher takes the fleet's configuration from
/// the hub. The unsecured configurations in deploy/nats/fleet are what `bus::fleet` writes.
#[test]
fn the_fleet_compose_file_runs_a_secured_hub_and_sites_as_auth_fleet_writes_them() {
    let body = |name: &str| {
        read(&format!("deploy/nats/fleet/{name}.conf"))
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    };
    assert_eq!(body("hub"), bus::fleet::hub_conf("hub", "0.0.0.0:7422"));
    let subjects = bus::Subjects::default();
    for site in ["site-1", "site-2"] {
        assert_eq!(
            body(site),
            bus::fleet::site_conf(site, "nats-leaf://nats-hub:7422", &subjects)
        );
    }
    let doc: serde_json::Value = serde_norway::from_str(&read("compose.fleet.yaml")).expect("yaml");
    let services = doc["services"].as_object().expect("services");
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let env = |service: &str, key: &str| {
        doc["services"][service]["environment"][key]
            .as_str()
            .map(str::to_string)
    };
    let after = |args: &[String], flag: &str| {
        args.windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"))
    };
    let auth = strings(&doc["services"]["auth"]["entrypoint"]);
    assert_eq!(auth[..3], ["policyctl", "auth", "fleet"]);
    assert_eq!(after(&auth, "--auth-dir"), "/auth");
    assert_eq!(after(&auth, "--hub-url"), "nats-leaf://nats-hub:7422");
    assert_eq!(after(&auth, "--leaf-listen"), "0.0.0.0:7422");
    assert_eq!(
        Some(after(&auth, "--sites")),
        env("hub-dispatcher", "POLICY_FLEET_SITES"),
        "the hub follows the sites auth fleet writes"
    );
    for (engine, prefix) in [
        ("hub", subjects.fleet().prefix()),
        ("site-1", "policy"),
        ("site-2", "policy"),
    ] {
        let server = strings(&doc["services"][&format!("nats-{engine}")]["command"]);
        assert_eq!(after(&server, "-c"), format!("/auth/{engine}/nats.conf"));
        let mut seen = Vec::new();
        for (name, svc) in services
            .iter()
            .filter(|(n, _)| n.starts_with(&format!("{engine}-")))
        {
            let entry = strings(&svc["entrypoint"]);
            let role = match entry.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                ["policy-dispatcher", ..] => Role::Dispatcher,
                ["policy-agent", kind, ..] => Role::of_kind(&bus::Kind::new(kind).expect("kind")),
                ["policyctl", "load", ..] => Role::Operator,
                _ => panic!("{name}: {entry:?}"),
            };
            assert_eq!(
                env(name, "NATS_NKEY_FILE"),
                Some(format!("/auth/{engine}/{}.nk", role.name())),
                "{name}"
            );
            assert_eq!(
                env(name, "POLICY_PREFIX").as_deref(),
                Some(prefix),
                "{name}"
            );
            // Its own server's folder only: no other engine's seeds.
            let mounts = svc["volumes"].as_array().cloned().unwrap_or_default();
            assert!(!mounts.is_empty(), "{name} mounts no seeds");
            for m in mounts {
                assert_eq!(m["volume"]["subpath"].as_str(), Some(engine), "{name}: {m}");
                let target = format!("/auth/{engine}");
                assert_eq!(m["target"].as_str(), Some(target.as_str()), "{name}");
            }
            seen.push(role);
        }
        for role in Role::shipped() {
            if !matches!(role, Role::Gateway | Role::WasmHost) {
                assert!(seen.contains(&role), "no {engine} service runs as {role}");
            }
        }
    }
    assert_eq!(env("hub-dispatcher", "POLICY_FLEET_HUB"), None);
    for site in ["site-1", "site-2"] {
        let dispatcher = format!("{site}-dispatcher");
        assert_eq!(env(&dispatcher, "POLICY_FLEET_HUB").as_deref(), Some("hub"));
    }
}
