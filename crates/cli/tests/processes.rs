//! End-to-end tests of the exec features of protocol version 2 in real VMs: interactive PTY
//! execs and background processes (start, list, kill, wait, logs).

mod common;

use std::time::{Duration, Instant};

use common::{req, runtime, sandbox, unique};
use moat_protocol::{ErrorKind, ExecRequest, ProcInfo, PtySize, PROC_LOG_RING};
use moat_vm::agent::{AgentConn, Exec, ExecEvent, ExitStatus};
use moat_vm::{Error, Sandbox};

fn pty(argv: &[&str], rows: u16, cols: u16) -> ExecRequest {
    ExecRequest {
        pty: Some(PtySize { rows, cols }),
        ..req(argv)
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Reads the terminal until its output (all of it so far) contains `needle`.
async fn read_until(exec: &mut Exec, out: &mut Vec<u8>, needle: &str) {
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while !text(out).contains(needle) {
            match exec.next().await.expect("pty exec") {
                ExecEvent::Stdout(d) => out.extend_from_slice(&d),
                other => panic!("unexpected {other:?} while waiting for {needle:?}"),
            }
        }
    })
    .await;
    assert!(found.is_ok(), "no {needle:?} in {:?}", text(out));
}

async fn wait_exit(exec: &mut Exec) -> ExitStatus {
    loop {
        match exec.next().await.expect("pty exec") {
            ExecEvent::Exit(status) => return status,
            ExecEvent::Stdout(_) => {}
            ExecEvent::Stderr(d) => panic!("stderr on a terminal: {:?}", text(&d)),
        }
    }
}

