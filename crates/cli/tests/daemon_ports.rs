//! End-to-end tests of port exposure: real `moat serve`, real VMs, a server in the guest
//! reached only through the daemon and the sandbox's network stack (HTTP, a WebSocket,
//! `moat sandbox port-forward` for raw TCP), who may reach it, suspend/resume, and daemon
//! restarts (SIGTERM and `kill -9`).

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::daemon::{moat, msg, Daemon, ADMIN, G};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The guest's servers: HTTP on 8080 (echoes the path and the headers the proxy set; a
/// minimal WebSocket echo on upgrade; POST answers the body's length) and a server-first TCP
/// service on 9000 (greets with the peer's address, counts bytes to EOF, answers the count).
const SERVERS: &str = r#"
import base64, hashlib, http.server, socket, socketserver, struct, threading
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def reply(self, body):
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.headers.get('Upgrade', '').lower() == 'websocket':
            return self.ws()
        self.reply(('path=%s auth=%s prefix=%s' % (self.path, self.headers.get('Authorization'),
            self.headers.get('X-Forwarded-Prefix'))).encode())
    def do_POST(self):
        n = len(self.rfile.read(int(self.headers['Content-Length'])))
        self.reply(b'got %d' % n)
    def ws(self):
        key = self.headers['Sec-WebSocket-Key'] + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11'
        self.send_response(101)
        self.send_header('Upgrade', 'websocket')
        self.send_header('Connection', 'Upgrade')
        self.send_header('Sec-WebSocket-Accept',
            base64.b64encode(hashlib.sha1(key.encode()).digest()).decode())
        self.end_headers()
        self.wfile.flush()
        r, w = self.rfile, self.wfile
        while True:
            h = r.read(2)
            if len(h) < 2:
                return
            op, n = h[0] & 15, h[1] & 127
            if n == 126:
                n = struct.unpack('>H', r.read(2))[0]
            elif n == 127:
                n = struct.unpack('>Q', r.read(8))[0]
            mask = r.read(4) if h[1] & 128 else b'\0\0\0\0'
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(r.read(n)))
            if op == 8:
                w.write(b'\x88\x00')
                w.flush()
                return
            out = b'echo:' + data
            w.write(bytes([0x80 | op, len(out)]) + out)
            w.flush()
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
def greet(c, a):
    c.sendall(('hello %s\n' % a[0]).encode())
    n = 0
    while True:
        d = c.recv(65536)
        if not d:
            break
        n += len(d)
    c.sendall(b'got %d' % n)
    c.close()
def tcp():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', 9000))
    s.listen()
    while True:
        c, a = s.accept()
        threading.Thread(target=greet, args=(c, a), daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
S(('0.0.0.0', 8080), H).serve_forever()
"#;

/// Starts the guest's servers as a background process.
async fn start_servers(d: &Daemon, id: &str) {
    let (st, f) = d
        .call_raw(
            Some(ADMIN),
            "PUT",
            &format!("{G}/web/sandboxes/{id}/files?path=/srv.py"),
            Some(SERVERS.as_bytes().to_vec()),
        )
        .await;
    assert_eq!(st, 201, "{f}");
    let (st, p) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/web/sandboxes/{id}/processes"),
            Some(json!({"argv": ["python3", "/srv.py"]})),
        )
        .await;
    assert_eq!(st, 201, "{p}");
}

