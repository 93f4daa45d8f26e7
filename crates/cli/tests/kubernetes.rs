//! The Kubernetes deployment in contrib/kubernetes validates offline, with no cluster, against
//! the Kubernetes API's schemas (kubernetes-validate from PyPI, which bundles them, in a
//! virtualenv under the target directory; strict: an unknown field is an error) for the oldest
//! and newest Kubernetes it is claimed for; a broken copy does not (the validator checks what
//! it says). And the manifests keep what contrib/kubernetes/README.md promises: a privileged
//! node per KVM host with its home on the host, the store and the sealing key from the Secret,
//! probes on a route that answers without a key, the daemon's real flags and settings.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::daemon::{moat, Daemon};
use common::python::{self, run, text};
use serde_json::Value;

/// Pinned, so that a run is reproducible (the schemas are in the package).
const VALIDATOR: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "jsonschema==4.26.0",
    "referencing==0.37.0",
    "PyYAML==6.0.4",
];

/// The Kubernetes versions the manifests are claimed for (README.md).
const VERSIONS: &[&str] = &["1.29.0", "1.37.0"];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/kubernetes")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    files
}

fn load(name: &str) -> Value {
    let path = dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn validator() -> PathBuf {
    let pins: Vec<String> = VALIDATOR.iter().map(|s| s.to_string()).collect();
    let python = python::venv("kubernetes-validate-venv", &pins, &[]);
    python.parent().unwrap().join("kubernetes-validate")
}

fn validate(bin: &Path, version: &str, files: &[PathBuf]) -> (bool, String) {
    let mut c = Command::new(bin);
    c.args(["--strict", "-k", version]).args(files);
    let o = run(c, "kubernetes-validate", Duration::from_secs(120));
    (o.status.success(), text(&o))
}

#[test]
fn the_manifests_validate_offline_against_the_kubernetes_schemas() {
    let bin = validator();
    let files = manifests();
    for version in VERSIONS {
        let (ok, out) = validate(&bin, version, &files);
        assert!(ok, "Kubernetes {version}:\n{out}");
        // One "passed" per manifest: none was skipped as an unknown kind.
        assert_eq!(out.matches(" passed ").count(), files.len(), "{out}");
    }
    // A misspelt field and a wrong type are refused: the validation is real.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(self::dir().join("daemonset.yaml")).unwrap();
    for (from, to, says) in [
        (
            "failureThreshold: 60",
            "failureThreshhold: 60",
            "failureThreshhold",
        ),
        ("privileged: true", "privileged: \"yes\"", "privileged"),
    ] {
        assert!(text.contains(from), "{from}");
        let broken = dir.path().join("daemonset.yaml");
        std::fs::write(&broken, text.replacen(from, to, 1)).unwrap();
        let (ok, out) = validate(&bin, VERSIONS[1], &[broken]);
        assert!(!ok && out.contains(says), "{to} passed:\n{out}");
    }
}

fn env_of<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name}"))
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("nothing named {name} in {list}"))
}

#[tokio::test]
async fn the_daemonset_is_a_moat_node_per_kvm_host() {
    let ds = load("daemonset.yaml");
    assert_eq!(ds["kind"], "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["moat.dev/kvm"], "true");
    assert_eq!(pod["tolerations"][0]["key"], "moat.dev/kvm");
    assert_eq!(pod["shareProcessNamespace"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], true);
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(
        c["resources"]["limits"].is_null(),
        "a limit would cap every VM of the node"
    );

    // The home on the host, /dev/kvm required, the sealing key from the Secret at the path
    // the daemon reads, 0400.
    let home = env_of(c, "MOAT_HOME")["value"].as_str().unwrap();
    let volumes = &pod["volumes"];
    let mounts = &c["volumeMounts"];
    assert_eq!(named(mounts, "home")["mountPath"], home);
    assert_eq!(named(volumes, "home")["hostPath"]["path"], home);
    assert_eq!(named(mounts, "kvm")["mountPath"], "/dev/kvm");
    assert_eq!(named(volumes, "kvm")["hostPath"]["path"], "/dev/kvm");
    assert_eq!(named(volumes, "kvm")["hostPath"]["type"], "CharDevice");
    assert_eq!(named(mounts, "run")["mountPath"], "/run/moat");
    let seal = named(mounts, "seal");
    assert_eq!(seal["mountPath"], format!("{home}/secrets.key"));
    let item = &named(volumes, "seal")["secret"]["items"][0];
    assert_eq!(item["path"], seal["subPath"]);
    assert_eq!(item["mode"], 0o400);

    // Everything secret comes from the Secret, whose template has each key in a usable form.
    let secret = load("secret.example.yaml");
    let secret_name = secret["metadata"]["name"].as_str().unwrap();
    assert_eq!(named(volumes, "seal")["secret"]["secretName"], secret_name);
    let sealing = secret["data"][item["key"].as_str().unwrap()]
        .as_str()
        .unwrap();
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD
        .decode(sealing)
        .unwrap();
    assert_eq!(key.len(), 32, "the sealing key is 32 bytes");
    for (var, want) in [
        ("MOAT_STORE", "postgres://"),
        ("MOAT_BOOTSTRAP_KEY", "moat_"),
    ] {
        let r = &env_of(c, var)["valueFrom"]["secretKeyRef"];
        assert_eq!(r["name"], secret_name, "{var}");
        let value = secret["stringData"][r["key"].as_str().unwrap()]
            .as_str()
            .unwrap_or_else(|| panic!("{var}: no {} in the Secret", r["key"]));
        assert!(value.starts_with(want), "{var}: {value}");
    }
    let bootstrap = secret["stringData"]["bootstrap-key"].as_str().unwrap();
    let body = bootstrap.strip_prefix("moat_").unwrap();
    assert!(body.len() == 43 && body.bytes().all(|b| b.is_ascii_alphanumeric()));
    assert_eq!(
        env_of(c, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );

    // The command line: `moat serve` with flags it has, settings by variables it reads.
    let script = c["args"][0].as_str().unwrap();
    assert!(script.contains("exec moat serve "), "{script}");
    let help = moat().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let serve = script.split("exec moat serve ").nth(1).unwrap();
    for flag in serve.split_whitespace().filter(|w| w.starts_with("--")) {
        assert!(help.contains(flag), "moat serve has no {flag}:\n{help}");
    }
    for e in c["env"].as_array().unwrap() {
        let var = e["name"].as_str().unwrap();
        if var.starts_with("MOAT_") && var != "MOAT_HOME" && var != "MOAT_BOOTSTRAP_KEY" {
            assert!(help.contains(var), "moat serve reads no {var}:\n{help}");
        }
    }

    // One port: the one the daemon listens on, the probes ask and the Service targets.
    let listen = env_of(c, "MOAT_LISTEN")["value"].as_str().unwrap();
    let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
    let api = named(&c["ports"], "api");
    assert_eq!(api["containerPort"], port);
    let service = load("service.yaml");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "api");
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&ds["spec"]["template"]["metadata"]["labels"][k], v, "{k}");
    }
    let mut paths = Vec::new();
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["port"], "api", "{probe}");
        paths.push(get["path"].as_str().unwrap().to_string());
    }
    // A probe sends no API key: its route answers 200 without one.
    let d = Daemon::start(None).await;
    for path in paths {
        let (st, v) = d.call(None, "GET", &path, None).await;
        assert_eq!(st, 200, "{path}: {v}");
    }
}
