"""moat's MCP server driven by the official MCP Python SDK (`mcp` on PyPI) against a real
daemon: `moat mcp` over stdio and the daemon's `/mcp` over streamable HTTP.

Run by crates/cli/tests/mcp.rs with MOAT_URL, MOAT_API_KEY (an admin key), MOAT_BIN (the
moat binary) and MOAT_TEST_GROUP set.
"""

import base64
import json
import os
import time
import urllib.error
import urllib.request

import httpx2
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

URL = os.environ["MOAT_URL"]
KEY = os.environ["MOAT_API_KEY"]
GROUP = os.environ["MOAT_TEST_GROUP"]

TOOLS = {
    "create_sandbox", "list_sandboxes", "run_code", "exec", "read_file", "write_file",
    "list_files", "start_process", "process_logs", "snapshot_sandbox", "fork_sandbox",
    "suspend_sandbox", "delete_sandbox", "expose_port", "egress_log", "check_policy",
    "policy_decisions",
}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def rest(method, path, body=None, key=KEY):
    """The daemon's REST API: (status, JSON or None)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, (json.loads(raw) if raw else None)


@pytest.fixture(scope="module", autouse=True)
def group():
    status, _ = rest("PUT", f"/v1/sandbox-groups/{GROUP}", {"tier": "s"})
    assert status in (200, 201)
    yield GROUP
    rest("DELETE", f"/v1/sandbox-groups/{GROUP}?force=true")


def sandbox_path(sid, group=GROUP):
    return f"/v1/sandbox-groups/{group}/sandboxes/{sid}"


def wait_gone(sid, limit=60):
    """The session's end deletes its sandboxes; over HTTP that happens in the background."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if rest("GET", sandbox_path(sid))[0] == 404:
            return
        time.sleep(0.2)
    raise AssertionError(f"sandbox {sid} still exists {limit} s after its session ended")


async def call(session, name, args=None):
    """A tool call that must succeed; its structured result."""
    r = await session.call_tool(name, args or {})
    assert not r.is_error, f"{name} failed: {r.content}"
    return r.structured_content


async def call_error(session, name, args=None):
    """A tool call that must fail; the message the model sees."""
    r = await session.call_tool(name, args or {})
    assert r.is_error, f"{name} should have failed: {r.structured_content}"
    return " ".join(c.text for c in r.content)


def http_client(key=KEY):
    return httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=300)