/// GETs `path` with the admin key until it is not a 502 (the guest's server is starting).
async fn get_when_up(d: &Daemon, path: &str) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (st, v) = d.call(Some(ADMIN), "GET", path, None).await;
        if st != 502 || Instant::now() > deadline {
            return (st, v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_port_is_reached_through_the_daemon_only_with_access() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    for g in ["web", "other"] {
        d.put_group(g, json!({"tier": "s"}), 201).await;
    }
    let id = d.new_sandbox("web").await;
    let ports = format!("{G}/web/sandboxes/{id}/ports");

    // Not exposed yet: 404; exposed before anything listens: 502 saying so.
    let (st, e) = d
        .call(Some(ADMIN), "GET", &format!("{ports}/8080/"), None)
        .await;
    assert_eq!((st, msg(&e).contains("not exposed")), (404, true), "{e}");
    let (st, p) = d
        .call(Some(ADMIN), "POST", &ports, Some(json!({"port": 8080})))
        .await;
    assert_eq!(st, 201, "{p}");
    let url = p["url"].as_str().unwrap().to_string();
    assert_eq!(url, format!("{ports}/8080/"));
    let (st, e) = d.call(Some(ADMIN), "GET", &url, None).await;
    assert_eq!(st, 502, "{e}");
    assert!(msg(&e).contains("nothing listens on port 8080"), "{e}");

    start_servers(&d, &id).await;
    let (st, body) = get_when_up(&d, &format!("{url}hello/w%20x?y=1&z")).await;
    assert_eq!(st, 200, "{body}");
    // The guest gets the path as sent, never the API key, and the proxy's prefix.
    assert_eq!(
        body,
        json!(format!(
            "path=/hello/w%20x?y=1&z auth=None prefix={ports}/8080"
        ))
    );
    // A 2 MiB body goes through.
    let (st, body) = d
        .call_raw(
            Some(ADMIN),
            "POST",
            &format!("{url}upload"),
            Some(vec![b'x'; 2 << 20]),
        )
        .await;
    assert_eq!((st, body), (200, json!("got 2097152")));

    // A WebSocket through the proxy.
    let mut req = format!("ws://127.0.0.1:{}{url}ws", d.port)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    for m in ["one", "two"] {
        ws.send(Message::Text(m.into())).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, Message::Text(format!("echo:{m}").into()));
    }
    ws.close(None).await.unwrap();

    // Who may reach it: no key 401, a reader 403, another group's key and another group's
    // path 404, a port not exposed 404 (even with something listening there).
    let reader = d.key("reader", &["web"]).await;
    let stranger = d.key("owner", &["other"]).await;
    let (st, _) = d.call(None, "GET", &url, None).await;
    assert_eq!(st, 401);
    let (st, _) = d.call(Some(&reader), "GET", &url, None).await;
    assert_eq!(st, 403);
    let (st, _) = d.call(Some(&stranger), "GET", &url, None).await;
    assert_eq!(st, 404);
    let (st, _) = d
        .call(
            Some(ADMIN),
            "GET",
            &format!("{G}/other/sandboxes/{id}/ports/8080/"),
            None,
        )
        .await;
    assert_eq!(st, 404);
    let (st, _) = d
        .call(Some(ADMIN), "GET", &format!("{ports}/9000/"), None)
        .await;
    assert_eq!(st, 404);
    let pf = |key: &str, port: &str| {
        moat()
            .args([
                "sandbox",
                "port-forward",
                "web",
                &id,
                port,
                "--local",
                "127.0.0.1:0",
            ])
            .env("MOAT_URL", d.url())
            .env("MOAT_API_KEY", key)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let out = pf(&stranger, "9000").wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no sandbox"),
        "{out:?}"
    );

    // port-forward: raw TCP to any port, server-first, with a half-close; the guest sees the
    // stack's gateway as its peer.
    let mut child = pf(ADMIN, "9000");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let local = line
        .strip_prefix("forwarding ")
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_string();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(&local).await.unwrap();
        let mut hello = [0u8; 20];
        s.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello 100.127.255.1\n");
        s.write_all(&vec![1u8; 1 << 20]).await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, format!("got {}", 1 << 20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // Closing the port closes the URL.
    let (st, _) = d
        .call(Some(ADMIN), "DELETE", &format!("{ports}/8080"), None)
        .await;
    assert_eq!(st, 204);
    let (st, _) = d.call(Some(ADMIN), "GET", &url, None).await;
    assert_eq!(st, 404);
    let (st, l) = d.call(Some(ADMIN), "GET", &ports, None).await;
    assert_eq!((st, l["ports"].clone()), (200, json!([])));
}

/// An exposed port outlives a suspend: after the resume the same URL reaches the same
/// server (its process and socket were suspended with the VM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_port_survives_suspend_and_resume() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("web", json!({"tier": "s"}), 201).await;
    let id = d.new_sandbox("web").await;
    let ports = format!("{G}/web/sandboxes/{id}/ports");
    let (st, p) = d
        .call(Some(ADMIN), "POST", &ports, Some(json!({"port": 8080})))
        .await;
    assert_eq!(st, 201, "{p}");
    let url = p["url"].as_str().unwrap().to_string();
    start_servers(&d, &id).await;
    let (st, body) = get_when_up(&d, &format!("{url}before")).await;
    assert_eq!(st, 200, "{body}");

    let (st, sb, _) = d.lifecycle("web", &id, "suspend").await;
    assert_eq!((st, &sb["state"]), (200, &json!("suspended")), "{sb}");
    let (st, l) = d.call(Some(ADMIN), "GET", &ports, None).await;
    assert_eq!((st, l["ports"][0]["port"].clone()), (200, json!(8080)));
    let (st, sb, _) = d.lifecycle("web", &id, "resume").await;
    assert_eq!((st, &sb["state"]), (200, &json!("running")), "{sb}");
    let (st, body) = d
        .call(Some(ADMIN), "GET", &format!("{url}after"), None)
        .await;
    assert_eq!(st, 200, "{body}");
    assert!(body.as_str().unwrap().starts_with("path=/after "), "{body}");
}