async fn info(agent: &AgentConn, id: &str) -> ProcInfo {
    let procs = agent.proc_list().await.expect("proc list");
    procs
        .into_iter()
        .find(|p| p.id == id)
        .unwrap_or_else(|| panic!("{id} not listed"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_exec() {
    let rt = runtime();
    let sb = sandbox(&rt).await;
    let agent = sb.agent();

    // A terminal of the requested size, stderr merged into stdout, exit code as usual.
    let out = agent
        .exec_output(
            pty(
                &[
                    "sh",
                    "-c",
                    "tty; stty size; echo $TERM; echo err >&2; exit 7",
                ],
                33,
                101,
            ),
            1 << 20,
        )
        .await
        .expect("exec");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("/dev/pts/"), "{stdout:?}");
    assert!(stdout.contains("33 101"), "{stdout:?}");
    assert!(stdout.contains("xterm-256color"), "{stdout:?}");
    assert!(stdout.contains("err"), "{stdout:?}");
    assert!(out.stderr.is_empty());
    assert_eq!(out.status.code, Some(7));

    // An interactive shell driven through stdin, resized while it runs.
    let mut exec = agent.exec(pty(&["sh", "-i"], 24, 80)).await.expect("exec");
    let stdin = exec.take_stdin().expect("a terminal always has input");
    let mut out = Vec::new();
    stdin.write(b"stty size\n").await.unwrap();
    read_until(&mut exec, &mut out, "24 80").await;
    exec.resize(50, 132).await.unwrap();
    stdin.write(b"stty size\n").await.unwrap();
    read_until(&mut exec, &mut out, "50 132").await;
    stdin.write(b"exit 3\n").await.unwrap();
    assert_eq!(wait_exit(&mut exec).await.code, Some(3));

    // A timeout kills a terminal's process like any other.
    let mut r = pty(&["sleep", "300"], 24, 80);
    r.timeout_ms = Some(500);
    let mut exec = agent.exec(r).await.expect("exec");
    assert!(wait_exit(&mut exec).await.timed_out);

    sb.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_processes() {
    let rt = runtime();
    let sb = sandbox(&rt).await;
    let agent = sb.agent();

    // Runs beyond its request; output kept per stream.
    let p = agent
        .proc_start(req(&["sh", "-c", "echo hi; sleep 2; echo bye >&2"]))
        .await
        .expect("start");
    assert!(p.id.starts_with('p'), "{p:?}");
    let listed = info(agent, &p.id).await;
    assert!(listed.running && listed.exit.is_none(), "{listed:?}");
    assert_eq!((listed.pid, listed.argv[0].as_str()), (p.pid, "sh"));
    let status = agent
        .proc_wait(&p.id, Duration::from_secs(60))
        .await
        .expect("wait");
    assert_eq!((status.code, status.signal), (Some(0), None));
    let logs = agent.proc_logs(&p.id).await.expect("logs");
    assert_eq!(text(&logs.stdout), "hi\n");
    assert_eq!(text(&logs.stderr), "bye\n");
    // Waiting again answers at once.
    let again = agent.proc_wait(&p.id, Duration::ZERO).await.expect("wait");
    assert_eq!(again, status);

    // A short wait on a running process times out promptly; a signal then ends it.
    let s = agent.proc_start(req(&["sleep", "300"])).await.unwrap();
    let t0 = Instant::now();
    match agent.proc_wait(&s.id, Duration::from_millis(300)).await {
        Err(Error::Guest {
            kind: ErrorKind::Timeout,
            ..
        }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    agent.proc_kill(&s.id, 15).await.unwrap();
    let status = agent
        .proc_wait(&s.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(status.signal, Some(15));
    let listed = info(agent, &s.id).await;
    assert!(!listed.running, "{listed:?}");
    assert_eq!(listed.exit.map(|e| e.signal), Some(Some(15)));

    // SIGKILL takes the whole tree, children included.
    let t = agent
        .proc_start(req(&["sh", "-c", "sleep 300 & sleep 301; echo never"]))
        .await
        .unwrap();
    agent.proc_kill(&t.id, 9).await.unwrap();
    let status = agent
        .proc_wait(&t.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(status.signal, Some(9));
    let left = agent
        .exec_output(
            req(&[
                "sh",
                "-c",
                "cat /proc/[0-9]*/comm 2>/dev/null | grep -cx sleep",
            ]),
            1024,
        )
        .await
        .unwrap();
    assert_eq!(text(&left.stdout).trim(), "0", "sleeps survived the kill");

    // A chatty process never blocks; only the newest ring's worth is kept.
    let c = agent
        .proc_start(req(&[
            "sh",
            "-c",
            "head -c 20000000 /dev/zero | tr '\\0' x; echo end; echo done >&2",
        ]))
        .await
        .unwrap();
    let status = agent
        .proc_wait(&c.id, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(status.code, Some(0));
    let logs = agent.proc_logs(&c.id).await.unwrap();
    assert_eq!(logs.stdout.len(), PROC_LOG_RING);
    assert!(logs.stdout.ends_with(b"xxxend\n"));
    assert_eq!(text(&logs.stderr), "done\n");

    // Unknown ids.
    for id in ["p999999", "nope", ""] {
        for r in [
            agent.proc_kill(id, 9).await.err(),
            agent.proc_wait(id, Duration::ZERO).await.err(),
            agent.proc_logs(id).await.err(),
        ] {
            assert!(
                matches!(
                    r,
                    Some(Error::Guest {
                        kind: ErrorKind::NotFound,
                        ..
                    })
                ),
                "{id:?}: {r:?}"
            );
        }
    }
    // Neither stdin nor a terminal for background processes.
    let bad = agent.proc_start(pty(&["sh"], 24, 80)).await.unwrap_err();
    assert!(
        matches!(
            bad,
            Error::Guest {
                kind: ErrorKind::InvalidInput,
                ..
            }
        ),
        "{bad:?}"
    );

    sb.destroy().await;
}

/// The agent's process table is not tied to a session: a snapshot restored into a new VM
/// speaks to the same agent state through a new session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_process_survives_a_new_session() {
    let rt = runtime();
    let mut sb = sandbox(&rt).await;
    let p = sb
        .agent()
        .proc_start(req(&["sh", "-c", "echo before; sleep 300"]))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sb.agent().proc_logs(&p.id).await.unwrap().stdout.is_empty() {
        assert!(Instant::now() < deadline, "{} printed nothing", p.id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dir = tempfile::tempdir_in(common::home()).unwrap();
    let snap = dir.path().join("snap");
    sb.snapshot(&rt, &snap).await.expect("snapshot");
    sb.destroy().await;

    let sb = Sandbox::restore(&rt, &unique("proc"), &snap)
        .await
        .expect("restore");
    let agent = sb.agent();
    let listed = info(agent, &p.id).await;
    assert!(listed.running, "{listed:?}");
    assert_eq!(
        text(&agent.proc_logs(&p.id).await.unwrap().stdout),
        "before\n"
    );
    // New ids continue after the old ones.
    let q = agent.proc_start(req(&["true"])).await.unwrap();
    assert_ne!(q.id, p.id);
    agent.proc_kill(&p.id, 9).await.unwrap();
    let status = agent
        .proc_wait(&p.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(status.signal, Some(9));
    sb.destroy().await;
}
