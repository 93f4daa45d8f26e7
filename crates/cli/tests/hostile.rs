//! A hostile (or merely careless) guest, end to end with real VMs: a fork bomb and a memory
//! hog in one sandbox leave its agent answering within a bound, end with their timeout or the
//! OOM killer, leave the sandbox usable and deletable, and do not slow its neighbour down; and
//! the processes around the guest on the host (QEMU, the network stack) are jailed.

mod common;

use std::time::{Duration, Instant};

use common::{children, images, req, runtime, unique};
use moat_vm::{template, Sandbox, Tier};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A sandbox of tier xs (a quarter CPU, 512 MiB: where the fork bomb hurt).
async fn xs_sandbox(rt: &moat_vm::Runtime) -> Sandbox {
    let image = images()
        .resolve("base")
        .expect("base image: run `moat setup`");
    let t = template::ensure(rt, &image.digest, &image.rootfs, Tier::Xs)
        .await
        .expect("template");
    Sandbox::restore(rt, &unique("hostile"), &t.dir)
        .await
        .expect("restore")
}

/// Runs `script` with `timeout`, returning its output and how long it took.
async fn timed(
    sb: &Sandbox,
    script: &str,
    timeout: Option<Duration>,
) -> (moat_vm::agent::Output, Duration) {
    let mut r = req(&["sh", "-c", script]);
    r.timeout_ms = timeout.map(|t| t.as_millis() as u64);
    let started = Instant::now();
    let out = sb.agent().exec_output(r, 1 << 20).await.expect("exec");
    (out, started.elapsed())
}

/// The bound on a trivial exec's answer while the guest is under attack (under TCG at a
/// quarter CPU a quiet `echo` answers in well under a second).
const ANSWER_BOUND: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_and_memory_hog_leave_the_agent_answering() {
    let rt = runtime();
    let sb = xs_sandbox(&rt).await;
    let neighbour = xs_sandbox(&rt).await;

    // The fork bomb of the issue, with a timeout. While it runs, the agent still answers
    // (here and in the neighbour), and the timeout ends the whole tree.
    let bomb = {
        let mut r = req(&["sh", "-c", "f(){ f|f & }; f; sleep 60"]);
        r.timeout_ms = Some(15_000);
        sb.agent().exec_output(r, 1 << 20)
    };
    let probe = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (out, took) = timed(&sb, "echo alive", None).await;
        assert_eq!(text(&out.stdout), "alive\n");
        let (nout, ntook) = timed(&neighbour, "echo fine", None).await;
        assert_eq!(text(&nout.stdout), "fine\n");
        (took, ntook)
    };
    let started = Instant::now();
    let (bomb, (took, ntook)) = tokio::join!(bomb, probe);
    let bomb = bomb.expect("the fork bomb's exec answers");
    eprintln!(
        "fork bomb: ended after {:?} (timed out: {}); exec during it {took:?}, neighbour {ntook:?}",
        started.elapsed(),
        bomb.status.timed_out
    );
    assert!(bomb.status.timed_out, "{:?}", bomb.status);
    assert!(
        started.elapsed() < Duration::from_secs(15 + 30),
        "the timeout did not end the bomb"
    );
    assert!(
        took < ANSWER_BOUND,
        "exec during the fork bomb took {took:?}"
    );
    assert!(ntook < ANSWER_BOUND, "the neighbour's exec took {ntook:?}");
    // The kill is asynchronous (thousands of tasks die at a quarter CPU): within a bound,
    // nothing of the bomb is left, and new processes start.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (out, took) = timed(
            &sb,
            "ls -d /sys/fs/cgroup/moat-exec/*/ | wc -l; cat /sys/fs/cgroup/moat-exec/pids.current",
            None,
        )
        .await;
        assert!(
            took < ANSWER_BOUND,
            "exec after the fork bomb took {took:?}"
        );
        let lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
        let pids: u32 = lines[1].parse().unwrap();
        if lines[0] == "1" && pids < 10 {
            break;
        }
        assert!(Instant::now() < deadline, "the bomb lingers: {lines:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A memory hog: killed by the OOM killer inside the execs' cgroup, not the agent.
    let (out, took) = timed(
        &sb,
        "python3 -c 'b=[]\nwhile True: b.append(bytearray(16<<20))'; echo exit=$?",
        Some(Duration::from_secs(60)),
    )
    .await;
    eprintln!("memory hog: {took:?}, {}", text(&out.stdout).trim());
    assert!(
        !out.status.timed_out,
        "the hog was not stopped by the memory limit"
    );
    assert_eq!(
        text(&out.stdout).trim(),
        "exit=137",
        "stderr: {}",
        text(&out.stderr)
    );
    let (out, took) = timed(&sb, "echo alive", None).await;
    assert_eq!(text(&out.stdout), "alive\n");
    assert!(
        took < ANSWER_BOUND,
        "exec after the memory hog took {took:?}"
    );

    // And the sandbox goes away cleanly: its QEMU, its network stack and its cgroup.
    let pid = sb.qemu_pid();
    let cgroups = jail_cgroups(pid);
    sb.destroy().await;
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU survived"
    );
    for cg in cgroups {
        assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    }
    neighbour.destroy().await;
}