/// Exposed ports and a running `moat sandbox port-forward` outlive the daemon: after a
/// SIGTERM and after a `kill -9`, the next daemon adopts the sandbox, still lists the port,
/// serves its URL, and the same port-forward process reaches the guest again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposed_ports_and_port_forward_survive_daemon_restarts() {
    let mut d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("web", json!({"tier": "s"}), 201).await;
    let id = d.new_sandbox("web").await;
    let ports = format!("{G}/web/sandboxes/{id}/ports");
    let (st, p) = d
        .call(Some(ADMIN), "POST", &ports, Some(json!({"port": 8080})))
        .await;
    assert_eq!(st, 201, "{p}");
    let url = p["url"].as_str().unwrap().to_string();
    start_servers(&d, &id).await;
    let (st, body) = get_when_up(&d, &format!("{url}before")).await;
    assert_eq!(st, 200, "{body}");

    let mut forward = moat()
        .args([
            "sandbox",
            "port-forward",
            "web",
            &id,
            "9000",
            "--local",
            "127.0.0.1:0",
        ])
        .env("MOAT_URL", d.url())
        .env("MOAT_API_KEY", ADMIN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(forward.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let local = line
        .strip_prefix("forwarding ")
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_string();
    let greeted = || async {
        let mut s = tokio::net::TcpStream::connect(&local).await.unwrap();
        let mut hello = [0u8; 20];
        s.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello 100.127.255.1\n");
        s.write_all(b"four").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "got 4");
    };
    greeted().await;

    for (how, restart) in [("SIGTERM", false), ("kill -9", true)] {
        if restart {
            d.kill9();
        } else {
            d.terminate();
        }
        d.spawn(None).await;
        assert_eq!(d.state("web", &id).await, "running", "after {how}");
        let (st, l) = d.call(Some(ADMIN), "GET", &ports, None).await;
        assert_eq!(
            (st, l["ports"][0]["port"].clone()),
            (200, json!(8080)),
            "after {how}: {l}"
        );
        let (st, body) = d
            .call(Some(ADMIN), "GET", &format!("{url}after"), None)
            .await;
        assert_eq!(st, 200, "after {how}: {body}");
        assert!(body.as_str().unwrap().starts_with("path=/after "), "{body}");
        greeted().await;
    }
    forward.kill().unwrap();
    forward.wait().unwrap();
}