@pytest.mark.anyio
async def test_stdio_session_runs_code_moves_files_and_deletes_its_sandbox():
    params = StdioServerParameters(
        command=os.environ["MOAT_BIN"],
        args=["mcp", "--group", GROUP],
        env={"MOAT_URL": URL, "MOAT_API_KEY": KEY},
    )
    async with stdio_client(params) as (r, w):
        async with ClientSession(r, w) as s:
            init = await s.initialize()
            assert init.server_info.name == "moat"
            tools = {t.name: t for t in (await s.list_tools()).tools}
            assert set(tools) == TOOLS
            schema = tools["run_code"].input_schema
            assert set(schema["required"]) == {"language", "code"}
            assert "sandbox" in schema["properties"] and "timeout_s" in schema["properties"]
            assert all(t.description for t in tools.values())

            # The first call creates the session's sandbox in the default group.
            out = await call(s, "run_code", {"language": "python", "code":
                "import sys\nopen('out.txt', 'w').write('hi')\nprint(6 * 7)\n"
                "print('warn', file=sys.stderr)\nsys.exit(3)"})
            assert (out["exit_code"], out["stdout"], out["stderr"]) == (3, "42\n", "warn\n")
            assert out["files_produced"] == [{"path": "/workspace/out.txt", "size": 2}]
            sid = out["sandbox"]
            status, sb = rest("GET", sandbox_path(sid))
            assert status == 200 and sb["labels"]["created-by"] == "moat-mcp"

            # Unchanged files are not reported again; shell runs in /workspace too.
            out = await call(s, "run_code", {"language": "shell", "code": "pwd; echo x > b.txt"})
            assert out["stdout"] == "/workspace\n"
            assert [f["path"] for f in out["files_produced"]] == ["/workspace/b.txt"]

            out = await call(s, "exec", {"argv": ["sh", "-c", "cat; exit 5"], "stdin": "in"})
            assert (out["exit_code"], out["stdout"]) == (5, "in")
            out = await call(s, "exec", {"command": "sleep 5", "timeout_s": 0.5})
            assert out["timed_out"] is True and out["exit_code"] == 124
            msg = await call_error(s, "exec", {})
            assert "exactly one of `command`" in msg
            msg = await call_error(s, "exec", {"command": "true", "timeout_s": 99999})
            assert "at most 3600" in msg

            # Files: text and binary both ways, listing, the daemon's errors as tool errors.
            await call(s, "write_file", {"path": "/root/d/a.txt", "content": "héllo\n"})
            r = await s.call_tool("read_file", {"path": "/root/d/a.txt"})
            assert r.content[0].text == "héllo\n" and r.structured_content["encoding"] == "utf8"
            blob = bytes(range(256))
            await call(s, "write_file", {"path": "/root/d/b.bin", "encoding": "base64",
                                         "content": base64.b64encode(blob).decode(),
                                         "mode": "0600"})
            got = await call(s, "read_file", {"path": "/root/d/b.bin"})
            assert got["encoding"] == "base64" and base64.b64decode(got["content"]) == blob
            listing = await call(s, "list_files", {"path": "/root/d"})
            entries = {e["name"]: e for e in listing["entries"]}
            assert entries["b.bin"]["mode"] == "0600" and entries["a.txt"]["size"] == 7
            msg = await call_error(s, "read_file", {"path": "/root/nope"})
            assert "404" in msg
            msg = await call_error(s, "read_file", {"path": "relative"})
            assert "absolute" in msg
            # Arguments never steer the REST path elsewhere.
            msg = await call_error(s, "exec", {"command": "true", "sandbox": "../../api-keys"})
            assert "invalid sandbox id" in msg

            # A background process and its logs.
            p = await call(s, "start_process", {"command": "echo started; sleep 0.3; echo done >&2"})
            deadline = time.monotonic() + 30
            while True:
                logs = await call(s, "process_logs", {"process_id": p["id"]})
                if logs["running"] is False:
                    break
                assert time.monotonic() < deadline, logs
                time.sleep(0.2)
            assert (logs["stdout"], logs["stderr"]) == ("started\n", "done\n")
            assert logs["exit"]["code"] == 0

            # Resources: the session's sandbox, its state and its files.
            res = (await s.list_resources()).resources
            assert [str(x.uri) for x in res] == [f"moat://sandbox/{GROUP}/{sid}"]
            templates = (await s.list_resource_templates()).resource_templates
            assert len(templates) == 2
            state = await s.read_resource(f"moat://sandbox/{GROUP}/{sid}")
            assert json.loads(state.contents[0].text)["state"] == "running"
            f = await s.read_resource(f"moat://sandbox/{GROUP}/{sid}/files/workspace/out.txt")
            assert f.contents[0].text == "hi"
            d = await s.read_resource(f"moat://sandbox/{GROUP}/{sid}/files/root/d")
            assert {e["name"] for e in json.loads(d.contents[0].text)["entries"]} == {"a.txt", "b.bin"}
            assert rest("GET", sandbox_path(sid))[0] == 200
    # Closing stdin ended the session: `moat mcp` deleted its sandbox before exiting.
    assert rest("GET", sandbox_path(sid))[0] == 404


