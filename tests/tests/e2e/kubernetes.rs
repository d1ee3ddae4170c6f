//! The Kubernetes manifests (deploy/kubernetes), checked without a cluster: every resource
//! against Kubernetes' own schemas (kubernetes-validate, strict), and the kustomization against
//! what `policyctl auth init` writes and what each process needs.

use std::path::PathBuf;

use bus::roles::Role;
use serde_json::Value as Json;

/// The Kubernetes version the manifests are checked against (1.30 is the oldest that cloud
/// providers still run in standard support at this writing).
const VERSION: &str = "1.30.0";

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

fn yaml_docs(file: &str) -> Vec<Json> {
    let text = std::fs::read_to_string(dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| <Json as serde::Deserialize>::deserialize(d).expect("yaml"))
        .filter(|d| !d.is_null())
        .collect()
}

fn validate(files: &[PathBuf]) -> (bool, String) {
    let out = std::process::Command::new(e2e::tool("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", VERSION])
        .args(files)
        .output()
        .expect("kubernetes-validate");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && !said.contains("ERROR"), said)
}

fn resources() -> Vec<String> {
    let k = &yaml_docs("kustomization.yaml")[0];
    k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("a file").to_string())
        .collect()
}

#[test]
fn the_manifests_pass_kubernetes_schemas_and_a_mistake_does_not() {
    let files: Vec<PathBuf> = resources().iter().map(|r| dir().join(r)).collect();
    let (ok, said) = validate(&files);
    assert!(ok, "{said}");
    // The check can fail: a misspelt field in a copy of the engine's manifests.
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad = tmp.path().join("engine.yaml");
    let text = std::fs::read_to_string(dir().join("engine.yaml")).expect("read");
    std::fs::write(&bad, text.replacen("readinessProbe:", "readinesProbe:", 1)).expect("write");
    let (ok, said) = validate(&[bad]);
    assert!(!ok, "a misspelt field passed: {said}");
}

#[test]
fn the_kustomization_matches_policyctl_auth_and_every_process_has_its_role() {
    let k = &yaml_docs("kustomization.yaml")[0];
    for r in resources() {
        assert!(dir().join(&r).is_file(), "{r} is listed but missing");
    }
    // Every generated file is one `policyctl auth init` writes.
    let auth = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(e2e::bin("policyctl"))
        .args(["auth", "init", "--auth-dir"])
        .arg(auth.path())
        .output()
        .expect("policyctl auth init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = |generator: &Json| -> Vec<String> {
        generator["files"]
            .as_array()
            .expect("files")
            .iter()
            .map(|f| f.as_str().expect("a path").to_string())
            .collect()
    };
    let mut secrets = std::collections::BTreeMap::new();
    for g in k["secretGenerator"].as_array().expect("secrets") {
        let name = g["name"].as_str().expect("name").to_string();
        secrets.insert(name, files(g));
    }
    let generated = k["configMapGenerator"]
        .as_array()
        .expect("config maps")
        .iter()
        .flat_map(files)
        .chain(secrets.values().flatten().cloned());
    for f in generated {
        let written = f.strip_prefix("auth/").expect("under auth/");
        assert!(
            auth.path().join(written).is_file(),
            "{f}: policyctl auth init writes no such file"
        );
    }

    // Each process: its role's Secret holds the seed it names and its store seed, it waits for
    // /readyz on the port it serves, it outlasts its drain, and Prometheus finds it.
    let mut roles_run = Vec::new();
    for doc in yaml_docs("engine.yaml") {
        assert_eq!(doc["kind"], "Deployment");
        let name = doc["metadata"]["name"].as_str().expect("name");
        let pod = &doc["spec"]["template"];
        let c = &pod["spec"]["containers"][0];
        let env = |key: &str| {
            c["env"]
                .as_array()
                .and_then(|e| e.iter().find(|v| v["name"] == key))
                .and_then(|v| v["value"].as_str())
                .unwrap_or_else(|| panic!("{name}: no {key}"))
                .to_string()
        };
        let seed = env("NATS_NKEY_FILE");
        let role = seed
            .strip_prefix("/auth/")
            .and_then(|s| s.strip_suffix(".nk"))
            .unwrap_or_else(|| panic!("{name}: {seed}"));
        let secret = pod["spec"]["volumes"][0]["secret"]["secretName"]
            .as_str()
            .expect("secret");
        assert_eq!(secret, format!("role-{role}"), "{name}");
        let held = &secrets[secret];
        for f in [format!("auth/{role}.nk"), format!("auth/{role}.store.nk")] {
            assert!(held.contains(&f), "{name}: {secret} lacks {f}");
        }
        roles_run.push(role.to_string());
        let port = env("POLICY_METRICS_ADDR")
            .rsplit_once(':')
            .map(|(_, p)| p.to_string())
            .expect("a port");
        assert_eq!(c["ports"][0]["containerPort"].to_string(), port, "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
        assert_eq!(
            pod["metadata"]["annotations"]["prometheus.io/port"],
            port.as_str(),
            "{name}"
        );
        let grace = pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("grace");
        assert!(
            grace > 10,
            "{name}: {grace} s does not outlast the 10 s drain"
        );
    }
    // The sync never pipes kubectl into policyctl: a failed kubectl would hand it an empty
    // list to prune by.
    let sync = yaml_docs("clusterlink-sync.yaml")
        .into_iter()
        .find(|d| d["kind"] == "CronJob")
        .expect("the CronJob");
    let script = sync["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
        [0]
    .as_str()
    .expect("a script")
    .to_string();
    assert!(
        script.starts_with("set -e;") && !script.contains('|'),
        "{script}"
    );
    assert!(
        script.contains("--prune-source clusterlink --keep-going"),
        "{script}"
    );
    // Every shipped role that runs a process has a Deployment; the operator and the gateway
    // are people and gateways, not processes here.
    for role in Role::shipped() {
        let name = role.name();
        if matches!(role, Role::Operator | Role::Gateway) {
            assert!(
                secrets.contains_key(&format!("role-{name}")),
                "no Secret for {name}"
            );
            continue;
        }
        assert!(roles_run.contains(&name), "no Deployment runs as {name}");
    }
}
