"""Tests that need no daemon: URL and argument handling, error mapping, stream parsing (the
last against a small local HTTP server that answers what a daemon or a proxy might)."""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import socket
import threading
from typing import Iterator, List, Tuple

import pytest

import moat
from moat import _base as b
from moat._errors import error_from_frame, error_from_response


def test_endpoint_defaults_and_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOAT_URL", raising=False)
    assert b.endpoint(None).base_url == "http://127.0.0.1:7070"
    monkeypatch.setenv("MOAT_URL", "http://10.0.0.1:9000/")
    assert b.endpoint(None).base_url == "http://10.0.0.1:9000"
    assert b.endpoint("https://moat.example").base_url == "https://moat.example"
    uds = b.endpoint("unix:///root/.moat/moatd.sock")
    assert (uds.uds, uds.base_url) == ("/root/.moat/moatd.sock", "http://moatd")
    with pytest.raises(ValueError, match="absolute path"):
        b.endpoint("unix://moatd.sock")
    with pytest.raises(ValueError, match="expected http://HOST:PORT"):
        b.endpoint("127.0.0.1:7070")


def test_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOAT_API_KEY", "moat_fromenv")
    assert b.headers(None)["Authorization"] == "Bearer moat_fromenv"
    assert b.headers("moat_given")["Authorization"] == "Bearer moat_given"
    monkeypatch.delenv("MOAT_API_KEY")
    assert "Authorization" not in b.headers(None)


def test_command_bodies() -> None:
    assert b.exec_body("echo hi", None, None, None, None, None) == {"command": "echo hi"}
    assert b.exec_body(("ls", "-l"), {"A": "1"}, "/tmp", 0, b"in", 2) == {
        "argv": ["ls", "-l"],
        "env": {"A": "1"},
        "cwd": "/tmp",
        "user": "0",
        "stdin": "in",
        "timeout_s": 2.0,
    }
    with pytest.raises(TypeError):
        b.exec_body(b"echo", None, None, None, None, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        b.exec_body(["echo", 1], None, None, None, None, None)  # type: ignore[list-item]


def test_identity_requests() -> None:
    op = b.identity_token("web", "sb-000000000001", "sts.amazonaws.com", None)
    assert (op.method, op.path) == (
        "POST",
        "/v1/sandbox-groups/web/sandboxes/sb-000000000001/identity/token",
    )
    assert op.json == {"audience": "sts.amazonaws.com"}
    assert b.identity_token("web", "sb-1", "a", 60).json == {"audience": "a", "ttl_s": 60}
    ev = b.identity_events("web", None, 3, None)
    assert ev.path == "/v1/sandbox-groups/web/identity/events"
    assert json.dumps(ev.params) == '{"after": 3}'
    assert b.identity_events("web", None, None, None).params is None


def test_label_selector() -> None:
    assert b.labels_param({"a": "1", "b": ""}) == "a=1,b="
    with pytest.raises(ValueError):
        b.labels_param({"a": "1,b=2"})


def test_path_segments_are_escaped() -> None:
    assert (
        b.sandbox_path("g", "../../api-keys") == "/v1/sandbox-groups/g/sandboxes/..%2F..%2Fapi-keys"
    )


def test_file_content_is_streamed_in_chunks() -> None:
    data = bytes(range(256)) * 2049
    content = b.sync_content(io.BytesIO(data))
    assert not isinstance(content, bytes)
    chunks = list(content)
    assert b"".join(chunks) == data and len(chunks) == 3
    assert b.sync_content("é") == "é".encode()
    with pytest.raises(TypeError, match="binary mode"):
        list(b.sync_content(io.StringIO("text")))  # type: ignore[arg-type]  # text is refused


@pytest.mark.parametrize(
    "status,cls",
    [
        (400, moat.BadRequest),
        (401, moat.Unauthorized),
        (403, moat.Forbidden),
        (404, moat.NotFound),
        (405, moat.MethodNotAllowed),
        (409, moat.Conflict),
        (413, moat.PayloadTooLarge),
        (422, moat.Unprocessable),
        (429, moat.TooManyRequests),
        (500, moat.InternalError),
        (503, moat.Unavailable),
        (507, moat.NoSpace),
    ],
)
def test_error_classes(status: int, cls: type) -> None:
    e = error_from_response(status, json.dumps({"error": {"code": "c", "message": "m"}}).encode())
    assert type(e) is cls and isinstance(e, moat.MoatError)
    assert (e.status, e.code, e.message) == (status, "c", "m")


def test_error_bodies_not_from_the_daemon() -> None:
    e = error_from_response(502, b"<html>Bad Gateway</html>")
    assert isinstance(e, moat.InternalError) and e.code == "http_502" and "Bad Gateway" in e.message
    # The daemon's own 502 (the sandbox's agent failed) says so by its code.
    body = json.dumps({"error": {"code": "bad_gateway", "message": "m"}}).encode()
    e = error_from_response(502, body)
    assert type(e) is moat.BadGateway
    e = error_from_response(418, b"")
    assert type(e) is moat.MoatError and e.message == "HTTP status 418"
    assert moat.CapacityError is moat.TooManyRequests


def test_policy_denied_carries_findings_and_version() -> None:
    body = {
        "error": {
            "code": "policy_denied",
            "message": "refused by the policy of group \"g\" (version 3): command.denied: …",
            "findings": [
                {
                    "rule": "command.denied",
                    "message": "curl is in commands.deny",
                    "line": 1,
                    "column": 1,
                    "snippet": "curl x",
                },
                {"rule": "limits.user", "message": "no user", "line": None, "column": None,
                 "snippet": ""},
            ],
            "policy_version": 3,
        }
    }
    e = error_from_response(403, json.dumps(body).encode())
    assert type(e) is moat.PolicyDenied and isinstance(e, moat.Forbidden)
    assert (e.status, e.code, e.policy_version) == (403, "policy_denied", 3)
    assert e.findings[0] == moat.PolicyFinding("command.denied", "curl is in commands.deny", 1, 1,
                                               "curl x")
    assert e.findings[1].line is None
    # A plain 403 stays Forbidden.
    plain = error_from_response(403, json.dumps({"error": {"code": "forbidden", "message": "m"}}).encode())
    assert type(plain) is moat.Forbidden


def test_stream_frames() -> None:
    assert b.parse_frame('{"stdout":"a"}') == moat.ExecOutput("stdout", "a")
    assert b.parse_frame('{"stderr":"b"}') == moat.ExecOutput("stderr", "b")
    assert b.parse_frame(
        '{"exit":{"exit_code":137,"signal":9,"timed_out":false}}'
    ) == moat.ExecExit(137, 9)
    with pytest.raises(moat.InternalError) as e:
        b.parse_frame('{"error":{"code":"internal","message":"broke off"}}')
    assert (e.value.status, e.value.message) == (None, "broke off")
    with pytest.raises(moat.MoatError, match="not JSON"):
        b.parse_frame("garbage")
    assert isinstance(error_from_frame("x"), moat.MoatError)


# ---- against a local HTTP server ----

Answer = Tuple[int, str, bytes]


class _Handler(http.server.BaseHTTPRequestHandler):
    answers: List[Answer] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status, ctype, body = self.answers.pop(0)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Tuple[str, List[Answer]]]:
    answers: List[Answer] = []
    handler = type("H", (_Handler,), {"answers": answers})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", answers
    srv.shutdown()
    srv.server_close()