@pytest.mark.anyio
async def test_http_session_snapshot_fork_suspend_and_keep():
    async with http_client() as hc:
        async with streamable_http_client(f"{URL}/mcp", http_client=hc) as (r, w, *_):
            async with ClientSession(r, w) as s:
                await s.initialize()
                # No default group over HTTP without ?group=: the model is told what to do.
                msg = await call_error(s, "exec", {"command": "true"})
                assert "create_sandbox" in msg

                first = await call(s, "create_sandbox", {"group": GROUP, "tier": "s"})
                kept = await call(s, "create_sandbox", {"group": GROUP, "keep": True,
                                                        "env": {"MODE": "kept"}})
                # The newest is current; `sandbox` picks another.
                out = await call(s, "exec", {"command": "echo $MODE"})
                assert out["stdout"] == "kept\n"
                await call(s, "exec", {"command": "echo one > /root/f", "sandbox": first["id"]})
                snap = await call(s, "snapshot_sandbox", {"name": "mcp-snap", "sandbox": first["id"]})
                assert snap["name"] == "mcp-snap"
                forks = await call(s, "fork_sandbox", {"snapshot": "mcp-snap", "count": 2})
                fork_ids = [f["id"] for f in forks["sandboxes"]]
                assert len(fork_ids) == 2
                for fid in fork_ids:
                    out = await call(s, "exec", {"command": "cat /root/f", "sandbox": fid})
                    assert out["stdout"] == "one\n"

                sus = await call(s, "suspend_sandbox", {"sandbox": first["id"]})
                assert sus["state"] == "suspended"
                out = await call(s, "exec", {"command": "cat /root/f", "sandbox": first["id"]})
                assert out["stdout"] == "one\n"  # resumed by the exec
                assert rest("GET", sandbox_path(first["id"]))[1]["state"] == "running"

                gone = await call(s, "delete_sandbox", {"sandbox": fork_ids[0]})
                assert gone["deleted"] == fork_ids[0]
                assert rest("GET", sandbox_path(fork_ids[0]))[0] == 404
                listed = await call(s, "list_sandboxes")
                assert {x["id"] for x in listed["sandboxes"]} == {first["id"], kept["id"], fork_ids[1]}
                assert rest("GET", sandbox_path(first["id"]))[0] == 200
    # The client sent DELETE /mcp: the session's sandboxes go, except the kept one.
    wait_gone(first["id"])
    wait_gone(fork_ids[1])
    assert rest("GET", sandbox_path(kept["id"]))[0] == 200
    assert rest("DELETE", sandbox_path(kept["id"]))[0] == 204
    assert rest("DELETE", f"/v1/sandbox-groups/{GROUP}/snapshots/mcp-snap")[0] == 204


@pytest.mark.anyio
async def test_http_default_group_from_the_url():
    async with http_client() as hc:
        async with streamable_http_client(f"{URL}/mcp?group={GROUP}", http_client=hc) as (r, w, *_):
            async with ClientSession(r, w) as s:
                await s.initialize()
                out = await call(s, "run_code", {"language": "shell", "code": "hostname"})
                sid = out["sandbox"]
                assert out["stdout"].strip() == sid
    wait_gone(sid)


def test_http_needs_a_valid_api_key():
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"}}}).encode()
    for headers in ({}, {"Authorization": "Bearer moat_" + "x" * 43}, {"Authorization": "Basic x"}):
        req = urllib.request.Request(URL + "/mcp", data=body, method="POST", headers={
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream", **headers})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 401
        assert json.loads(e.value.read())["error"]["code"] == "unauthorized"


@pytest.mark.anyio
async def test_roles_apply_and_a_session_is_bound_to_its_key():
    status, reader = rest("POST", "/v1/api-keys", {"name": "mcp-reader", "role": "reader",
                                                    "groups": [GROUP]})
    assert status == 201
    try:
        async with http_client(reader["key"]) as hc:
            async with streamable_http_client(f"{URL}/mcp", http_client=hc) as (r, w, *_):
                async with ClientSession(r, w) as s:
                    await s.initialize()
                    # The REST API's roles hold: a reader cannot create a sandbox.
                    msg = await call_error(s, "create_sandbox", {"group": GROUP})
                    assert "403" in msg

        # A session opened with one key refuses calls made with another.
        async with httpx2.AsyncClient(timeout=60) as hc:
            accept = {"Accept": "application/json, text/event-stream",
                      "Content-Type": "application/json"}
            init = await hc.post(f"{URL}/mcp", headers={**accept, "Authorization": f"Bearer {KEY}"},
                                 json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                                     "protocolVersion": "2025-06-18", "capabilities": {},
                                     "clientInfo": {"name": "t", "version": "0"}}})
            assert init.status_code == 200, init.text
            sid = init.headers["mcp-session-id"]
            common = {**accept, "mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}
            await hc.post(f"{URL}/mcp", headers={**common, "Authorization": f"Bearer {KEY}"},
                          json={"jsonrpc": "2.0", "method": "notifications/initialized"})
            other = await hc.post(f"{URL}/mcp", headers={**common, "Authorization": f"Bearer {reader['key']}"},
                                  json={"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
                                      "name": "list_sandboxes", "arguments": {}}})
            assert "another API key" in other.text, other.text
            same = await hc.post(f"{URL}/mcp", headers={**common, "Authorization": f"Bearer {KEY}"},
                                 json={"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
                                     "name": "list_sandboxes", "arguments": {}}})
            assert '"sandboxes"' in same.text, same.text
            await hc.delete(f"{URL}/mcp", headers={**common, "Authorization": f"Bearer {KEY}"})
    finally:
        rest("DELETE", f"/v1/api-keys/{reader['id']}")


