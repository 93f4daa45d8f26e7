//! End-to-end tests of the `moat` binary: what a user types, what they see, the exit codes,
//! and that nothing is left behind.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{home, moat, qemu_processes};

fn run(args: &[&str]) -> std::process::Output {
    moat().arg("run").args(args).output().expect("moat runs")
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn run_streams_and_returns_exit_codes() {
    let o = run(&[
        "--",
        "sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2; exit 7",
    ]);
    assert_eq!(stdout(&o), "to-stdout\n");
    assert!(stderr(&o).contains("to-stderr\n"), "{}", stderr(&o));
    assert_eq!(o.status.code(), Some(7));

    let o = run(&["--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(o.status.code(), Some(128 + 15));

    let o = run(&["--", "definitely-not-a-command", "x"]);
    assert_eq!(o.status.code(), Some(127));
    assert!(
        stderr(&o).contains("definitely-not-a-command"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));

    let started = Instant::now();
    let o = run(&["--timeout", "1", "--", "sh", "-c", "sleep 100 & sleep 100"]);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// A template clone can be charged for the template's zero pages as well as its own memory;
/// its cgroup leaves room for that. Without it, a guest writing most of its RAM had its QEMU
/// OOM-killed ("the connection to the guest agent is gone").
#[test]
fn a_guest_writing_most_of_its_ram_is_not_oom_killed() {
    let o = run(&[
        "--tier",
        "s",
        "--",
        "python3",
        "-c",
        "b = b'x' * (820 << 20); print(len(b) >> 20)",
    ]);
    assert_eq!(stdout(&o), "820\n", "{}", stderr(&o));
}

/// `--no-jail` is the development switch, and loud: a warning at the start and the jail shown
/// off; without it (and without MOAT_NO_JAIL) the same run is jailed.
#[test]
fn no_jail_is_a_loud_development_switch() {
    let o = moat()
        .args(["-v", "--no-jail", "run", "--", "echo", "up"])
        .output()
        .unwrap();
    assert_eq!(stdout(&o), "up\n", "{}", stderr(&o));
    assert!(stderr(&o).contains("UNJAILED"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("off (MOAT_NO_JAIL=1)"),
        "{}",
        stderr(&o)
    );
    let o = moat()
        .args(["-v", "run", "--", "echo", "up"])
        .env_remove("MOAT_NO_JAIL")
        .output()
        .unwrap();
    assert_eq!(stdout(&o), "up\n", "{}", stderr(&o));
    assert!(stderr(&o).contains("on: uids"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("UNJAILED"), "{}", stderr(&o));
}

#[test]
fn run_env_workdir_user_stdin() {
    let o = run(&[
        "-e",
        "A=1",
        "-e",
        "B=two words",
        "-w",
        "/usr",
        "-u",
        "nobody",
        "--",
        "sh",
        "-c",
        "echo $A $B; pwd; id -un",
    ]);
    assert_eq!(stdout(&o), "1 two words\n/usr\nnobody\n", "{}", stderr(&o));
    assert_eq!(o.status.code(), Some(0));

    let mut child = moat()
        .args([
            "run",
            "-i",
            "--",
            "python3",
            "-c",
            "import sys; print(sys.stdin.read().upper())",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from the host")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(stdout(&o), "FROM THE HOST\n", "{}", stderr(&o));

    // The tier changes what the guest sees.
    let o = run(&[
        "--tier",
        "xs",
        "--",
        "sh",
        "-c",
        "df -k / | tail -1; grep MemTotal /proc/meminfo",
    ]);
    let out = stdout(&o);
    let disk_kb: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(disk_kb > 4 << 20, "xs root disk should be ~5 GiB: {out}");
    let mem_kb: u64 = out
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (400_000..=524_288).contains(&mem_kb),
        "xs memory should be ~512 MiB: {out}"
    );
}

#[test]
fn bad_input_gets_a_clear_error() {
    let cases: &[(&[&str], &str)] = &[
        (&["--tier", "huge", "--", "true"], "invalid tier"),
        (&["-e", "=x", "--", "true"], "invalid env"),
        (&["-w", "relative", "--", "true"], "absolute"),
        (&["--timeout", "-1", "--", "true"], "invalid timeout"),
        (&["no-such-image-xyz", "--", "true"], "no-such-image-xyz"),
    ];
    for (args, needle) in cases {
        let o = run(args);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
    let o = moat()
        .args(["image", "import", "ftp://nope"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(!stderr(&o).is_empty());
}

/// SIGTERM and SIGINT while a command runs: moat exits, QEMU is gone, the run directory too.
#[test]
fn signals_clean_up_everything() {
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let mut child = moat()
            .args(["run", "--", "sh", "-c", "echo ready; sleep 300"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ready\n");
        let needle = format!("run-{}-", child.id());
        assert_eq!(qemu_processes(&needle).len(), 1, "one QEMU while running");
        // SAFETY: plain kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code));
        assert!(
            qemu_processes(&needle).is_empty(),
            "QEMU left behind after signal {sig}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(home().join("run"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&needle))
            .collect();
        assert!(
            leftovers.is_empty(),
            "run directory left behind: {leftovers:?}"
        );
    }
}

#[test]
fn help_names_every_verb() {
    let o = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("--help")
        .output()
        .unwrap();
    let help = stdout(&o);
    for verb in ["setup", "image", "run"] {
        assert!(help.contains(verb), "{help}");
    }
}

#[test]
fn missing_qemu_says_how_to_install_it() {
    let o = moat()
        .env("PATH", "/nonexistent")
        .args(["run", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("apt-get install qemu-system-x86"),
        "{}",
        stderr(&o)
    );
}

/// A MOAT_HOME on a full filesystem: the import fails with "no space", and leaves nothing.
#[test]
fn a_full_disk_is_a_clear_error() {
    use moat_image::Compression;
    let small = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(small.path())
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a small tmpfs needs root");
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(small.path());

    let src = tempfile::tempdir().unwrap();
    let mut noise = vec![0u8; 8 << 20];
    let mut x = 0x9e3779b97f4a7c15u64;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let layer = moat_testkit::LayerBuilder::new()
        .file("big.bin", &noise, 0o644)
        .finish();
    moat_testkit::write_oci_layout(
        src.path(),
        &[layer],
        Compression::Gzip,
        &moat_testkit::test_config(),
        None,
    );
    let o = moat()
        .env("MOAT_HOME", small.path())
        .args(["image", "import", &format!("oci:{}", src.path().display())])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("no space"), "{}", stderr(&o));
    let o = moat()
        .env("MOAT_HOME", small.path())
        .args(["image", "ls", "--json"])
        .output()
        .unwrap();
    assert_eq!(stdout(&o).trim(), "[]");
}