/// The directories of the jail cgroups `pid` is in.
fn jail_cgroups(pid: u32) -> Vec<std::path::PathBuf> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    own.lines()
        .filter(|l| l.contains("/moat/jail-"))
        .map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, names, path) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
            let mount = if names.is_empty() {
                std::path::PathBuf::from("/sys/fs/cgroup")
            } else {
                std::path::Path::new("/sys/fs/cgroup").join(names.split(',').next().unwrap())
            };
            mount.join(path.trim_start_matches('/'))
        })
        .collect()
}

/// A `/proc/<pid>/status` field.
fn status_field(pid: u32, field: &str) -> String {
    moat_vm::qemu::status_field(pid, field)
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A sandbox's QEMU and network stack, read from the host: unprivileged uids of their own
/// (not shared with each other), no capabilities, `no_new_privs`, seccomp, namespaces of
/// their own (QEMU's network namespace too; the stack keeps the host's, which it reaches),
/// both in the sandbox's cgroup; and the sandbox works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_and_network_stack_are_jailed() {
    let rt = runtime();
    let sb = common::sandbox(&rt).await;
    let me = std::process::id();
    let qemu = sb.qemu_pid();
    // This sandbox's own stack: the other test of this file runs sandboxes beside it, so
    // "a child that is a net-stack" may be theirs.
    let stack = sb
        .host_pids()
        .into_iter()
        .find(|&pid| pid != qemu)
        .expect("the sandbox has a network stack");
    assert!(
        children(me)
            .iter()
            .any(|(pid, cmd)| *pid == stack && cmd.contains(" net-stack ")),
        "the network stack {stack} is our child"
    );
    let mut uids = Vec::new();
    for (pid, own_net) in [(qemu, true), (stack, false)] {
        let uid = status_field(pid, "Uid");
        let first = uid.split_whitespace().next().unwrap().to_string();
        assert!(
            uid.split_whitespace().all(|u| u == first && u != "0"),
            "Uid: {uid}"
        );
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(
                status_field(pid, caps),
                "0000000000000000",
                "{caps} of {pid}"
            );
        }
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(status_field(pid, "Seccomp"), "2");
        for ns in ["mnt", "pid", "ipc", "uts", "net"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            let ours = std::fs::read_link(format!("/proc/{me}/ns/{ns}")).unwrap();
            if ns == "net" && !own_net {
                assert_eq!(theirs, ours, "the stack left the host's network");
            } else {
                assert_ne!(theirs, ours, "{pid} shares our {ns} namespace");
            }
        }
        assert!(!jail_cgroups(pid).is_empty(), "{pid} is in no jail cgroup");
        uids.push(first);
    }
    assert_ne!(uids[0], uids[1], "QEMU and the stack share a uid");
    assert_eq!(
        jail_cgroups(qemu),
        jail_cgroups(stack),
        "not the sandbox's one cgroup"
    );
    let out = common::sh(&sb, "echo jailed").await;
    assert_eq!(text(&out.stdout), "jailed\n");
    sb.destroy().await;
}