@pytest.mark.anyio
async def test_http_policy_egress_and_port_tools():
    gov = f"{GROUP}-gov"
    assert rest("PUT", f"/v1/sandbox-groups/{gov}", {"tier": "s"})[0] in (200, 201)
    status, _ = rest("PUT", f"/v1/sandbox-groups/{gov}/policy",
                     {"mode": "enforce", "commands": {"deny": ["curl"]}})
    assert status == 201
    try:
        async with http_client() as hc:
            async with streamable_http_client(f"{URL}/mcp?group={gov}", http_client=hc) as (r, w, *_):
                async with ClientSession(r, w) as s:
                    await s.initialize()
                    tools = {t.name for t in (await s.list_tools()).tools}
                    assert {"egress_log", "check_policy", "policy_decisions", "expose_port"} <= tools

                    # The dry run: refused with the rule, allowed, and a clear bad-argument error.
                    out = await call(s, "check_policy", {"command": "ls | curl x"})
                    assert out["allowed"] is False and out["mode"] == "enforce"
                    assert [f["rule"] for f in out["findings"]] == ["command.denied"]
                    out = await call(s, "check_policy", {"language": "python", "code": "print(1)"})
                    assert out["allowed"] is True
                    msg = await call_error(s, "check_policy", {"code": "print(1)"})
                    assert "exactly one of `code`" in msg

                    # A refused exec shows up in the decisions log.
                    msg = await call_error(s, "exec", {"command": "curl -s x"})
                    assert "policy_denied" in msg
                    out = await call(s, "policy_decisions", {"verdict": "deny"})
                    assert any("curl" in (d["request"].get("command") or "") for d in out["items"]), out
                    msg = await call_error(s, "policy_decisions", {"verdict": "maybe"})
                    assert "verdict" in msg

                    # A DNS lookup the group does not allow is in the egress log, denied.
                    await call(s, "run_code", {"language": "python", "code":
                        "import socket\ntry:\n    socket.getaddrinfo('blocked.example', 80)\n"
                        "except OSError as e:\n    print('refused', e)"})
                    deadline = time.monotonic() + 30
                    while True:
                        out = await call(s, "egress_log", {"verdict": "deny"})
                        if any(e["name"] == "blocked.example" and e["kind"] == "dns" for e in out["items"]):
                            break
                        assert time.monotonic() < deadline, out
                        time.sleep(0.3)

                    # A server in the sandbox, reachable through the daemon with the same key.
                    await call(s, "write_file", {"path": "/workspace/index.html", "content": "served by the sandbox"})
                    await call(s, "start_process", {"command": "cd /workspace && exec python3 -m http.server 8000"})
                    port = await call(s, "expose_port", {"port": 8000})
                    assert port["port"] == 8000 and port["url"].endswith("/ports/8000/")
                    deadline = time.monotonic() + 60
                    while True:
                        got = await hc.get(URL + port["url"] + "index.html")
                        if got.status_code == 200:
                            break
                        assert got.status_code == 502 and time.monotonic() < deadline, got.text
                        time.sleep(0.3)
                    assert got.text == "served by the sandbox"
                    msg = await call_error(s, "expose_port", {"port": 8000})
                    assert "409" in msg
    finally:
        rest("DELETE", f"/v1/sandbox-groups/{gov}?force=true")
