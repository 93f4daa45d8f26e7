//! End-to-end tests of the `moat sandbox …` client verbs against a real `moat serve` booting
//! real VMs: create, exec (streamed output, exit codes), cp both ways, suspend and auto-resume,
//! ls/show, rm, and errors.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{moat, Daemon, ADMIN};
use serde_json::{json, Value};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs the CLI and asserts it succeeded; returns its stdout.
fn ok(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(ADMIN, args);
    assert!(
        out.status.success(),
        "moat {args:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn json_of(d: &Daemon, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = ok(d, &a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("moat {a:?} --json: {e}: {out}"))
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_verbs_end_to_end() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("web", json!({"tier": "s"}), 201).await;

    // create: the id alone on stdout.
    let id = ok(
        &d,
        &[
            "sandbox",
            "create",
            "web",
            "-e",
            "GREETING=hi",
            "-l",
            "app=agent",
        ],
    )
    .trim()
    .to_string();
    assert!(id.starts_with("sb-") && id.len() == 15, "{id:?}");

    // exec: output on the right stream, the command's exit code, the sandbox's env.
    let out = d.cli(
        ADMIN,
        &[
            "sandbox",
            "exec",
            "web",
            &id,
            "-e",
            "EXTRA=x",
            "--",
            "sh",
            "-c",
            "echo $GREETING $EXTRA; echo oops >&2; exit 3",
        ],
    );
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi x\n");
    assert_eq!(text(&out.stderr), "oops\n");
    assert_eq!(
        ok(
            &d,
            &["sandbox", "exec", "web", &id, "-w", "/tmp", "-u", "0", "--", "pwd"]
        ),
        "/tmp\n"
    );
    let out = d.cli(
        ADMIN,
        &["sandbox", "exec", "web", &id, "--", "no-such-command"],
    );
    assert_eq!(code(&out), 127, "{}", text(&out.stderr));
    let out = d.cli(
        ADMIN,
        &[
            "sandbox",
            "exec",
            "web",
            &id,
            "--timeout",
            "1",
            "--",
            "sleep",
            "30",
        ],
    );
    assert_eq!(code(&out), 124, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("timed out"),
        "{}",
        text(&out.stderr)
    );
    let out = d.cli(
        ADMIN,
        &[
            "sandbox",
            "exec",
            "web",
            &id,
            "--",
            "sh",
            "-c",
            "kill -9 $$",
        ],
    );
    assert_eq!(code(&out), 137);

    // Streaming: the first line arrives while the command still runs.
    let mut child = moat()
        .args([
            "sandbox",
            "exec",
            "web",
            &id,
            "--",
            "sh",
            "-c",
            "echo first; sleep 4; echo second",
        ])
        .env("MOAT_URL", d.url())
        .env("MOAT_API_KEY", ADMIN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the first line took {:?}: output is not streamed",
        started.elapsed()
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the command still runs"
    );
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    assert!(child.wait().unwrap().success());

    // cp both ways, 3 MiB (larger than any single chunk), content equal, mode kept.
    let tmp = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let src = tmp.path().join("data.bin");
    std::fs::write(&src, &data).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();
    }
    let remote = format!("web/{id}:/root/");
    let up = ok(&d, &["sandbox", "cp", src.to_str().unwrap(), &remote]);
    assert!(up.contains(&format!("{} bytes", data.len())), "{up}");
    assert_eq!(
        ok(
            &d,
            &[
                "sandbox",
                "exec",
                "web",
                &id,
                "--",
                "sh",
                "-c",
                "wc -c < /root/data.bin; stat -c %a /root/data.bin"
            ]
        ),
        format!("{}\n750\n", data.len())
    );
    let back = tmp.path().join("back.bin");
    let remote_file = format!("web/{id}:/root/data.bin");
    ok(&d, &["sandbox", "cp", &remote_file, back.to_str().unwrap()]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "downloaded content differs"
    );
    // A directory as the destination gets the file's name; "-" is stdout.
    ok(
        &d,
        &[
            "sandbox",
            "cp",
            &remote_file,
            tmp.path().join("").to_str().unwrap(),
        ],
    );
    let out = d.cli(
        ADMIN,
        &["sandbox", "cp", &format!("web/{id}:/etc/hostname"), "-"],
    );
    assert!(out.status.success() && !out.stdout.is_empty());
    // A missing remote file is the daemon's 404, and leaves no partial file.
    let out = d.cli(
        ADMIN,
        &[
            "sandbox",
            "cp",
            &format!("web/{id}:/nope"),
            tmp.path().join("nope").to_str().unwrap(),
        ],
    );
    assert_eq!(code(&out), 125, "{}", text(&out.stderr));
    assert!(!tmp.path().join("nope").exists());

    // suspend, then an exec resumes it transparently (and the file is still there).
    assert_eq!(
        ok(&d, &["sandbox", "suspend", "web", &id]).trim(),
        format!("sandbox {id} suspended")
    );
    assert_eq!(
        json_of(&d, &["sandbox", "show", "web", &id])["state"],
        "suspended"
    );
    assert_eq!(
        ok(
            &d,
            &[
                "sandbox",
                "exec",
                "web",
                &id,
                "--",
                "wc",
                "-c",
                "/root/data.bin"
            ]
        ),
        format!("{} /root/data.bin\n", data.len())
    );
    let sb = json_of(&d, &["sandbox", "show", "web", &id]);
    assert_eq!(sb["state"], "running");
    assert_eq!(sb["env"]["GREETING"], "hi");
    assert_eq!(sb["labels"]["app"], "agent");
    assert_eq!(
        json_of(&d, &["sandbox", "resume", "web", &id])["state"],
        "running"
    );

    // ls and show: tables for people, JSON for scripts, label selectors.
    let table = ok(&d, &["sandbox", "ls", "web"]);
    let mut rows = table.lines();
    let header: Vec<&str> = rows.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["ID", "STATE", "IMAGE", "TIER", "CREATED"]);
    let row: Vec<&str> = rows.next().unwrap().split_whitespace().collect();
    assert_eq!((row[0], row[1], row[3]), (id.as_str(), "running", "s"));
    let shown = ok(&d, &["sandbox", "show", "web", &id]);
    assert!(
        shown.contains("state:    running") && shown.contains("GREETING=hi"),
        "{shown}"
    );
    let listed = json_of(&d, &["sandbox", "ls", "web", "-l", "app=agent"]);
    assert_eq!(listed["sandboxes"][0]["id"], id.as_str());
    let listed = json_of(&d, &["sandbox", "ls", "web", "-l", "app=other"]);
    assert_eq!(listed["sandboxes"], json!([]));

    // rm.
    assert_eq!(
        ok(&d, &["sandbox", "rm", "web", &id]).trim(),
        format!("sandbox {id} deleted")
    );
    assert_eq!(
        json_of(&d, &["sandbox", "ls", "web"])["sandboxes"],
        json!([])
    );
    let out = d.cli(ADMIN, &["sandbox", "show", "web", &id]);
    assert_eq!(code(&out), 125);
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_verbs_report_errors() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    // A group that does not exist: the daemon's message, exit 125.
    for args in [
        &["sandbox", "create", "nope"][..],
        &["sandbox", "ls", "nope"],
        &["sandbox", "exec", "nope", "sb-000000000000", "--", "true"],
    ] {
        let out = d.cli(ADMIN, args);
        assert_eq!(code(&out), 125, "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.starts_with("moat: ") && err.contains("(HTTP 404)"),
            "{args:?}: {err}"
        );
    }
    // Bad arguments are refused before any request, with the same messages as `moat run`.
    for (args, want) in [
        (
            &["sandbox", "exec", "web", "sb-1", "-e", "1A=x", "--", "true"][..],
            "KEY must be",
        ),
        (
            &["sandbox", "exec", "web", "sb-1", "-w", "rel", "--", "true"],
            "absolute",
        ),
        (
            &[
                "sandbox",
                "exec",
                "web",
                "sb-1",
                "--timeout",
                "0",
                "--",
                "true",
            ],
            "invalid timeout",
        ),
        (
            &["sandbox", "create", "web", "--tier", "huge"],
            "invalid tier",
        ),
        (&["sandbox", "create", "web", "-l", "novalue"], "KEY=VALUE"),
        (&["sandbox", "cp", "a", "b"], "GROUP/ID:/PATH"),
    ] {
        let out = d.cli(ADMIN, args);
        assert_eq!(code(&out), 125, "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // No command: clap's usage error, also 125.
    let out = d.cli(ADMIN, &["sandbox", "exec", "web", "sb-1"]);
    assert_eq!(code(&out), 125);
}
