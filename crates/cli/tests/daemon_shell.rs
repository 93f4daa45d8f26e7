//! End-to-end tests of the interactive shell (a PTY over a WebSocket) and `moat sandbox shell`
//! / `exec -i`: real `moat serve`, real VMs.

mod common;

use std::io::Write;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{moat, msg, Daemon, ADMIN, G};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Groups web and other, and a sandbox in web: its id.
async fn setup(d: &Daemon) -> String {
    for g in ["web", "other"] {
        d.put_group(g, json!({"tier": "s"}), 201).await;
    }
    d.new_sandbox("web").await
}

/// Opens the shell route with `query`; the HTTP status on refusal.
async fn connect(d: &Daemon, key: &str, id: &str, query: &str) -> Result<Ws, u16> {
    let url = format!(
        "ws://127.0.0.1:{}{G}/web/sandboxes/{id}/shell?{query}",
        d.port
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => {
            assert_eq!(resp.status(), 101);
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("connecting: {e}"),
    }
}

async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::Binary(text.as_bytes().to_vec().into()))
        .await
        .unwrap();
}

/// Terminal output until it contains `needle` (the output so far), or the exit message.
async fn read_until(ws: &mut Ws, needle: &str) -> (String, Option<Value>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} within 60 s; output: {out:?}"));
        match m {
            Some(Ok(Message::Binary(b))) => {
                out.push_str(&String::from_utf8_lossy(&b));
                if out.contains(needle) {
                    return (out, None);
                }
            }
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["type"], "exit", "{v}");
                return (out, Some(v));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("unexpected {other:?}; output: {out:?}"),
        }
    }
}

