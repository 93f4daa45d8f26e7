//! Group secrets end to end: `moat secret set|ls|rm` against a real `moat serve`, the value
//! from stdin, never in any answer, the database or the daemon's log (at debug level).

mod common;

use std::io::Write;
use std::process::Stdio;

use common::daemon::{Daemon, ADMIN, G};
use serde_json::json;

const VALUE: &str = "sk-cli-secret-VALUE-9f3a";

#[tokio::test]
async fn cli_sets_lists_and_removes_secrets_and_the_value_stays_hidden() {
    let mut d = Daemon::start(Some(ADMIN)).await;
    // Again with debug logs: the log is checked for the value at the end.
    d.terminate();
    d.args.push("-vv".into());
    d.spawn(None).await;
    d.put_group("sec", json!({}), 201).await;

    let mut set = common::daemon::moat()
        .args(["secret", "set", "sec", "openai"])
        .env("MOAT_URL", d.url())
        .env("MOAT_API_KEY", ADMIN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    set.stdin
        .take()
        .unwrap()
        .write_all(format!("{VALUE}\n").as_bytes())
        .unwrap();
    let out = set.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("secret openai of group sec created"),
        "{text}"
    );

    let out = d.cli(ADMIN, &["secret", "ls", "sec"]);
    let ls = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success());
    assert!(ls.contains("openai") && !ls.contains(VALUE), "{ls}");
    let out = d.cli(ADMIN, &["secret", "ls", "sec", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["secrets"][0]["name"], "openai");

    // The trailing newline was dropped: a transform naming it is accepted, and the group's
    // spec holds the placeholder only.
    let (st, g) = d
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/sec"),
            Some(
                json!({"egress": {"rules": [{"host": "api.example.com", "ports": [443],
                "transform": {"headers": {"Authorization": "Bearer ${secret:openai}"}}}]}}),
            ),
        )
        .await;
    assert_eq!(st, 200, "{g}");
    assert!(!g.to_string().contains(VALUE));

    // No value on stdin: a clear error, nothing sent.
    let out = common::daemon::moat()
        .args(["secret", "set", "sec", "empty"])
        .env("MOAT_URL", d.url())
        .env("MOAT_API_KEY", ADMIN)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no value on stdin"));

    let out = d.cli(ADMIN, &["secret", "rm", "sec", "openai"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.cli(ADMIN, &["secret", "rm", "sec", "openai"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no secret"));

    // Nowhere on disk in the clear: not the database (WAL included), not the log.
    for f in std::fs::read_dir(d.home.path()).unwrap().flatten() {
        if f.path().is_file() {
            let bytes = std::fs::read(f.path()).unwrap();
            assert!(
                !bytes.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()),
                "{} holds the value",
                f.path().display()
            );
        }
    }
    assert!(
        d.stderr(2).contains("INFO"),
        "logs at debug level: {}",
        d.stderr(2)
    );
}

/// The sealing key rotated with the CLI: `moat sealing-key new` beside the daemon, the node
/// shows the next key within a renewal, `moat sealing-key rotate` (admin only) re-seals the
/// secret and the signing keys, the key files switch, and the restarted daemon opens its
/// signing keys with the new key alone and seals a new secret with it.
#[tokio::test]
async fn the_sealing_key_is_rotated_with_the_cli_and_a_restart_needs_only_the_new_key() {
    let mut d = Daemon::start(Some(ADMIN)).await;
    d.terminate();
    d.args.extend(["--lease-s".into(), "3".into()]);
    d.spawn(None).await;
    d.put_group("rot", json!({}), 201).await;
    let (st, e) = d
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/rot/secrets/openai"),
            Some(json!({"value": VALUE})),
        )
        .await;
    assert_eq!(st, 201, "{e}");
    let home = d.home.path().to_path_buf();
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    let out = d.cli(ADMIN, &["sealing-key", "rotate"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("moat sealing-key new"),
        "{}",
        text(&out)
    );

    let out = common::daemon::moat()
        .args(["sealing-key", "new"])
        .env("MOAT_HOME", &home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let next = std::fs::read(home.join("secrets.key.next")).unwrap();
    let id = text(&out)
        .split("key id ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap()
        .to_string();
    // The node shows it as its next key at its next renewal (a second, with a 3 s lease).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, v) = d.call(Some(ADMIN), "GET", "/v1/nodes", None).await;
        if v["nodes"][0]["next_sealing_key_id"] == id.as_str() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no next key shown: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let out = d.cli(ADMIN, &["node", "ls"]);
    assert!(text(&out).contains(&format!("next {id}")), "{}", text(&out));

    let user = d.key("user", &["rot"]).await;
    let (st, e) = d
        .call(Some(&user), "POST", "/v1/sealing-key/rotate", None)
        .await;
    assert_eq!(st, 403, "{e}");
    let out = d.cli(ADMIN, &["sealing-key", "rotate"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("sealed with key {id}"))
            && text(&out).contains("1 secrets and 2 signing keys"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read(home.join("secrets.key")).unwrap(), next);
    assert!(!home.join("secrets.key.next").exists());
    let (_, v) = d.call(Some(ADMIN), "GET", "/v1/nodes", None).await;
    assert_eq!(v["nodes"][0]["sealing_key_id"], id.as_str(), "{v}");
    assert!(v["nodes"][0].get("next_sealing_key_id").is_none(), "{v}");
    let (st, e) = d
        .call(Some(ADMIN), "POST", "/v1/sealing-key/rotate", None)
        .await;
    assert_eq!(st, 409, "{e}");

    // Restarted with the new key only (the old one is nowhere): it opens its signing keys to
    // start, rotates them, and keeps secrets.
    d.terminate();
    d.spawn(None).await;
    let out = d.cli(ADMIN, &["identity", "rotate"]);
    assert!(out.status.success(), "{}", text(&out));
    let (st, e) = d
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/rot/secrets/second"),
            Some(json!({"value": "v2"})),
        )
        .await;
    assert_eq!(st, 201, "{e}");
    let out = d.cli(ADMIN, &["secret", "ls", "rot"]);
    assert!(
        text(&out).contains("openai") && text(&out).contains("second"),
        "{}",
        text(&out)
    );
}

/// A test CA and a leaf for `name` signed by it: (ca_pem, leaf_pem, key_pem, leaf_der).
fn test_certs(name: &str) -> (String, String, String, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "moat test upstream CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (
        ca_cert.pem(),
        leaf.pem(),
        key.serialize_pem(),
        leaf.der().to_vec(),
    )
}

/// A Python HTTPS server on `addr`:443 with `cert`/`key`, recording each request (path, its
/// Authorization headers, body length) as a JSON line in `log`.
fn https_server(
    dir: &std::path::Path,
    addr: &str,
    cert: &str,
    key: &str,
) -> (std::process::Child, std::path::PathBuf) {
    let (c, k, log) = (
        dir.join(format!("{addr}.crt")),
        dir.join(format!("{addr}.key")),
        dir.join(format!("{addr}.log")),
    );
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    std::fs::write(&log, "").unwrap();
    let script = r#"
import http.server, json, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.do_GET()
    def do_GET(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = b""
        while len(body) < n:
            chunk = self.rfile.read(n - len(body))
            if not chunk:
                break
            body += chunk
        rec = {"path": self.path, "auth": self.headers.get_all("Authorization") or [],
               "identity": self.headers.get_all("X-Identity") or [], "len": len(body)}
        with open(sys.argv[4], "a") as f:
            f.write(json.dumps(rec) + "\n")
        out = json.dumps(rec).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer((sys.argv[1], 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, addr])
        .arg(&c)
        .arg(&k)
        .arg(&log)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    (child, log)
}

/// `GET https://api.test/v1/h2` over HTTP/2 with Python's standard library only: the
/// connection preface, SETTINGS (acknowledged), one HEADERS frame of HPACK literals without
/// indexing or Huffman, then frames until the stream's DATA ends. Prints the ALPN protocol,
/// the `:status` (`200` when the first header field is HPACK's static entry 8, `:status:
/// 200`; else the block in hex) and the body as JSON.
const H2_GET: &str = r#"
import json, socket, ssl, struct
ctx = ssl.create_default_context()
ctx.set_alpn_protocols(["h2"])
s = ctx.wrap_socket(socket.create_connection(("api.test", 443), timeout=60), server_hostname="api.test")
def frame(t, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", sid) + payload
def lit(name, value):
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value
block = (lit(b":method", b"GET") + lit(b":scheme", b"https") + lit(b":authority", b"api.test")
    + lit(b":path", b"/v1/h2") + lit(b"authorization", b"Bearer guest"))
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + frame(1, 0x5, 1, block))
buf = b""
def read(n):
    global buf
    while len(buf) < n:
        c = s.recv(65536)
        if not c:
            raise SystemExit("connection closed")
        buf += c
    out, buf = buf[:n], buf[n:]
    return out
status, body = None, b""
while True:
    h = read(9)
    n, t, fl, sid = int.from_bytes(h[:3], "big"), h[3], h[4], int.from_bytes(h[5:], "big") & 0x7FFFFFFF
    p = read(n)
    if t == 4 and not fl & 1:
        s.sendall(frame(4, 1, 0))
    elif t == 1 and sid == 1:
        status = "200" if p[0] == 0x88 else "not 200: " + p.hex()
    elif t == 0 and sid == 1:
        body += p
        if fl & 1:
            break
    elif t in (3, 7):
        raise SystemExit("stream reset or GOAWAY: " + p.hex())
print(json.dumps({"alpn": s.selected_alpn_protocol(), "status": status, "body": json.loads(body)}))
"#;

/// Runs Python `script` in the guest; its stdout.
async fn py(d: &Daemon, group: &str, id: &str, script: &str) -> String {
    let (st, r) = d
        .exec(
            ADMIN,
            group,
            id,
            json!({"argv": ["python3", "-c", script], "timeout_s": 300}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["exit_code"], 0, "{r}");
    r["stdout"].as_str().unwrap().to_string()
}

/// Injection end to end in a real guest: a loopback HTTPS server (private CA via
/// `--upstream-ca`) receives the secret while the guest's env, files and processes never hold
/// it; the guest's own header is replaced; a 10 MiB upload passes; Host ≠ SNI is refused; a
/// host without a transform is not intercepted (the guest sees the server's own certificate);
/// a deleted secret refuses the request; every injection is audited without the value.
#[tokio::test]
async fn secrets_are_injected_at_egress_and_never_enter_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    // Loopback addresses of their own: port 443 on them clashes with no one.
    let n = std::process::id() % 250 + 2;
    let (api_ip, plain_ip) = (format!("127.77.{n}.1"), format!("127.77.{n}.2"));
    let (ca, leaf, key, _) = test_certs("api.test");
    let (_, plain_leaf, plain_key, plain_der) = test_certs("plain.test");
    let (mut api, api_log) = https_server(dir.path(), &api_ip, &leaf, &key);
    let (mut plain, _) = https_server(dir.path(), &plain_ip, &plain_leaf, &plain_key);
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        format!("{api_ip} api.test\n{plain_ip} plain.test\n"),
    )
    .unwrap();
    let upstream_ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&upstream_ca, &ca).unwrap();
    let d = Daemon::start_with_runtime_args(
        Some(ADMIN),
        &[
            "--egress-hosts",
            &hosts.display().to_string(),
            "--egress-resolver",
            "127.0.0.1:9",
            "--upstream-ca",
            &upstream_ca.display().to_string(),
        ],
    )
    .await;
    d.put_group("inj", json!({"tier": "s"}), 201).await;
    let (st, v) = d
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/inj/secrets/api"),
            Some(json!({"value": VALUE})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    // The same rule also injects a workload-identity token minted for each request.
    d.put_group(
        "inj",
        json!({"tier": "s",
            "identity": {"enabled": true, "audiences": ["api://moat-test"]},
            "egress": {"rules": [
            {"host": "api.test", "ports": [443], "transform": {
                "headers": {"Authorization": "Bearer ${secret:api}",
                            "X-Identity": "${identity:api://moat-test}"},
                "paths": ["/v1"]}},
            {"host": "plain.test", "ports": [443]},
        ]}}),
        200,
    )
    .await;
    let id = d.new_sandbox("inj").await;

    // Injected, replacing the guest's own header, on /v1 only; a 10 MiB upload passes.
    let out = py(&d, "inj", &id, r#"
import json, os, urllib.request
def call(path, data=None, auth="Bearer guest"):
    r = urllib.request.Request("https://api.test" + path, data=data, headers={"Authorization": auth})
    return json.loads(urllib.request.urlopen(r, timeout=120).read())
print(json.dumps([call("/v1/models"), call("/other"), call("/v1/upload", b"x" * (10 << 20))]))
print(os.environ.get("SSL_CERT_FILE"), os.environ.get("NODE_EXTRA_CA_CERTS"))
"#).await;
    let mut lines = out.lines();
    let got: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(got[0]["auth"], json!([format!("Bearer {VALUE}")]), "{got}");
    assert_eq!(
        got[1]["auth"],
        json!(["Bearer guest"]),
        "outside the paths: {got}"
    );
    assert_eq!(got[2]["len"], 10 << 20, "{got}");
    // A fresh token per request, for this sandbox and that audience; none outside the paths.
    let claims = |i: usize| {
        let jwt = got[i]["identity"][0].as_str().expect("a token").to_string();
        let payload = jwt.split('.').nth(1).expect("a JWT");
        use base64::Engine;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        (
            jwt,
            serde_json::from_slice::<serde_json::Value>(&raw).unwrap(),
        )
    };
    let ((t0, c0), (t2, c2)) = (claims(0), claims(2));
    assert_ne!(t0, t2, "one token per request");
    for c in [&c0, &c2] {
        assert_eq!(c["aud"], "api://moat-test", "{c}");
        assert_eq!(c["sandbox_id"], id.as_str(), "{c}");
        assert_eq!(c["group"], "inj", "{c}");
    }
    assert_eq!(got[1]["identity"], json!([]), "outside the paths: {got}");
    let (_, events) = d
        .call(
            Some(ADMIN),
            "GET",
            &format!("{G}/inj/identity/events"),
            None,
        )
        .await;
    assert!(
        events.to_string().contains("egress") && !events.to_string().contains(&t0),
        "mints are audited without the token: {events}"
    );
    assert_eq!(got[2]["auth"], json!([format!("Bearer {VALUE}")]));
    assert_eq!(
        lines.next().unwrap(),
        "/etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/moat-egress-ca.pem"
    );
    assert!(std::fs::read_to_string(&api_log).unwrap().contains(VALUE));

    // Host other than the SNI: refused before anything reaches the server.
    let before = std::fs::read_to_string(&api_log).unwrap().lines().count();
    let out = py(
        &d,
        "inj",
        &id,
        r#"
import http.client
c = http.client.HTTPSConnection("api.test", timeout=60)
c.request("GET", "/v1/x", headers={"Host": "evil.test"})
r = c.getresponse()
print(r.status, r.read().decode().strip())
"#,
    )
    .await;
    assert!(
        out.starts_with("421 ") && out.contains("TLS server name"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(&api_log).unwrap().lines().count(),
        before
    );

    // An HTTP/2 request from the guest (the image has no HTTP/2 client: a minimal one on
    // Python's ssl, HPACK literals only): the stack speaks h2 to the guest and injects, the
    // server (HTTP/1.1) gets the secret and a token.
    let out = py(&d, "inj", &id, H2_GET).await;
    let h2: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("{out}"));
    assert_eq!(h2["alpn"], "h2", "{h2}");
    assert_eq!(h2["status"], "200", "{h2}");
    assert_eq!(h2["body"]["path"], "/v1/h2", "{h2}");
    assert_eq!(
        h2["body"]["auth"],
        json!([format!("Bearer {VALUE}")]),
        "{h2}"
    );
    assert_eq!(
        h2["body"]["identity"].as_array().map(Vec::len),
        Some(1),
        "{h2}"
    );

    // A host without a transform keeps its own certificate.
    let out = py(
        &d,
        "inj",
        &id,
        r#"
import hashlib, socket, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with socket.create_connection(("plain.test", 443), timeout=60) as s:
    with ctx.wrap_socket(s, server_hostname="plain.test") as t:
        print(hashlib.sha256(t.getpeercert(binary_form=True)).hexdigest())
"#,
    )
    .await;
    let want = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&plain_der))
    };
    assert_eq!(out.trim(), want, "plain.test was intercepted");

    // The secret is nowhere in the guest: not in the environment, not in any process's
    // environment or command line, not in the files an exec could read.
    let (st, r) = d
        .exec(
            ADMIN,
            "inj",
            &id,
            json!({"argv": ["sh", "-c",
            "env; cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n'; \
             grep -rsl -- \"$0\" /etc /root /home /tmp /var /run /opt /srv /usr/local \
             | sed 's/^/FOUND /'; true",
            VALUE], "timeout_s": 600}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let stdout = r["stdout"].as_str().unwrap();
    // The only place the value appears is the command line of this very check.
    assert_eq!(stdout.matches(VALUE).count(), 1, "{stdout}");
    assert!(
        !stdout.lines().any(|l| l.starts_with("FOUND ")),
        "a file holds the value: {stdout}"
    );

    // Audited, without the value.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, v) = d
            .call(Some(ADMIN), "GET", &format!("{G}/inj/egress"), None)
            .await;
        let items = v["items"].as_array().unwrap().clone();
        assert!(!v.to_string().contains(VALUE));
        if items.iter().any(|e| {
            e["kind"] == "http"
                && e["verdict"] == "allow"
                && e["reason"].as_str().unwrap().contains("authorization")
        }) {
            assert!(items
                .iter()
                .any(|e| e["kind"] == "http" && e["verdict"] == "deny"));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{v:#}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // A deleted secret fails closed: the request is refused with the reason.
    let (st, _) = d
        .call(Some(ADMIN), "DELETE", &format!("{G}/inj/secrets/api"), None)
        .await;
    assert_eq!(st, 204);
    let out = py(
        &d,
        "inj",
        &id,
        r#"
import urllib.request, urllib.error
try:
    urllib.request.urlopen("https://api.test/v1/models", timeout=60)
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode().strip())
"#,
    )
    .await;
    assert!(
        out.starts_with("403 ") && out.contains("does not exist"),
        "{out}"
    );
    api.kill().unwrap();
    plain.kill().unwrap();
    let _ = api.wait();
    let _ = plain.wait();
}
