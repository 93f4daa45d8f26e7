//! The group's egress CA in the guest's trust store. The host-side network stack presents
//! certificates of this CA for the hosts whose requests it transforms (crates/net,
//! intercept.rs), so the guest must trust it: it is written to
//! `/etc/ssl/certs/moat-egress-ca.pem` and into the system bundle
//! (`/etc/ssl/certs/ca-certificates.crt`, what Debian's, Alpine's and most images' TLS
//! libraries read), between markers so that a restore or a new configuration replaces it.
//! Execs then get `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`, `GIT_SSL_CAINFO`
//! (the bundle) and `NODE_EXTRA_CA_CERTS` (the CA alone: Node adds it to its own roots),
//! unless the exec sets them itself.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Mutex;

use crate::files::replace_if_changed;

const DIR: &str = "/etc/ssl/certs";
const BUNDLE: &str = "ca-certificates.crt";
const CA_FILE: &str = "moat-egress-ca.pem";
const BEGIN: &str = "# moat egress CA: begin\n";
const END: &str = "# moat egress CA: end\n";
const MAX_PEM: usize = 64 * 1024;

/// The environment execs get once a CA is installed.
static ENV: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());

/// Installs `pem` (one PEM certificate) in the trust store; the error says what failed.
pub fn install(pem: &str) -> Result<(), String> {
    let env = install_at(pem, Path::new(DIR))?;
    *ENV.lock().unwrap_or_else(|p| p.into_inner()) = env;
    Ok(())
}

/// Variables that point TLS clients at the trust store, for an exec to add where it does not
/// set them itself.
pub fn exec_env() -> Vec<(&'static str, String)> {
    ENV.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn install_at(pem: &str, dir: &Path) -> Result<Vec<(&'static str, String)>, String> {
    let pem = pem.trim();
    if pem.len() > MAX_PEM
        || !pem.starts_with("-----BEGIN CERTIFICATE-----")
        || !pem.ends_with("-----END CERTIFICATE-----")
        || pem.matches("-----BEGIN").count() != 1
    {
        return Err("trust_ca_pem is not one PEM certificate".into());
    }
    let fail = |what: &Path| {
        let what = what.display().to_string();
        move |e: io::Error| format!("{what}: {e}")
    };
    fs::create_dir_all(dir).map_err(fail(dir))?;
    let ca = dir.join(CA_FILE);
    replace_if_changed(&ca, format!("{pem}\n").as_bytes()).map_err(fail(&ca))?;
    let bundle = dir.join(BUNDLE);
    let old = match fs::read_to_string(&bundle) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(fail(&bundle)(e)),
    };
    let mut text = without_block(&old);
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(BEGIN);
    text.push_str(pem);
    text.push('\n');
    text.push_str(END);
    replace_if_changed(&bundle, text.as_bytes()).map_err(fail(&bundle))?;
    let b = bundle.display().to_string();
    Ok(vec![
        ("SSL_CERT_FILE", b.clone()),
        ("REQUESTS_CA_BUNDLE", b.clone()),
        ("CURL_CA_BUNDLE", b.clone()),
        ("GIT_SSL_CAINFO", b),
        ("NODE_EXTRA_CA_CERTS", ca.display().to_string()),
    ])
}

/// `text` without an earlier moat block.
fn without_block(text: &str) -> String {
    match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{}", &text[..b], &text[e + END.len()..]),
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----";

    /// A fresh directory of this test's own.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moat-trust-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_ca_joins_the_bundle_once_and_is_replaced() {
        let dir = scratch("a");
        let bundle = dir.join(BUNDLE);
        fs::write(&bundle, "SYSTEM ROOTS\n").unwrap();
        let env = install_at(PEM, &dir).unwrap();
        let other = PEM.replace("AAAA", "BBBB");
        install_at(&other, &dir).unwrap();
        let text = fs::read_to_string(&bundle).unwrap();
        assert!(text.starts_with("SYSTEM ROOTS\n"), "{text}");
        assert_eq!(text.matches(BEGIN).count(), 1, "{text}");
        assert!(text.contains("BBBB") && !text.contains("AAAA"), "{text}");
        assert!(fs::read_to_string(dir.join(CA_FILE))
            .unwrap()
            .contains("BBBB"));
        let names: Vec<_> = env.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "SSL_CERT_FILE",
                "REQUESTS_CA_BUNDLE",
                "CURL_CA_BUNDLE",
                "GIT_SSL_CAINFO",
                "NODE_EXTRA_CA_CERTS"
            ]
        );
        // An image without a bundle gets one with the CA.
        let empty = scratch("b");
        install_at(PEM, &empty.join("certs")).unwrap();
        assert!(fs::read_to_string(empty.join("certs").join(BUNDLE))
            .unwrap()
            .contains("AAAA"));
        for bad in ["", "hello", &format!("{PEM}\n{PEM}")] {
            assert!(install_at(bad, &dir).is_err(), "{bad:?}");
        }
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&empty);
    }
}