/// "alive\n" while the process whose pid a shell wrote to /run/sh.pid runs, "" after.
async fn shell_alive(d: &Daemon, id: &str) -> Value {
    let (st, r) = d
        .exec(
            ADMIN,
            "web",
            id,
            json!({"command": "kill -0 $(cat /run/sh.pid) 2>/dev/null && echo alive"}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    r["stdout"].clone()
}

/// `moat …` against the daemon with `input` on a pipe as stdin.
fn cli_with_stdin(d: &Daemon, args: &[&str], input: &[u8]) -> Output {
    let mut child = moat()
        .args(args)
        .env("MOAT_URL", d.url())
        .env("MOAT_API_KEY", ADMIN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_session_resize_exit_and_disconnect() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let id = setup(&d).await;

    // The login shell on an 80x24 terminal; resize; the exit code comes back.
    let t = Instant::now();
    let mut ws = connect(&d, ADMIN, &id, "cols=80&rows=24").await.unwrap();
    eprintln!("shell: upgraded after {:?}", t.elapsed());
    send(&mut ws, "stty size\n").await;
    read_until(&mut ws, "24 80").await;
    eprintln!("shell: first command's output after {:?}", t.elapsed());
    ws.send(Message::Text(
        json!({"type": "resize", "cols": 132, "rows": 43})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    send(&mut ws, "stty size; echo $TERM\n").await;
    read_until(&mut ws, "43 132").await;
    read_until(&mut ws, "xterm-256color").await;
    // `h""i` so that the terminal's echo of the line does not match.
    send(&mut ws, "echo h\"\"i; exit 3\n").await;
    let (out, exit) = read_until(&mut ws, "no such output").await;
    assert!(out.contains("hi\r\n"), "{out:?}");
    let exit = exit.expect("exit message");
    assert_eq!(exit["exit_code"], 3, "{exit}");
    assert!(exit["signal"].is_null(), "{exit}");
    // A normal close follows.
    match ws.next().await {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("expected a close, got {other:?}"),
    }

    // A command instead of the shell, as another user; a bad resize closes with the reason.
    let mut ws = connect(
        &d,
        ADMIN,
        &id,
        "cols=10&rows=5&command=id%20-un&user=nobody",
    )
    .await
    .unwrap();
    let (out, exit) = read_until(&mut ws, "no such output").await;
    assert!(out.contains("nobody"), "{out:?}");
    assert_eq!(exit.unwrap()["exit_code"], 0);
    let mut ws = connect(&d, ADMIN, &id, "cols=10&rows=5&command=sleep%20100")
        .await
        .unwrap();
    ws.send(Message::Text(
        json!({"type": "resize", "cols": 0, "rows": 5})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    match ws.next().await {
        Some(Ok(Message::Close(Some(f)))) => {
            assert_eq!(u16::from(f.code), 1008);
            assert!(f.reason.contains("1–1000"), "{}", f.reason);
        }
        other => panic!("expected a close, got {other:?}"),
    }

    // A missing command: 127, as in exec.
    let mut ws = connect(&d, ADMIN, &id, "cols=10&rows=5&command=/no/such")
        .await
        .unwrap();
    let (_, exit) = read_until(&mut ws, "no such output").await;
    assert_eq!(exit.unwrap()["exit_code"], 127);

    // The client goes away: the guest's process is killed.
    let mut ws = connect(
        &d,
        ADMIN,
        &id,
        "cols=80&rows=24&command=echo%20%24%24%20%3E%20%2Frun%2Fsh.pid%3B%20echo%20re%22%22ady%3B%20exec%20sleep%201000",
    )
    .await
    .unwrap();
    read_until(&mut ws, "ready").await;
    assert_eq!(shell_alive(&d, &id).await, "alive\n");
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if shell_alive(&d, &id).await == "" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the shell's process outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The CLI without a terminal: stdin's bytes are typed in, its end is Ctrl-D.
    let o = cli_with_stdin(
        &d,
        &["sandbox", "shell", "web", &id],
        b"echo h\"\"i; exit 3\n",
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("hi\r\n"), "{out:?}");
    let o = cli_with_stdin(&d, &["sandbox", "shell", "web", &id, "--", "cat"], b"abc");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("abc"));
    let o = cli_with_stdin(
        &d,
        &["sandbox", "shell", "web", &id, "--", "sh", "-c", "exit 7"],
        b"",
    );
    assert_eq!(o.status.code(), Some(7));

    // exec -i sends stdin whole.
    let o = cli_with_stdin(
        &d,
        &["sandbox", "exec", "-i", "web", &id, "--", "wc", "-c"],
        b"hello",
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "5");
    assert_eq!(o.status.code(), Some(0));
    let o = cli_with_stdin(
        &d,
        &["sandbox", "exec", "-i", "web", &id, "--", "true"],
        &[0xff, 0xfe],
    );
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not UTF-8"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_resumes_suspended_sandboxes_and_checks_access() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let id = setup(&d).await;
    let path = format!("{G}/web/sandboxes/{id}/shell");

    // Access and validation, as the other sandbox routes (plain requests, checked against the
    // OpenAPI document).
    let reader = d.key("reader", &["web"]).await;
    let other = d.key("user", &["other"]).await;
    let (st, v) = d
        .call(
            Some(&reader),
            "GET",
            &format!("{path}?cols=80&rows=24"),
            None,
        )
        .await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = d
        .call(
            Some(&other),
            "GET",
            &format!("{path}?cols=80&rows=24"),
            None,
        )
        .await;
    assert_eq!(st, 404, "{v}");
    let (st, v) = d
        .call(None, "GET", &format!("{path}?cols=80&rows=24"), None)
        .await;
    assert_eq!(st, 401, "{v}");
    for (q, needle) in [
        ("cols=0&rows=24", "invalid cols"),
        ("cols=80&rows=1001", "invalid rows"),
        ("cols=x&rows=24", "invalid cols"),
        ("rows=24", "missing cols"),
        ("cols=80&rows=24&cwd=rel", "invalid cwd"),
        ("cols=80&rows=24&user=a%20b", "invalid user"),
        ("cols=80&rows=24&term=a%20b", "invalid term"),
        ("cols=80&rows=24&nope=1", "unknown field"),
        ("cols=80&rows=24", "WebSocket"),
    ] {
        let (st, v) = d
            .call(Some(ADMIN), "GET", &format!("{path}?{q}"), None)
            .await;
        assert_eq!(st, 400, "{q}: {v}");
        assert!(msg(&v).contains(needle), "{q}: {v}");
    }
    // The same refusals reach a WebSocket client as HTTP statuses.
    assert_eq!(
        connect(&d, &reader, &id, "cols=80&rows=24").await.err(),
        Some(403)
    );
    assert_eq!(
        connect(&d, &other, &id, "cols=80&rows=24").await.err(),
        Some(404)
    );
    assert_eq!(
        connect(&d, ADMIN, &id, "cols=0&rows=24").await.err(),
        Some(400)
    );

    // A shell on a suspended sandbox resumes it, with its files as they were.
    d.sh("web", &id, "echo kept > /root/f").await;
    let (st, sb, _) = d.lifecycle("web", &id, "suspend").await;
    assert_eq!((st, &sb["state"]), (200, &json!("suspended")), "{sb}");
    let t = Instant::now();
    let mut ws = connect(&d, ADMIN, &id, "cols=80&rows=24&command=cat%20/root/f")
        .await
        .unwrap();
    eprintln!(
        "shell: upgraded on a suspended sandbox after {:?}",
        t.elapsed()
    );
    let (out, exit) = read_until(&mut ws, "no such output").await;
    assert!(out.contains("kept"), "{out:?}");
    assert_eq!(exit.unwrap()["exit_code"], 0);
    assert_eq!(d.state("web", &id).await, "running");

    // A suspend waits for an open shell to end (the shell holds the sandbox).
    let mut ws = connect(&d, ADMIN, &id, "cols=80&rows=24").await.unwrap();
    send(&mut ws, "echo re\"\"ady\n").await;
    read_until(&mut ws, "ready").await;
    let suspend = {
        let http = d.http.clone();
        let url = format!("{}{G}/web/sandboxes/{id}/suspend", d.url());
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    // Nothing signals "still waiting": give the suspend time to (wrongly) finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!suspend.is_finished(), "suspend did not wait for the shell");
    send(&mut ws, "exit 0\n").await;
    let (_, exit) = read_until(&mut ws, "no such output").await;
    assert_eq!(exit.unwrap()["exit_code"], 0);
    assert_eq!(suspend.await.unwrap(), 200);

    // A delete does not wait for an open shell: it ends it with "going away".
    let mut ws = connect(
        &d,
        ADMIN,
        &id,
        "cols=80&rows=24&command=echo%20ready%3B%20sleep%20600",
    )
    .await
    .expect("shell");
    read_until(&mut ws, "ready").await;
    let t = Instant::now();
    d.delete("web", &id).await;
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "delete waited {:?}",
        t.elapsed()
    );
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                assert_eq!(u16::from(f.code), 1001, "{f:?}");
                assert!(f.reason.contains("deleted"), "{f:?}");
                break;
            }
            Ok(Some(Ok(Message::Binary(_)))) => {}
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

/// What a terminal's master side has read so far, filled by a thread.
struct Screen(std::sync::Arc<std::sync::Mutex<String>>);

impl Screen {
    fn start(master: std::fs::File) -> Screen {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let b = buf.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut master = master;
            let mut chunk = [0u8; 4096];
            while let Ok(n) = master.read(&mut chunk) {
                if n == 0 {
                    return;
                }
                b.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        Screen(buf)
    }

    /// Waits until `needle` appears after byte `from`; returns where it ends.
    fn wait_for(&self, needle: &str, from: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            {
                let s = self.0.lock().unwrap();
                if let Some(i) = s.get(from..).and_then(|t| t.find(needle)) {
                    return from + i + needle.len();
                }
                assert!(Instant::now() < deadline, "no {needle:?} in {s:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn set_size(fd: &std::os::fd::OwnedFd, cols: u16, rows: u16) {
    use std::os::fd::AsRawFd;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer; fd is an open terminal.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(r, 0);
}

/// `moat sandbox shell` on a real terminal (a pty whose slave is its controlling terminal):
/// raw mode while it runs and the original mode after, on a normal exit and on SIGTERM;
/// a window size change reaches the remote terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_shell_on_a_terminal() {
    use nix::sys::termios::{tcgetattr, LocalFlags};
    use std::os::unix::process::CommandExt;

    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let id = setup(&d).await;
    let spawn = || {
        let pty = nix::pty::openpty(None, None).unwrap();
        set_size(&pty.master, 80, 24);
        let before = tcgetattr(&pty.slave).unwrap();
        let mut c = moat();
        c.args(["sandbox", "shell", "web", &id])
            .env("MOAT_URL", d.url())
            .env("MOAT_API_KEY", ADMIN)
            .env("TERM", "vt100")
            .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
            .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
            .stderr(Stdio::from(pty.slave.try_clone().unwrap()));
        // SAFETY: only async-signal-safe calls between fork and exec: a new session whose
        // controlling terminal is the pty (stdin), as a terminal emulator sets up a shell.
        unsafe {
            c.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = c.spawn().unwrap();
        let screen = Screen::start(std::fs::File::from(pty.master.try_clone().unwrap()));
        (child, pty, before, screen)
    };

    let (mut child, pty, before, screen) = spawn();
    let mut master = std::fs::File::from(pty.master.try_clone().unwrap());
    master.write_all(b"stty size; echo $TERM\r").unwrap();
    let at = screen.wait_for("24 80", 0);
    screen.wait_for("vt100", at);
    // Raw while it runs: no echo, no line editing on our side.
    let raw = tcgetattr(&pty.slave).unwrap();
    assert!(!raw.local_flags.contains(LocalFlags::ICANON));
    assert!(!raw.local_flags.contains(LocalFlags::ECHO));
    // The kernel sends SIGWINCH to the terminal's foreground process group: moat.
    set_size(&pty.master, 100, 30);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut from = at;
    loop {
        master.write_all(b"stty size\r").unwrap();
        let end = screen.wait_for("\n", from);
        let text = screen.0.lock().unwrap().clone();
        if text[from..].contains("30 100") {
            break;
        }
        from = end;
        assert!(
            Instant::now() < deadline,
            "the resize never arrived: {text:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    master.write_all(b"exit 4\r").unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(4));
    let after = tcgetattr(&pty.slave).unwrap();
    assert_eq!(after.local_flags, before.local_flags);
    assert_eq!(after.input_flags, before.input_flags);
    assert_eq!(after.output_flags, before.output_flags);

    // SIGTERM ends it through the same path: the mode is restored, the exit is 128+15.
    let (mut child, pty, before, screen) = spawn();
    let mut master = std::fs::File::from(pty.master.try_clone().unwrap());
    master.write_all(b"echo re\"\"ady\r").unwrap();
    screen.wait_for("ready", 0);
    assert!(!tcgetattr(&pty.slave)
        .unwrap()
        .local_flags
        .contains(LocalFlags::ICANON));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(143));
    assert_eq!(
        tcgetattr(&pty.slave).unwrap().local_flags,
        before.local_flags
    );
}

/// A command that never reads its terminal while the client floods it with input still gets
/// all its output to the client and its exit back: input is queued (bounded) apart from the
/// output path, not written inline with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_flood_does_not_stall_output() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let id = setup(&d).await;
    // 6 MB of output (three times the protocol's flow-control window), after a pause in which
    // the input piles up unread.
    let ws = connect(
        &d,
        ADMIN,
        &id,
        "cols=80&rows=24&command=sleep%201%3B%20head%20-c%206000000%20%2Fdev%2Fzero%20%7C%20tr%20%27%5C0%27%20x",
    )
    .await
    .unwrap();
    let t = Instant::now();
    let (mut tx, mut rx) = ws.split();
    let flood = tokio::spawn(async move {
        let line = [b"y".repeat(63), b"\n".to_vec()].concat();
        let chunk: Vec<u8> = line.repeat(1024); // 64 KiB
        for _ in 0..128 {
            if tx
                .send(Message::Binary(chunk.clone().into()))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut xs = 0usize;
    let exit = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, rx.next())
            .await
            .unwrap_or_else(|_| panic!("stalled after {xs} bytes of output"));
        match m {
            Some(Ok(Message::Binary(b))) => xs += b.iter().filter(|&&c| c == b'x').count(),
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(&t).unwrap(),
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?} after {xs} bytes"),
        }
    };
    flood.abort();
    eprintln!(
        "shell: 6 MB of output in {:?} (1 s of it a sleep)",
        t.elapsed()
    );
    assert_eq!(exit["exit_code"], 0, "{exit}");
    assert_eq!(xs, 6_000_000);
}

async fn sandbox_count(d: &Daemon) -> usize {
    let (st, v) = d
        .call(Some(ADMIN), "GET", &format!("{G}/web/sandboxes"), None)
        .await;
    assert_eq!(st, 200, "{v}");
    v["sandboxes"].as_array().unwrap().len()
}

/// `moat run --group`: a sandbox made for the command, its output streamed, its exit code
/// returned, and the sandbox deleted after it, also after SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moat_run_through_the_daemon() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    setup(&d).await;
    assert_eq!(sandbox_count(&d).await, 1);
    let o = cli_with_stdin(
        &d,
        &[
            "run",
            "--group",
            "web",
            "-i",
            "-e",
            "A=b",
            "--",
            "sh",
            "-c",
            "echo $A; cat; exit 3",
        ],
        b"piped",
    );
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "b\npiped");
    assert_eq!(sandbox_count(&d).await, 1);

    let o = cli_with_stdin(&d, &["run", "--group", "web"], b"");
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("give the command"));

    let mut child = moat()
        .args([
            "run",
            "--group",
            "web",
            "--",
            "sh",
            "-c",
            "echo started; sleep 100",
        ])
        .env("MOAT_URL", d.url())
        .env("MOAT_API_KEY", ADMIN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "started\n");
    assert_eq!(sandbox_count(&d).await, 2);
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(143));
    // The daemon ends a streamed exec whose client left even while it is silent, so the delete
    // does not wait for `sleep 100`.
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(sandbox_count(&d).await, 1, "the run's sandbox is left");
}
