"""The sync client against a real daemon booting real VMs."""

from __future__ import annotations

import io
import os
import time
from typing import Iterator, List

import pytest
from conftest import eventually

import moat


@pytest.fixture(scope="module")
def sb(client: moat.Client, group: str) -> Iterator[moat.Sandbox]:
    """One sandbox for the module's smaller tests (a create is a restore: keep them few)."""
    with client.sandboxes.create(group, env={"FROM_SANDBOX": "sb"}, labels={"sdk": "sync"}) as s:
        yield s


def test_lifecycle_suspend_auto_resume_and_context_manager(client: moat.Client, group: str) -> None:
    with client.sandboxes.create(group, labels={"sdk": "lifecycle"}) as sb:
        assert sb.state == "running"
        assert sb.id.startswith("sb-") and sb.group == group
        assert sb.info.tier == "s"

        r = sb.exec("echo hi; echo oops >&2; exit 3")
        assert (r.exit_code, r.stdout, r.stderr, r.timed_out, r.ok) == (
            3,
            "hi\n",
            "oops\n",
            False,
            False,
        )

        data = os.urandom(100_000)
        written = sb.files.write("/root/data.bin", data)
        assert (written.path, written.size, written.created) == ("/root/data.bin", len(data), True)
        assert sb.files.read("/root/data.bin") == data
        names = {e.name: e for e in sb.files.list("/root")}
        assert names["data.bin"].kind == "file" and names["data.bin"].size == len(data)

        # A background process that counts; it must survive the suspend.
        p = sb.processes.start(
            "i=0; while true; do i=$((i+1)); echo $i > /run/count; sleep 0.1; done"
        )
        eventually(
            lambda: sb.exec("cat /run/count").stdout.strip() not in ("", "0"),
            "the counter to start",
        )

        assert sb.suspend().state == "suspended"
        assert sb.refresh().state == "suspended"

        # Any exec resumes the sandbox first, with its files and processes as they were.
        r = sb.exec(["sha256sum", "/root/data.bin"])
        assert r.exit_code == 0, r
        assert sb.refresh().state == "running"
        assert sb.files.read("/root/data.bin") == data
        running = {i.id: i for i in sb.processes.list()}
        assert running[p.id].running and running[p.id].exit is None
        before = int(sb.exec("cat /run/count").stdout)
        eventually(
            lambda: int(sb.exec("cat /run/count").stdout) > before,
            "the counter to move on after resume",
        )

        assert sb.suspend().state == "suspended"
        assert sb.resume().state == "running"
        assert sb.resume().state == "running"  # resuming a running sandbox is a no-op

        p.kill()
        end = p.wait(timeout=30)
        assert (end.exit_code, end.signal, end.timed_out) == (143, 15, False)
        sb_id = sb.id

    with pytest.raises(moat.NotFound):
        client.sandboxes.get(group, sb_id)


