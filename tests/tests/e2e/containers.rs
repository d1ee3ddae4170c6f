//! The container files, checked without a container engine: compose files against the
//! compose-spec schema (check-jsonschema), the Dockerfile by hadolint, and what each must do.

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

/// The fleet's compose file runs what `bus::fleet` describes: the servers' configurations are
/// what it writes, the hub's engine has the fleet's prefix, and every site's dispatcher takes
/// the fleet's configuration from the hub.
#[test]
fn the_fleet_compose_file_runs_a_hub_and_sites_as_bus_fleet_describes() {
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
    let env = |service: &str, key: &str| {
        doc["services"][service]["environment"][key]
            .as_str()
            .map(str::to_string)
    };
    assert_eq!(
        env("hub-dispatcher", "POLICY_PREFIX").as_deref(),
        Some(subjects.fleet().prefix())
    );
    assert_eq!(env("hub-dispatcher", "POLICY_FLEET_HUB"), None);
    for site in ["site-1", "site-2"] {
        let dispatcher = format!("{site}-dispatcher");
        assert_eq!(env(&dispatcher, "POLICY_FLEET_HUB").as_deref(), Some("hub"));
        assert_eq!(env(&dispatcher, "POLICY_PREFIX").as_deref(), Some("policy"));
    }
}
