//! `moat serve --tls-cert --tls-key` with a real certificate chain (a test CA and a leaf it
//! signed, made with rcgen): the CLI and the Python SDK connect when `MOAT_CA_FILE` names the
//! CA, and refuse the daemon when it names another CA or none; plain HTTP to the TLS port
//! gets nowhere; a bad certificate or key stops the start with the reason.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{free_port, moat, ADMIN};
use common::python::{self, root, run, text};

/// A CA and a leaf for `localhost` and 127.0.0.1 signed by it: (CA PEM, leaf PEM, key PEM).
fn chain(ca_name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), leaf.pem(), key.serialize_pem())
}

struct Served {
    child: std::process::Child,
    port: u16,
    _home: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `moat serve` over TLS with `cert`/`key`; ready when its stderr says where it listens.
fn serve(dir: &Path, cert: &Path, key: &Path) -> Result<Served, String> {
    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    let err = dir.join(format!("serve-{port}.err"));
    let mut child = moat()
        .args([
            "serve",
            "--no-setup",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .env("MOAT_HOME", home.path())
        .env("MOAT_BOOTSTRAP_KEY", ADMIN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(&err).unwrap_or_default();
        if let Some(st) = child.try_wait().unwrap() {
            return Err(format!("moat serve exited ({st}): {log}"));
        }
        if log.contains(&format!("listening on https://127.0.0.1:{port}")) {
            return Ok(Served {
                child,
                port,
                _home: home,
            });
        }
        assert!(
            Instant::now() < deadline,
            "moat serve never listened: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cli(url: &str, ca: Option<&Path>) -> std::process::Output {
    let mut c = moat();
    c.args(["group", "ls", "--json"])
        .env("MOAT_URL", url)
        .env("MOAT_API_KEY", ADMIN)
        .env_remove("MOAT_CA_FILE");
    if let Some(ca) = ca {
        c.env("MOAT_CA_FILE", ca);
    }
    c.output().unwrap()
}

#[test]
fn the_cli_and_the_sdk_verify_the_daemons_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, leaf, key) = chain("moat test CA");
    let (other_ca, _, _) = chain("some other CA");
    for (name, pem) in [
        ("ca.pem", &ca),
        ("leaf.pem", &leaf),
        ("leaf.key", &key),
        ("other.pem", &other_ca),
    ] {
        std::fs::write(d.join(name), pem).unwrap();
    }
    let s = serve(d, &d.join("leaf.pem"), &d.join("leaf.key")).unwrap();
    let url = format!("https://localhost:{}", s.port);

    let o = cli(&url, Some(&d.join("ca.pem")));
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["groups"], serde_json::json!([]), "{v}");
    // By address too: the leaf names 127.0.0.1.
    let o = cli(
        &format!("https://127.0.0.1:{}", s.port),
        Some(&d.join("ca.pem")),
    );
    assert!(o.status.success(), "{}", text(&o));
    // Another CA, or none (only the public roots): refused.
    for ca in [Some(d.join("other.pem")), None] {
        let o = cli(&url, ca.as_deref());
        assert!(!o.status.success(), "{ca:?}: {}", text(&o));
        assert!(
            text(&o).contains("cannot reach the moat daemon"),
            "{}",
            text(&o)
        );
    }
    // A CA file that is not one: a clear error, no connection.
    std::fs::write(d.join("junk.pem"), "not a certificate").unwrap();
    let o = cli(&url, Some(&d.join("junk.pem")));
    assert!(!o.status.success());
    assert!(text(&o).contains("MOAT_CA_FILE"), "{}", text(&o));
    // Plain HTTP to the TLS port gets no answer.
    let o = cli(&format!("http://127.0.0.1:{}", s.port), None);
    assert!(!o.status.success(), "{}", text(&o));

    // The Python SDK: the same CA file, and another one.
    let sdk = root().join("sdk/python");
    let python = python::venv(
        "sdk-venv",
        &["-e".to_string(), format!("{}[test]", sdk.display())],
        &[sdk.join("pyproject.toml")],
    );
    let script = "import moat, sys\n\
        try:\n    print(moat.Client().groups.list())\n\
        except moat.ConnectionFailed as e:\n    print('refused', e.message); sys.exit(3)\n";
    for (ca, ok) in [("ca.pem", true), ("other.pem", false)] {
        let mut c = Command::new(&python);
        c.args(["-c", script])
            .env("MOAT_URL", &url)
            .env("MOAT_API_KEY", ADMIN)
            .env("MOAT_CA_FILE", d.join(ca));
        let o = run(c, "the Python SDK", Duration::from_secs(60));
        assert_eq!(o.status.success(), ok, "{ca}: {}", text(&o));
        if !ok {
            assert!(text(&o).contains("refused"), "{}", text(&o));
        }
    }
}

#[test]
fn a_bad_certificate_or_key_stops_the_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, leaf, key) = chain("moat test CA");
    let (_, _, other_key) = chain("another");
    std::fs::write(d.join("leaf.pem"), &leaf).unwrap();
    std::fs::write(d.join("leaf.key"), &key).unwrap();
    std::fs::write(d.join("other.key"), &other_key).unwrap();
    std::fs::write(d.join("empty.pem"), "").unwrap();
    for (cert, key, want) in [
        ("missing.pem", "leaf.key", "cannot read it"),
        ("empty.pem", "leaf.key", "holds no CERTIFICATE"),
        ("leaf.pem", "leaf.pem", "no PEM private key"),
        ("leaf.pem", "other.key", "do not go together"),
    ] {
        let e = serve(d, &d.join(cert), &d.join(key))
            .err()
            .unwrap_or_else(|| panic!("moat serve started with {cert} and {key}"));
        assert!(e.contains(want), "{cert} {key}: {e}");
    }
}
