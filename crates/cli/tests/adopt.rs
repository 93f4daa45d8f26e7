//! Detached sandboxes outlive their owner, even through `kill -9`, and the next owner adopts
//! them: real QEMU, the real agent and the base image's template.
//!
//! The owner is this test binary re-executed with `MOAT_ADOPT_OWNER=<id>` (the test
//! `owner_process`, which does nothing otherwise): it starts a detached sandbox, leaves a
//! process and a file in it, says READY and waits to be killed.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{base_template, counter, counter_passes, qemu_processes, runtime, sh, unique};
use moat_vm::{Error, LaunchOptions, Sandbox, SandboxRecord};

const OWNER_ENV: &str = "MOAT_ADOPT_OWNER";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

/// The owner (only when re-executed by the test below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_process() {
    let Ok(id) = std::env::var(OWNER_ENV) else {
        return;
    };
    let rt = runtime();
    let tpl = base_template(&rt).await;
    let sb = Sandbox::restore_with(
        &rt,
        &id,
        &tpl,
        LaunchOptions {
            detached: true,
            ..Default::default()
        },
    )
    .await
    .expect("restore detached");
    sh(&sb, "echo kept > /root/adopt-file").await;
    let out = sh(&sb, &format!("{} echo $!", common::COUNTER)).await;
    counter_passes(&sb, 0).await;
    println!("READY {} {}", sb.qemu_pid(), text(&out.stdout));
    std::io::stdout().flush().unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
    panic!("the owner was not killed");
}

/// SIGKILLs the QEMU of sandbox `.0` if it still runs (a failed test must not leak one).
struct KillOnDrop(String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in qemu_processes(&self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_sandbox_survives_kill_9_of_its_owner_and_is_adopted() {
    if std::env::var_os(OWNER_ENV).is_some() {
        return;
    }
    let rt = runtime();
    base_template(&rt).await;
    let id = unique("adopt");
    let mut owner = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "owner_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(OWNER_ENV, &id)
        .stdout(Stdio::piped())
        .spawn()
        .expect("re-executing the test binary");
    // Whatever happens below, no detached QEMU of this test outlives it.
    let _cleanup = KillOnDrop(id.clone());
    let stdout = owner.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A plain thread: a blocked read must not hold up the runtime's shutdown.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints "test owner_process ... " on the same line first.
            if let Some((_, rest)) = line.split_once("READY ") {
                let _ = tx.send(rest.to_string());
                return;
            }
        }
    });
    let ready = match tokio::time::timeout(Duration::from_secs(300), rx).await {
        Ok(Ok(ready)) => ready,
        other => {
            let _ = owner.kill();
            panic!("the owner did not get ready: {other:?}");
        }
    };
    let (qemu_pid, bg_pid) = ready.split_once(' ').unwrap();
    let qemu_pid: u32 = qemu_pid.parse().unwrap();

    // kill -9 of the owner: no destructor runs; the detached QEMU must live on.
    owner.kill().unwrap();
    owner.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        qemu_processes(&id),
        vec![qemu_pid],
        "QEMU died with its owner"
    );
    let run_dir = rt.run_root().join(&id);
    let rec = SandboxRecord::load(&run_dir).unwrap();
    assert_eq!((rec.pid, rec.id.as_str()), (qemu_pid, id.as_str()));
    assert!(rt.orphans().contains(&id), "{:?}", rt.orphans());

    // Garbage collection (a new runtime runs it) keeps the directory of a live orphan.
    let rt = runtime();
    rt.collect_garbage();
    assert!(
        run_dir.join("disk.qcow2").is_file(),
        "GC removed a live orphan"
    );

    let started = Instant::now();
    let sb = Sandbox::adopt(&rt, &id).await.expect("adopt");
    eprintln!("adopt: {} ms", started.elapsed().as_millis());
    assert_eq!(sb.qemu_pid(), qemu_pid);
    assert!(sb.is_detached());
    assert!(!rt.orphans().contains(&id));
    // Owned now: nobody else can adopt it, and GC leaves it alone.
    assert!(matches!(
        Sandbox::adopt(&rt, &id).await,
        Err(Error::Adopt(_))
    ));
    rt.collect_garbage();
    assert!(run_dir.is_dir());

    // The file, the process (same pid, still counting) and exec all work.
    assert_eq!(text(&sh(&sb, "cat /root/adopt-file").await.stdout), "kept");
    let alive = sh(&sb, &format!("kill -0 {bg_pid} && echo alive")).await;
    assert_eq!(text(&alive.stdout), "alive");
    let now = counter(&sb).await;
    counter_passes(&sb, now).await;
    assert_eq!(text(&sh(&sb, "echo $((6*7))").await.stdout), "42");

    // A graceful handover: detach, and adopt again (same process this time).
    sb.detach().unwrap();
    assert!(rt.orphans().contains(&id));
    let sb = Sandbox::adopt(&rt, &id).await.expect("adopt after detach");
    let now = counter(&sb).await;
    counter_passes(&sb, now).await;

    // A pid that is not this directory's QEMU is refused.
    assert!(matches!(
        moat_vm::Vm::adopt(&run_dir, std::process::id(), &rt.jail).await,
        Err(Error::Adopt(_))
    ));

    sb.destroy().await;
    assert!(qemu_processes(&id).is_empty(), "QEMU survived destroy");
    assert!(!run_dir.exists());
    assert!(!rt.orphans().contains(&id));
}