SANDBOX = {
    "id": "sb-000000000001",
    "group": "g",
    "state": "running",
    "image": "sha256:x",
    "tier": "s",
    "env": {},
    "labels": {},
    "created_at": "t",
    "updated_at": "t",
    "some_future_field": 1,
}


def test_stream_that_ends_without_an_exit(server: Tuple[str, List[Answer]]) -> None:
    url, answers = server
    answers.append((200, "application/json", json.dumps(SANDBOX).encode()))
    answers.append((200, "application/x-ndjson", b'{"stdout":"a"}\n'))
    answers.append(
        (
            200,
            "application/x-ndjson",
            b'{"stdout":"a"}\n{"error":{"code":"internal","message":"gone"}}\n',
        )
    )
    with moat.Client(url, "k") as c:
        sb = c.sandboxes.get("g", "sb-000000000001")
        got = []
        with pytest.raises(moat.ConnectionFailed, match="before the command's exit"):
            for ev in sb.exec_stream("x"):
                got.append(ev)
        assert got == [moat.ExecOutput("stdout", "a")]
        with pytest.raises(moat.InternalError, match="gone"):
            list(sb.exec_stream("x"))


def test_error_status_of_a_stream(server: Tuple[str, List[Answer]]) -> None:
    url, answers = server
    answers.append((200, "application/json", json.dumps(SANDBOX).encode()))
    answers.append(
        (409, "application/json", b'{"error":{"code":"conflict","message":"it is failed"}}')
    )
    with moat.Client(url, "k") as c:
        sb = c.sandboxes.get("g", "sb-000000000001")
        with pytest.raises(moat.Conflict, match="it is failed"):
            with sb.exec_stream("x"):
                pass


def test_async_stream(server: Tuple[str, List[Answer]]) -> None:
    url, answers = server
    answers.append((200, "application/json", json.dumps(SANDBOX).encode()))
    answers.append(
        (
            200,
            "application/x-ndjson",
            b'{"stdout":"a"}\n\n{"exit":{"exit_code":0,"signal":null,"timed_out":false}}\n',
        )
    )

    async def main() -> List[moat.ExecEvent]:
        async with moat.AsyncClient(url, "k") as c:
            sb = await c.sandboxes.get("g", "sb-000000000001")
            return [ev async for ev in sb.exec_stream("x")]

    assert asyncio.run(main()) == [moat.ExecOutput("stdout", "a"), moat.ExecExit(0)]


def test_unreachable_daemon() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with moat.Client(f"http://127.0.0.1:{port}", "k") as c:
        with pytest.raises(moat.ConnectionFailed) as e:
            c.groups.list()
    assert e.value.status is None and e.value.code == "unreachable"
    assert "cannot reach the moat daemon" in e.value.message
