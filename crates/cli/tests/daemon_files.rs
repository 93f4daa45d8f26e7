//! End-to-end tests of the daemon's file routes: the real `moat serve` and a real VM. Uploads
//! and downloads stream raw bytes (checked by sha256); every JSON answer is checked against
//! the daemon's OpenAPI document.

mod common;

use std::time::Instant;

use common::daemon::{check_response, msg, Daemon, ADMIN, G};
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const MB: usize = 1 << 20;

/// `len` pseudo-random bytes (xorshift), so that nothing compresses or dedups them.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn sha(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Peak RSS (VmHWM, KiB) of the `moat serve` listening on `port`.
fn daemon_hwm_kib(port: u16) -> Option<u64> {
    let needle = format!("127.0.0.1:{port}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(" serve ") && cmd.contains(&needle) {
            let st = std::fs::read_to_string(e.path().join("status")).ok()?;
            let line = st.lines().find(|l| l.starts_with("VmHWM:"))?;
            return line.split_whitespace().nth(1)?.parse().ok();
        }
    }
    None
}

struct Sb<'a> {
    d: &'a Daemon,
    base: String,
}

impl Sb<'_> {
    fn url(&self, what: &str, query: &str) -> String {
        format!("{}{}/{what}?{query}", self.d.url(), self.base)
    }

    /// Uploads `body` in 1 MiB chunks (a streamed, chunked request).
    async fn put(&self, key: &str, query: &str, body: Vec<u8>) -> (u16, Value) {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            body.chunks(MB).map(|c| Ok(c.to_vec())).collect();
        let resp = self
            .d
            .http
            .put(self.url("files", query))
            .bearer_auth(key)
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .unwrap();
        let st = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        self.check("PUT", "files", st, &v);
        (st, v)
    }

    /// Downloads a file: (status, sha256 of the body or the JSON error, bytes).
    async fn get(&self, key: &str, path: &str) -> (u16, Value, Vec<u8>) {
        let resp = self
            .d
            .http
            .get(self.url("files", &format!("path={path}")))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        let st = resp.status().as_u16();
        if st != 200 {
            let v: Value = resp.json().await.unwrap();
            self.check("GET", "files", st, &v);
            return (st, v, Vec::new());
        }
        assert_eq!(
            resp.headers()["content-type"],
            "application/octet-stream",
            "{path}"
        );
        // Chunked: the guest's reported size is not passed on.
        assert_eq!(resp.content_length(), None, "{path}");
        let mut body = resp.bytes_stream();
        let mut out = Vec::new();
        while let Some(c) = body.next().await {
            out.extend_from_slice(&c.unwrap());
        }
        (st, json!(sha(&out)), out)
    }

    async fn call(&self, key: &str, method: &str, what: &str, query: &str) -> (u16, Value) {
        self.d
            .call(
                Some(key),
                method,
                &format!("{}/{what}?{query}", self.base),
                None,
            )
            .await
    }

    fn check(&self, method: &str, what: &str, st: u16, v: &Value) {
        let doc = self.d.doc.as_ref().unwrap();
        check_response(doc, method, &format!("{}/{what}", self.base), st, v);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_through_the_daemon() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    for g in ["web", "other"] {
        d.put_group(g, json!({"tier": "s"}), 201).await;
    }
    let user = d.key("user", &["web"]).await;
    let reader = d.key("reader", &["web"]).await;
    let stranger = d.key("owner", &["other"]).await;
    let sb = d.create(&user, "web", json!({})).await;
    let id = sb["id"].as_str().unwrap();
    let s = Sb {
        d: &d,
        base: format!("{G}/web/sandboxes/{id}"),
    };

    // A big file both ways, streamed: sha256 equal on the host, in the guest and back.
    let big = data(50 * MB, 7);
    let want = sha(&big);
    let hwm0 = daemon_hwm_kib(d.port);
    let t = Instant::now();
    let (st, w) = s
        .put(&user, "path=/root/big.bin&mode=0600", big.clone())
        .await;
    let up = t.elapsed();
    assert_eq!(st, 201, "{w}");
    assert_eq!(w, json!({"path": "/root/big.bin", "size": 50 * MB}));
    drop(big);
    assert_eq!(
        d.sh("web", id, "sha256sum /root/big.bin").await,
        format!("{want}  /root/big.bin")
    );
    let t = Instant::now();
    let (st, got, bytes) = s.get(&reader, "/root/big.bin").await;
    let down = t.elapsed();
    assert_eq!((st, got), (200, json!(want)));
    assert_eq!(bytes.len(), 50 * MB);
    let mbps = |d: std::time::Duration| 50.0 / d.as_secs_f64();
    eprintln!(
        "50 MiB through HTTP: upload {up:?} ({:.0} MiB/s), download {down:?} ({:.0} MiB/s)",
        mbps(up),
        mbps(down)
    );
    if let (Some(a), Some(b)) = (hwm0, daemon_hwm_kib(d.port)) {
        eprintln!("daemon peak RSS: {a} KiB before, {b} KiB after");
        assert!(
            b < a + 32 * 1024,
            "the daemon's peak RSS grew by {} KiB: a file was buffered",
            b - a
        );
    }

    // Replace (200), mode, parents, list.
    let (st, w) = s.put(&user, "path=/root/big.bin", b"small".to_vec()).await;
    assert_eq!((st, &w["size"]), (200, &json!(5)), "{w}");
    let (_, _, bytes) = s.get(&user, "/root/big.bin").await;
    assert_eq!(bytes, b"small");
    let (st, e) = s.put(&user, "path=/root/a/b/c.sh", b"x".to_vec()).await;
    assert_eq!(st, 404, "a missing parent without parents=true: {e}");
    let (st, e) = s
        .put(
            &user,
            "path=/root/a/b/c.sh&mode=0755&parents=true",
            b"#!/bin/sh\necho hi\n".to_vec(),
        )
        .await;
    assert_eq!(st, 201, "{e}");
    assert_eq!(d.sh("web", id, "/root/a/b/c.sh").await, "hi");
    let (st, e) = s.put(&user, "path=/root/empty", Vec::new()).await;
    assert_eq!((st, &e["size"]), (201, &json!(0)), "{e}");
    let (st, _, bytes) = s.get(&user, "/root/empty").await;
    assert_eq!((st, bytes.len()), (200, 0));
    // A file whose reported size is 0 still downloads whole.
    let (st, _, bytes) = s.get(&user, "/proc/self/status").await;
    assert_eq!(st, 200);
    assert!(String::from_utf8_lossy(&bytes).contains("Name:"));
    d.sh("web", id, "ln -s /root/a/b/c.sh /root/link").await;
    let (st, l) = s.call(&reader, "GET", "files/list", "path=/root").await;
    assert_eq!(st, 200, "{l}");
    assert_eq!(l["path"], "/root");
    let entries = l["entries"].as_array().unwrap();
    let find = |n: &str| entries.iter().find(|e| e["name"] == n).cloned();
    let a = find("a").unwrap();
    assert_eq!(a["kind"], "dir");
    let big = find("big.bin").unwrap();
    assert_eq!((&big["kind"], &big["size"]), (&json!("file"), &json!(5)));
    assert_eq!(big["mode"], "0600", "a replaced file keeps its mode");
    assert!(big["mtime"].as_str().unwrap().ends_with('Z'), "{big}");
    let link = find("link").unwrap();
    assert_eq!(
        (&link["kind"], &link["link_target"]),
        (&json!("symlink"), &json!("/root/a/b/c.sh"))
    );
    let (_, l) = s.call(&reader, "GET", "files/list", "path=/root/a/b").await;
    assert_eq!(
        l["entries"][0],
        json!({"name": "c.sh", "kind": "file", "size": 18, "mode": "0755",
            "mtime": l["entries"][0]["mtime"]})
    );

    // An upload that breaks off is never committed: the old file stays, no temporary remains.
    {
        use tokio::io::AsyncWriteExt;
        let before = s.call(&reader, "GET", "files/list", "path=/root").await.1;
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", d.port))
            .await
            .unwrap();
        let head = format!(
            "PUT {}/files?path=/root/big.bin HTTP/1.1\r\nhost: x\r\n\
             authorization: Bearer {user}\r\ncontent-length: 10000000\r\n\r\n",
            s.base
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        tcp.write_all(&[b'z'; 100_000]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        drop(tcp);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let (_, _, bytes) = s.get(&user, "/root/big.bin").await;
        assert_eq!(bytes, b"small");
        let after = s.call(&reader, "GET", "files/list", "path=/root").await.1;
        let names = |v: &Value| -> Vec<String> {
            v["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["name"].to_string())
                .collect()
        };
        assert_eq!(names(&before), names(&after), "a temporary file was left");
    }

    // `..` is resolved inside the guest: it cannot reach the host's files.
    let marker = format!("moat-traversal-{}", std::process::id());
    let (st, e) = s
        .put(
            &user,
            &format!("path=/../../tmp/../{marker}"),
            b"in".to_vec(),
        )
        .await;
    assert_eq!(st, 201, "{e}");
    assert_eq!(d.sh("web", id, &format!("cat /{marker}")).await, "in");
    assert!(!std::path::Path::new(&format!("/{marker}")).exists());
    let guest_hostname = d.sh("web", id, "cat /etc/hostname").await;
    let (st, _, bytes) = s.get(&reader, "/../../etc/hostname").await;
    assert_eq!(st, 200);
    assert_eq!(String::from_utf8_lossy(&bytes).trim(), guest_hostname);

    // Errors.
    let (st, e, _) = s.get(&user, "/root/nope").await;
    assert_eq!(st, 404, "{e}");
    let (st, e, _) = s.get(&user, "/root/a").await;
    assert_eq!(st, 400, "{e}");
    assert!(msg(&e).contains("is a directory; list it with"), "{e}");
    let (st, e) = s.call(&user, "GET", "files/list", "path=/root/empty").await;
    assert_eq!(st, 400, "listing a file: {e}");
    let (st, e) = s.call(&user, "GET", "files/list", "path=/root/nope").await;
    assert_eq!(st, 404, "{e}");
    for q in ["path=root/x", "path=/a%00b", "pth=/x", "path=/x&bogus=1"] {
        let (st, e) = s.call(&user, "GET", "files", q).await;
        assert_eq!(st, 400, "{q}: {e}");
    }
    let long = format!("path=/{}", "a".repeat(5000));
    let (st, e) = s.call(&user, "GET", "files", &long).await;
    assert_eq!(st, 400, "{e}");
    for q in ["path=/root/m&mode=0999", "path=/root/m&mode=rw"] {
        let (st, e) = s.put(&user, q, b"x".to_vec()).await;
        assert_eq!(st, 400, "{q}: {e}");
        assert!(msg(&e).contains("octal"), "{e}");
    }
    let (st, e) = s.put(&user, "path=/root/a", b"x".to_vec()).await;
    assert_eq!(st, 400, "writing over a directory: {e}");

    // Roles: a reader reads and lists but may not write or delete; another group sees nothing.
    let (st, e) = s.put(&reader, "path=/root/r", b"x".to_vec()).await;
    assert_eq!(st, 403, "{e}");
    let (st, e) = s.call(&reader, "DELETE", "files", "path=/root/empty").await;
    assert_eq!(st, 403, "{e}");
    let (st, e, _) = s.get(&stranger, "/root/empty").await;
    assert_eq!(st, 404, "{e}");
    let (st, e) = s.call(&stranger, "GET", "files/list", "path=/").await;
    assert_eq!(st, 404, "{e}");
    let (st, e) = s.put(&stranger, "path=/root/s", b"x".to_vec()).await;
    assert_eq!(st, 404, "{e}");
    let (st, e) = d
        .call(
            Some(ADMIN),
            "GET",
            &format!("{G}/other/sandboxes/{id}/files?path=/root/empty"),
            None,
        )
        .await;
    assert_eq!(st, 404, "a sandbox is found only under its own group: {e}");

    // Delete: a file, a non-empty directory (409, then recursive), a missing path, the root.
    let (st, e) = s.call(&user, "DELETE", "files", "path=/root/empty").await;
    assert_eq!(st, 204, "{e}");
    let (st, _, _) = s.get(&user, "/root/empty").await;
    assert_eq!(st, 404);
    let (st, e) = s.call(&user, "DELETE", "files", "path=/root/a").await;
    assert_eq!(st, 409, "{e}");
    let (st, e) = s
        .call(&user, "DELETE", "files", "path=/root/a&recursive=true")
        .await;
    assert_eq!(st, 204, "{e}");
    assert_eq!(
        d.sh("web", id, "test -e /root/a || echo gone").await,
        "gone"
    );
    assert_eq!(
        d.sh(
            "web",
            id,
            "test -e /root/link -o -L /root/link && echo link"
        )
        .await,
        "link",
        "a dangling symlink stays"
    );
    let (st, e) = s.call(&user, "DELETE", "files", "path=/root/nope").await;
    assert_eq!(st, 404, "{e}");
    let (st, e) = s
        .call(ADMIN, "DELETE", "files", "path=/&recursive=true")
        .await;
    assert_eq!(st, 422, "{e}");

    let (st, _) = d.call(Some(&user), "DELETE", &s.base, None).await;
    assert_eq!(st, 204);
    let (st, e, _) = s.get(&user, "/etc/hostname").await;
    assert_eq!(st, 404, "a deleted sandbox: {e}");
}
