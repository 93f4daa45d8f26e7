//! End-to-end tests of the runtime library: real QEMU, real guest kernel, the real agent and
//! the base image (Debian bookworm with python3), under TCG on machines without VT-x/AMD-V.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{req, runtime, sandbox, sh, unique};
use moat_protocol::{ErrorKind, FileKind};
use moat_vm::agent::ExecEvent;
use moat_vm::{Error, Sandbox, Tier};
use sha2::{Digest, Sha256};
use tokio::io::AsyncRead;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_semantics() {
    let rt = runtime();
    let sb = sandbox(&rt).await;

    // Separate streams and exit codes.
    let out = sh(&sb, "echo out; echo err >&2; exit 3").await;
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    assert_eq!((out.status.code, out.status.shell_code()), (Some(3), 3));

    // Death by signal.
    let out = sh(&sb, "kill -KILL $$").await;
    assert_eq!(out.status.signal, Some(9));
    assert_eq!(out.status.shell_code(), 137);

    // A missing program is an error of its own kind, which `moat run` maps to 127.
    match sb.agent().exec(req(&["no-such-program"])).await {
        Err(Error::Guest {
            kind: ErrorKind::CommandNotFound,
            message,
        }) => assert!(message.contains("no-such-program"), "{message}"),
        other => panic!("expected command-not-found, got {other:?}"),
    }

    // env, cwd and user, resolved from the image's own /etc/passwd.
    let mut r = req(&["sh", "-c", "echo $GREETING; pwd; id -u; echo $HOME"]);
    r.env.push("GREETING=hi".into());
    r.cwd = Some("/tmp".into());
    r.user = Some("nobody".into());
    let out = sb.agent().exec_output(r, 4096).await.unwrap();
    assert_eq!(text(&out.stdout), "hi\n/tmp\n65534\n/nonexistent\n");
    let mut r = req(&["true"]);
    r.user = Some("no-such-user".into());
    assert!(matches!(
        sb.agent().exec(r).await,
        Err(Error::Guest {
            kind: ErrorKind::UnknownUser,
            ..
        })
    ));
    let mut r = req(&["true"]);
    r.cwd = Some("/no/such/dir".into());
    assert!(matches!(
        sb.agent().exec(r).await,
        Err(Error::Guest {
            kind: ErrorKind::NotFound,
            ..
        })
    ));

    // stdin, several MB of it, through `wc -c`.
    let mut r = req(&["wc", "-c"]);
    r.stdin = true;
    let mut exec = sb.agent().exec(r).await.unwrap();
    let stdin = exec.take_stdin().unwrap();
    let payload = vec![b'x'; 5 << 20];
    let writer = tokio::spawn(async move {
        stdin.write(&payload).await.unwrap();
        stdin.close().await.unwrap();
    });
    let mut stdout = Vec::new();
    let status = loop {
        match exec.next().await.unwrap() {
            ExecEvent::Stdout(d) => stdout.extend(d),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exit(s) => break s,
        }
    };
    writer.await.unwrap();
    assert_eq!(status.code, Some(0));
    assert_eq!(text(&stdout).trim(), (5 << 20).to_string());

    // Output streams as it is produced: the first line arrives while the process still runs.
    let mut exec = sb
        .agent()
        .exec(req(&["sh", "-c", "echo first; sleep 3; echo second"]))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    assert_eq!(
        exec.next().await.unwrap(),
        ExecEvent::Stdout(b"first\n".to_vec())
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let mut rest = Vec::new();
    loop {
        match exec.next().await.unwrap() {
            ExecEvent::Stdout(d) => rest.extend(d),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exit(_) => break,
        }
    }
    assert_eq!(text(&rest), "second\n");
    assert!(started.elapsed() >= Duration::from_secs(3));

    // Many execs at once.
    let agent = sb.agent();
    let runs = (0..8).map(|i| async move {
        let out = agent
            .exec_output(req(&["sh", "-c", &format!("echo {i}")]), 64)
            .await
            .unwrap();
        assert_eq!(text(&out.stdout), format!("{i}\n"));
    });
    futures_util::future::join_all(runs).await;

    sb.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_tree() {
    let rt = runtime();
    let sb = sandbox(&rt).await;
    let count_sleeps = "n=0; for c in /proc/[0-9]*/comm; do [ \"$(cat $c 2>/dev/null)\" = sleep ] && n=$((n+1)); done; echo $n";
    let mut r = req(&[
        "sh",
        "-c",
        "sleep 300 & (sleep 300 &) ; setsid sleep 300 & sleep 300",
    ]);
    r.timeout_ms = Some(1500);
    let started = std::time::Instant::now();
    let out = sb.agent().exec_output(r, 1024).await.unwrap();
    assert!(out.status.timed_out);
    assert_eq!(out.status.shell_code(), 124);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(text(&sh(&sb, count_sleeps).await.stdout).trim(), "0");

    // Without a timeout, a background process outlives its exec.
    let out = sh(&sb, "sleep 300 > /dev/null 2>&1 &").await;
    assert_eq!(out.status.code, Some(0));
    assert_eq!(text(&sh(&sb, count_sleeps).await.stdout).trim(), "1");
    sb.destroy().await;
}

/// A deterministic, incompressible byte stream of `len` bytes.
struct Pattern {
    left: u64,
    state: u64,
}

impl AsyncRead for Pattern {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left).min(1 << 16) as usize;
        let mut chunk = Vec::with_capacity(n);
        while chunk.len() < n {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            chunk.extend_from_slice(&self.state.to_le_bytes());
        }
        chunk.truncate(n);
        buf.put_slice(&chunk);
        self.left -= n as u64;
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files() {
    let rt = runtime();
    let sb = sandbox(&rt).await;
    let agent = sb.agent();

    // A large file streams both ways intact.
    let size: u64 = 200 << 20;
    let mut expect = Sha256::new();
    {
        use tokio::io::AsyncReadExt;
        let mut p = Pattern {
            left: size,
            state: 42,
        };
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = p.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            expect.update(&buf[..n]);
        }
    }
    let written = agent
        .write_file(
            "/data/big.bin",
            Some(0o600),
            true,
            Pattern {
                left: size,
                state: 42,
            },
        )
        .await
        .unwrap();
    assert_eq!(written, size);
    let st = agent.stat("/data/big.bin").await.unwrap();
    assert_eq!((st.kind, st.size, st.mode), (FileKind::File, size, 0o600));
    let mut reader = agent.read_file("/data/big.bin").await.unwrap();
    let mut got = Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = reader.chunk().await.unwrap() {
        n += chunk.len() as u64;
        got.update(&chunk);
    }
    assert_eq!(n, size);
    assert_eq!(got.finalize(), expect.finalize());

    // mkdir, list, stat of a directory, remove.
    agent.mkdir("/data/a/b/c", true, None).await.unwrap();
    agent
        .write_file("/data/a/b/c/hello.txt", None, false, &b"hello"[..])
        .await
        .unwrap();
    let names: Vec<String> = agent
        .list("/data")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"a".into()) && names.contains(&"big.bin".into()));
    assert_eq!(agent.stat("/data/a").await.unwrap().kind, FileKind::Dir);
    let out = sh(&sb, "cat /data/a/b/c/hello.txt").await;
    assert_eq!(text(&out.stdout), "hello");

    // Errors keep their meaning.
    let kind = |r: Result<_, Error>| match r {
        Err(Error::Guest { kind, .. }) => kind,
        other => panic!("expected a guest error, got {other:?}"),
    };
    assert_eq!(
        kind(agent.read_file("/nope").await.map(|_| ())),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(agent.read_file("/data").await.map(|_| ())),
        ErrorKind::IsADirectory
    );
    assert_eq!(
        kind(agent.stat("relative/path").await.map(|_| ())),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(
            agent
                .write_file("/no/dir/f", None, false, &b"x"[..])
                .await
                .map(|_| ())
        ),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(agent.remove("/data/a", false).await),
        ErrorKind::DirectoryNotEmpty
    );
    assert_eq!(
        kind(agent.mkdir("/data/a", false, None).await),
        ErrorKind::AlreadyExists
    );
    // Paths are resolved in the guest: `..` cannot leave the guest's root.
    assert_eq!(text(&sh(&sb, "echo inside > /escape.txt").await.stderr), "");
    let st = agent.stat("/../../../escape.txt").await.unwrap();
    assert_eq!(st.size, 7);
    // A full filesystem in the guest is its own error.
    sh(
        &sb,
        "mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small",
    )
    .await;
    assert_eq!(
        kind(
            agent
                .write_file("/mnt/small/f", None, false, &vec![1u8; 4 << 20][..])
                .await
                .map(|_| ())
        ),
        ErrorKind::NoSpace
    );
    agent.remove("/data/a", true).await.unwrap();
    assert_eq!(
        kind(agent.stat("/data/a").await.map(|_| ())),
        ErrorKind::NotFound
    );
    sb.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_and_fork() {
    let rt = runtime();
    let mut sb = sandbox(&rt).await;
    // A running process with state in memory, and a file on disk.
    sh(&sb, "echo kept > /root/file1").await;
    sh(&sb, common::COUNTER).await;
    let dir = tempfile::tempdir_in(common::home()).unwrap();
    let snap = dir.path().join("snap");
    let meta = sb.snapshot(&rt, &snap).await.unwrap();
    assert!(meta.memory_bytes > 0);
    for f in ["meta.json", "memory.bin", "disk.qcow2"] {
        assert!(snap.join(f).is_file(), "{f} missing");
    }
    // The original keeps running after the snapshot.
    assert_eq!(text(&sh(&sb, "cat /root/file1").await.stdout), "kept\n");
    sh(&sb, "echo after > /root/file2").await;
    sb.destroy().await;

    // Time passes while the snapshot sits on disk; the restored guest must not lag behind.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Two restores at once, each with its own disk.
    let (ida, idb) = (unique("fork"), unique("fork"));
    let (a, b) = tokio::join!(
        Sandbox::restore(&rt, &ida, &snap),
        Sandbox::restore(&rt, &idb, &snap)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    for sb in [&a, &b] {
        assert_eq!(text(&sh(sb, "cat /root/file1").await.stdout), "kept\n");
        // Written after the snapshot: not in it.
        assert_eq!(sh(sb, "test -e /root/file2").await.status.code, Some(1));
        // The counter process survived and keeps counting.
        let first: u64 = text(&sh(sb, "cat /run/counter").await.stdout)
            .trim()
            .parse()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let now: u64 = text(&sh(sb, "cat /run/counter").await.stdout)
                .trim()
                .parse()
                .unwrap();
            if now > first {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "counter stuck at {first}"
            );
        }
        // The clock was set from the host: the guest's reading lies between the host's readings
        // before and after the exec (with 2 s of slack), however long a loaded host makes the
        // round trip.
        let host_now = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        };
        let before = host_now();
        let guest: f64 = text(&sh(sb, "date +%s.%N").await.stdout)
            .trim()
            .parse()
            .unwrap();
        let after = host_now();
        assert!(
            guest > before - 2.0 && guest < after + 2.0,
            "guest clock {guest} outside the host's [{before}, {after}] by more than 2 s"
        );
    }
    // Forks have their own disks.
    sh(&a, "echo a > /root/who").await;
    sh(&b, "echo b > /root/who").await;
    assert_eq!(text(&sh(&a, "cat /root/who").await.stdout), "a\n");
    assert_eq!(text(&sh(&b, "cat /root/who").await.stdout), "b\n");
    // And never the same random bytes.
    let rand = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let (ra, rb) = (sh(&a, rand).await.stdout, sh(&b, rand).await.stdout);
    assert_eq!(ra.len(), 64);
    assert_ne!(ra, rb, "two restores produced the same random bytes");
    a.destroy().await;
    b.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_cannot_boot_reports_its_console() {
    let rt = runtime();
    // Not a filesystem: the agent cannot mount it, says so on the console and the VM ends.
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("garbage.raw");
    std::fs::write(&disk, vec![0xa5u8; 8 << 20]).unwrap();
    let err = Sandbox::boot(&rt, &unique("broken"), "sha256:none", &disk, Tier::Xs)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("console"), "{msg}");
    assert!(
        msg.contains("/dev/vda"),
        "console tail should show the agent's complaint: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_clean_and_prompt() {
    let rt = runtime();
    let sb = sandbox(&rt).await;
    sh(&sb, "sleep 300 > /dev/null 2>&1 &").await;
    let started = std::time::Instant::now();
    assert!(
        sb.shutdown(Duration::from_secs(20)).await,
        "guest did not power off"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}
