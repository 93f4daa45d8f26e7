//! The systemd unit in contrib/systemd is valid (`systemd-analyze verify`, offline: no
//! systemd needs to run), keeps its hardening, and runs a `moat serve` that accepts what the
//! unit gives it.

use std::path::Path;
use std::process::Command;

const UNIT: &str = "contrib/systemd/moat.service";

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(UNIT);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_systemd_unit_verifies_offline_with_its_hardening() {
    let text = unit_text();
    // verify checks that ExecStart's program exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("moat.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/moat", env!("CARGO_BIN_EXE_moat")),
    )
    .unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (scripts/install-deps.sh installs systemd)");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success() && out.trim().is_empty(), "{out}");
    for option in [
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/kvm rw",
        "KillMode=process",
        "RuntimeDirectoryPreserve=yes",
        "Environment=MOAT_HOME=/var/lib/moat",
    ] {
        assert!(
            text.lines().any(|l| l.trim() == option),
            "{UNIT} lost {option}"
        );
    }
    // The jail writes cgroups: the tree must stay writable.
    assert!(!text.lines().any(|l| l.starts_with("ProtectControlGroups")));
    // `moat serve` takes the unit's settings from the environment: each one it documents is
    // a flag's env (a renamed one would be ignored without a word).
    let help = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for var in [
        "MOAT_LISTEN",
        "MOAT_TLS_CERT",
        "MOAT_TLS_KEY",
        "MOAT_RATE_LIMIT",
        "MOAT_AUDIT_RETENTION",
    ] {
        assert!(text.contains(var), "{UNIT} does not name {var}");
        assert!(
            help.contains(var),
            "moat serve has no flag for {var}:\n{help}"
        );
    }
}