def test_exec_options(sb: moat.Sandbox) -> None:
    r = sb.exec(["sh", "-c", 'echo "$FROM_SANDBOX $FROM_EXEC"'], env={"FROM_EXEC": "x"})
    assert r.stdout == "sb x\n"
    assert sb.exec("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sb.exec(["id", "-u"], user="nobody").stdout == "65534\n"
    assert sb.exec(["cat"], stdin="from stdin\n").stdout == "from stdin\n"
    assert sb.exec(["cat"], stdin=b"bytes too").stdout == "bytes too"
    missing = sb.exec(["no-such-command"])
    assert missing.exit_code == 127 and "no-such-command" in missing.stderr
    t = time.monotonic()
    slow = sb.exec("sleep 30", timeout=0.5)
    assert (slow.timed_out, slow.exit_code) == (True, 124)
    assert time.monotonic() - t < 20


def test_bad_exec_input_is_a_bad_request(sb: moat.Sandbox) -> None:
    with pytest.raises(moat.BadRequest) as e:
        sb.exec("true", env={"1BAD": "x"})
    assert e.value.status == 400 and "invalid env key" in e.value.message
    with pytest.raises(moat.BadRequest) as e:
        sb.exec("true", cwd="relative")
    assert "absolute path" in e.value.message
    with pytest.raises(moat.BadRequest) as e:
        sb.exec("true", timeout=-1)
    assert "invalid timeout_s" in e.value.message


def test_exec_stream_yields_output_before_the_command_ends(sb: moat.Sandbox) -> None:
    # The command cannot end before /tmp/go exists, and only this test creates it, after it
    # has seen the first line: so that line was streamed while the command ran.
    script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second >&2; exit 7"
    events: List[moat.ExecEvent] = []
    with sb.exec_stream(script) as stream:
        for ev in stream:
            events.append(ev)
            if ev == moat.ExecOutput("stdout", "first\n"):
                sb.files.write("/tmp/go", b"")
    assert events == [
        moat.ExecOutput("stdout", "first\n"),
        moat.ExecOutput("stderr", "second\n"),
        moat.ExecExit(exit_code=7, signal=None, timed_out=False),
    ]
    assert stream.exit == moat.ExecExit(7)


def test_leaving_an_exec_stream_early_kills_the_command(sb: moat.Sandbox) -> None:
    # Silent after its first line: the daemon must notice the client leaving without a write.
    script = "echo $$ > /tmp/streamed.pid; echo started; exec sleep 1000"
    with sb.exec_stream(script) as stream:
        for ev in stream:
            assert ev == moat.ExecOutput("stdout", "started\n")
            break
    pid = sb.files.read("/tmp/streamed.pid").decode().strip()
    eventually(
        lambda: sb.exec(f"kill -0 {pid}").exit_code != 0, "the streamed command to be killed"
    )
    assert stream.exit is None


def test_files(sb: moat.Sandbox) -> None:
    assert sb.files.write(
        "/root/t/a/b.sh", "#!/bin/sh\necho ran\n", mode=0o755, parents=True
    ).created
    assert sb.exec("/root/t/a/b.sh").stdout == "ran\n"
    again = sb.files.write("/root/t/a/b.sh", b"#!/bin/sh\necho again\n")
    assert not again.created
    (entry,) = sb.files.list("/root/t/a")
    assert (entry.name, entry.kind, entry.mode) == ("b.sh", "file", "0755")  # the mode is kept
    big = os.urandom(3 * 1024 * 1024 + 5)
    assert sb.files.write("/root/t/big", io.BytesIO(big)).size == len(big)
    assert sb.files.read("/root/t/big") == big
    assert sb.files.write("/root/t/chunks", iter([b"a", b"bc", b""])).size == 3
    assert sb.files.read("/root/t/chunks") == b"abc"
    with pytest.raises(moat.Conflict):
        sb.files.remove("/root/t")  # not empty
    sb.files.remove("/root/t", recursive=True)
    with pytest.raises(moat.NotFound) as e:
        sb.files.read("/root/t/big")
    assert e.value.status == 404 and e.value.code == "not_found"
    with pytest.raises(moat.BadRequest) as bad:
        sb.files.read("relative/path")
    assert "absolute" in bad.value.message


def test_get_and_list_by_labels(client: moat.Client, group: str, sb: moat.Sandbox) -> None:
    got = client.sandboxes.get(group, sb.id)
    assert (
        got.id == sb.id
        and got.info.labels == {"sdk": "sync"}
        and got.info.env == {"FROM_SANDBOX": "sb"}
    )
    assert [s.id for s in client.sandboxes.list(group, labels={"sdk": "sync"})] == [sb.id]
    assert client.sandboxes.list(group, labels={"sdk": "none"}) == []
    assert sb.id in [s.id for s in client.sandboxes.list(group)]


def test_processes(sb: moat.Sandbox) -> None:
    p = sb.processes.start(["sh", "-c", "echo out; echo err >&2; exit 5"])
    assert p.id.startswith("p") and p.pid > 0
    end = p.wait(timeout=30)
    assert (end.exit_code, end.signal, end.timed_out) == (5, None, False)
    logs = p.logs()
    assert (logs.stdout, logs.stderr) == ("out\n", "err\n")
    (info,) = [i for i in sb.processes.list() if i.id == p.id]
    assert not info.running and info.exit == moat.ProcessExit(code=5, signal=None, timed_out=False)
    assert info.argv == ["sh", "-c", "echo out; echo err >&2; exit 5"]

    sleeper = sb.processes.start("sleep 1000")
    with pytest.raises(moat.Conflict) as still:
        sleeper.wait(timeout=0)
    assert "still running" in still.value.message
    sleeper.kill(9)
    assert sleeper.wait().signal == 9
    with pytest.raises(moat.NotFound):
        sb.processes.logs("p999999")


def test_groups_and_api_keys(client: moat.Client, group: str, sb: moat.Sandbox) -> None:
    g = client.groups.get(group)
    assert g.spec["tier"] == "s" and g.spec["labels"] == {"suite": "sdk"}
    assert g.spec["pool"] == {"size": 0}  # defaults filled in
    assert group in [x.name for x in client.groups.list()]
    # Applying the same spec again changes nothing.
    assert (
        client.groups.apply(group, {"tier": "s", "labels": {"suite": "sdk"}}).updated_at
        == g.updated_at
    )

    other = client.groups.apply("sdk-empty")
    assert other.spec["tier"] == "m"
    client.groups.delete("sdk-empty")
    with pytest.raises(moat.NotFound):
        client.groups.get("sdk-empty")
    with pytest.raises(moat.Conflict):
        client.groups.delete(group)  # it has sandboxes

    k = client.api_keys.create("sdk reader", "reader", [group])
    assert k.key.startswith("moat_") and k.key.startswith(k.prefix) and k.role == "reader"
    assert k.id in [x.id for x in client.api_keys.list()]
    with moat.Client(client.url, k.key) as reader:
        assert [x.name for x in reader.groups.list()] == [group]
    client.api_keys.delete(k.id)
    assert k.id not in [x.id for x in client.api_keys.list()]


def test_unix_socket(admin_key: str, group: str) -> None:
    sock = os.environ.get("MOAT_TEST_SOCKET")
    if not sock:
        if os.environ.get("MOAT_TEST_REQUIRE_DAEMON") == "1":
            pytest.fail("MOAT_TEST_SOCKET is not set")
        pytest.skip("MOAT_TEST_SOCKET (the daemon's moatd.sock) is not set")
    with moat.Client(f"unix://{sock}", admin_key) as c:
        assert c.health().status == "ok"
        assert c.groups.get(group).name == group
