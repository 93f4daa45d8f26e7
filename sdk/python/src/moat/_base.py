"""What the sync and the async client share: where the daemon is, and every API operation as
data (an `Op`: method, path, body and how to parse the answer), so that the two clients only
differ in how they send it."""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from typing import (
    IO,
    Any,
    Callable,
    Dict,
    Generic,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)
from urllib.parse import quote

import httpx

from ._errors import ConnectionFailed, MoatError, error_from_frame
from ._types import (
    ApiKey,
    AuditEvent,
    RateLimit,
    SecretInfo,
    CreatedApiKey,
    EgressEvent,
    ExecEvent,
    ExecExit,
    ExecOutput,
    ExecResult,
    FileEntry,
    FileWritten,
    Group,
    GroupSpec,
    Health,
    Node,
    SealingKeyRotation,
    Port,
    ProcessInfo,
    ProcessLogs,
    Role,
    SandboxInfo,
    Snapshot,
    Tier,
    parse_api_key,
    parse_audit_event,
    parse_secret,
    parse_created_api_key,
    parse_egress_event,
    parse_exec_exit,
    parse_exec_result,
    parse_file_entry,
    parse_group,
    parse_health,
    parse_node,
    parse_sealing_key_rotation,
    parse_port,
    parse_process,
    parse_sandbox,
    parse_snapshot,
)

__version__ = "0.1.0"

DEFAULT_URL = "http://127.0.0.1:7070"
DEFAULT_TIMEOUT = 300.0
CONNECT_TIMEOUT = 10.0
# Time the daemon may need on top of an exec's own timeout before it answers (a suspended
# sandbox is resumed first; the process tree is killed at the timeout).
EXEC_SLACK = 60.0
CHUNK = 256 * 1024

T = TypeVar("T")
Command = Union[str, Sequence[str]]
"""A shell command line (run as ``/bin/sh -c``) or an argv list (run as given)."""
FileData = Union[bytes, bytearray, memoryview, str, IO[bytes], Iterable[bytes]]


@dataclass(frozen=True)
class Endpoint:
    url: str
    """As the user gave it, for messages."""
    base_url: str
    uds: Optional[str]
    """The daemon's Unix socket, for ``unix://`` URLs."""


def endpoint(url: Optional[str]) -> Endpoint:
    """``url``, else ``MOAT_URL``, else the daemon's default address. ``unix:///path/moatd.sock``
    talks to the daemon's Unix socket (``MOAT_HOME/moatd.sock``)."""
    url = url or os.environ.get("MOAT_URL") or DEFAULT_URL
    if url.startswith("unix://"):
        path = url[len("unix://") :]
        if not path.startswith("/"):
            raise ValueError(
                f"invalid moat URL {url!r}: a Unix socket URL is unix:// and an absolute path, "
                "e.g. unix:///root/.moat/moatd.sock"
            )
        return Endpoint(url=url, base_url="http://moatd", uds=path)
    if not url.startswith(("http://", "https://")):
        raise ValueError(
            f"invalid moat URL {url!r}: expected http://HOST:PORT, https://HOST:PORT or "
            "unix:///path/to/moatd.sock"
        )
    return Endpoint(url=url, base_url=url.rstrip("/"), uds=None)


def headers(api_key: Optional[str]) -> Dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("MOAT_API_KEY")
    h = {"User-Agent": f"moat-python/{__version__}"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    return h


def client_timeout(timeout: Optional[float]) -> httpx.Timeout:
    return httpx.Timeout(timeout, connect=CONNECT_TIMEOUT)


def long_timeout(read: Optional[float]) -> httpx.Timeout:
    """For requests that last as long as a command runs: no read timeout unless one is known."""
    return httpx.Timeout(DEFAULT_TIMEOUT, connect=CONNECT_TIMEOUT, read=read)


def transport_error(ep: Endpoint, e: httpx.TransportError) -> ConnectionFailed:
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
        return ConnectionFailed(
            None,
            "unreachable",
            f"cannot reach the moat daemon at {ep.url} (is `moat serve` running? set MOAT_URL): {e}",
        )
    if isinstance(e, httpx.TimeoutException):
        return ConnectionFailed(
            None, "timeout", f"the moat daemon at {ep.url} did not answer in time: {e}"
        )
    return ConnectionFailed(
        None, "broken", f"the connection to the moat daemon at {ep.url} broke off: {e}"
    )


def json_body(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        raise MoatError(
            resp.status_code,
            "bad_response",
            f"the daemon answered {resp.request.method} {resp.request.url.path} with a body that is "
            f"not JSON: {resp.content[:200]!r}",
        ) from None


@dataclass(frozen=True)
class Op(Generic[T]):
    """One API request and how to read its (successful) answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Optional[Mapping[str, str]] = None
    json: Any = None
    content: Any = None
    headers: Optional[Mapping[str, str]] = None
    timeout: Optional[httpx.Timeout] = None
    """None: the client's timeout."""

    def request(self, http: Union[httpx.Client, httpx.AsyncClient]) -> httpx.Request:
        kw: Dict[str, Any] = {}
        if self.timeout is not None:
            kw["timeout"] = self.timeout
        return http.build_request(
            self.method,
            self.path,
            params=self.params,
            json=self.json,
            content=self.content,
            headers=self.headers,
            **kw,
        )


def _none(_: httpx.Response) -> None:
    return None


def seg(s: str) -> str:
    """One path segment: names and ids are validated by the daemon, but a '/' or '..' in
    one must never reach another route."""
    return quote(str(s), safe="")


def group_path(group: str) -> str:
    return f"/v1/sandbox-groups/{seg(group)}"


def sandbox_path(group: str, sandbox_id: str) -> str:
    return f"{group_path(group)}/sandboxes/{seg(sandbox_id)}"


def proc_path(group: str, sandbox_id: str, proc_id: str) -> str:
    return f"{sandbox_path(group, sandbox_id)}/processes/{seg(proc_id)}"


# ---- operations ----


def health() -> Op[Health]:
    return Op("GET", "/healthz", lambda r: parse_health(json_body(r)))


def group_apply(name: str, spec: Optional[GroupSpec]) -> Op[Group]:
    return Op("PUT", group_path(name), lambda r: parse_group(json_body(r)), json=dict(spec or {}))


def group_get(name: str) -> Op[Group]:
    return Op("GET", group_path(name), lambda r: parse_group(json_body(r)))


def group_list() -> Op[List[Group]]:
    return Op(
        "GET", "/v1/sandbox-groups", lambda r: [parse_group(g) for g in json_body(r)["groups"]]
    )


def group_delete(name: str, force: bool) -> Op[None]:
    return Op(
        "DELETE",
        group_path(name),
        _none,
        params={"force": "true"} if force else None,
        # A forced delete destroys the group's sandboxes first.
        timeout=long_timeout(DEFAULT_TIMEOUT * 2) if force else None,
    )


def secret_set(group: str, name: str, value: str) -> Op[SecretInfo]:
    return Op(
        "PUT",
        f"{group_path(group)}/secrets/{seg(name)}",
        lambda r: parse_secret(json_body(r)),
        json={"value": value},
    )


def secret_list(group: str) -> Op[List[SecretInfo]]:
    return Op(
        "GET",
        f"{group_path(group)}/secrets",
        lambda r: [parse_secret(s) for s in json_body(r)["secrets"]],
    )


def secret_delete(group: str, name: str) -> Op[None]:
    return Op("DELETE", f"{group_path(group)}/secrets/{seg(name)}", _none)


def _json(r: httpx.Response) -> Dict[str, Any]:
    body: Dict[str, Any] = json_body(r)
    return body


def policy_get(group: str) -> Op[Dict[str, Any]]:
    return Op("GET", f"{group_path(group)}/policy", _json)


def policy_apply(group: str, policy: Mapping[str, Any]) -> Op[Dict[str, Any]]:
    return Op("PUT", f"{group_path(group)}/policy", _json, json=dict(policy))


def policy_rollback(group: str, version: int) -> Op[Dict[str, Any]]:
    # Its examples are decided again in worker processes.
    return Op(
        "POST",
        f"{group_path(group)}/policy/rollback",
        _json,
        json={"version": version},
        timeout=long_timeout(DEFAULT_TIMEOUT),
    )


def policy_versions(group: str) -> Op[List[Dict[str, Any]]]:
    return Op("GET", f"{group_path(group)}/policy/versions", lambda r: json_body(r)["items"])


def policy_check(group: str, request: Mapping[str, Any]) -> Op[Dict[str, Any]]:
    return Op("POST", f"{group_path(group)}/policy/check", _json, json=dict(request))


def policy_decisions(
    group: str,
    verdict: Optional[str],
    since: Optional[int],
    after: Optional[int],
    limit: Optional[int],
) -> Op[Dict[str, Any]]:
    params = {
        k: str(v)
        for k, v in (("verdict", verdict), ("since", since), ("after", after), ("limit", limit))
        if v is not None
    }
    return Op("GET", f"{group_path(group)}/policy/decisions", _json, params=params or None)


def policy_replay(
    group: str, policy: Mapping[str, Any], limit: Optional[int]
) -> Op[Dict[str, Any]]:
    body: Dict[str, Any] = {"policy": dict(policy)}
    if limit is not None:
        body["limit"] = limit
    # Each recorded request is checked again in a worker process.
    return Op(
        "POST",
        f"{group_path(group)}/policy/replay",
        _json,
        json=body,
        timeout=long_timeout(DEFAULT_TIMEOUT),
    )


def key_create(
    name: str,
    role: Role,
    groups: Sequence[str],
    expires_in_s: Optional[int] = None,
    rate_limit: Optional[RateLimit] = None,
) -> Op[CreatedApiKey]:
    body: Dict[str, Any] = {"name": name, "role": role, "groups": list(groups)}
    if expires_in_s is not None:
        body["expires_in_s"] = expires_in_s
    if rate_limit is not None:
        body["rate_limit"] = {"per_s": rate_limit.per_s, "burst": rate_limit.burst}
    return Op(
        "POST",
        "/v1/api-keys",
        lambda r: parse_created_api_key(json_body(r)),
        json=body,
    )


def key_get(key_id: str) -> Op[ApiKey]:
    return Op("GET", f"/v1/api-keys/{seg(key_id)}", lambda r: parse_api_key(json_body(r)))


def key_rotate(key_id: str, expires_in_s: Optional[int]) -> Op[CreatedApiKey]:
    body: Dict[str, Any] = {} if expires_in_s is None else {"expires_in_s": expires_in_s}
    return Op(
        "POST",
        f"/v1/api-keys/{seg(key_id)}/rotate",
        lambda r: parse_created_api_key(json_body(r)),
        json=body,
    )


def audit_list(
    since: Optional[int],
    key: Optional[str],
    group: Optional[str],
    after: Optional[int],
    limit: Optional[int],
) -> Op[Tuple[List[AuditEvent], Optional[int]]]:
    params = {
        k: str(v)
        for k, v in (
            ("since", since),
            ("key", key),
            ("group", group),
            ("after", after),
            ("limit", limit),
        )
        if v is not None
    }

    def parse(r: httpx.Response) -> Tuple[List[AuditEvent], Optional[int]]:
        d = json_body(r)
        return [parse_audit_event(e) for e in d["events"]], d.get("next")

    return Op("GET", "/v1/audit", parse, params=params or None)


def verify(url: str) -> Union[bool, ssl.SSLContext]:
    """TLS verification for an https:// daemon: the system's CAs, plus those of
    ``MOAT_CA_FILE`` (PEM) for a daemon whose certificate a private CA signed. Never off."""
    ca = os.environ.get("MOAT_CA_FILE")
    if not ca or not url.startswith("https://"):
        return True
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=ca)
    return ctx


def key_list() -> Op[List[ApiKey]]:
    return Op("GET", "/v1/api-keys", lambda r: [parse_api_key(k) for k in json_body(r)["api_keys"]])


def key_delete(key_id: str) -> Op[None]:
    return Op("DELETE", f"/v1/api-keys/{seg(key_id)}", _none)


def labels_param(labels: Mapping[str, str]) -> str:
    for k, v in labels.items():
        if "," in k or "=" in k or "," in v:
            raise ValueError(
                f"label {k}={v} cannot be part of a selector: no ',' or '=' in keys, no ',' in values"
            )
    return ",".join(f"{k}={v}" for k, v in labels.items())


def sandbox_create(
    group: str,
    image: Optional[str],
    tier: Optional[Tier],
    env: Optional[Mapping[str, str]],
    labels: Optional[Mapping[str, str]],
) -> Op[SandboxInfo]:
    body: Dict[str, Any] = {}
    if image is not None:
        body["image"] = image
    if tier is not None:
        body["tier"] = tier
    if env:
        body["env"] = dict(env)
    if labels:
        body["labels"] = dict(labels)
    return Op(
        "POST", f"{group_path(group)}/sandboxes", lambda r: parse_sandbox(json_body(r)), json=body
    )


def sandbox_get(group: str, sandbox_id: str) -> Op[SandboxInfo]:
    return Op("GET", sandbox_path(group, sandbox_id), lambda r: parse_sandbox(json_body(r)))


def sandbox_list(group: str, labels: Optional[Mapping[str, str]]) -> Op[List[SandboxInfo]]:
    return Op(
        "GET",
        f"{group_path(group)}/sandboxes",
        lambda r: [parse_sandbox(s) for s in json_body(r)["sandboxes"]],
        params={"labels": labels_param(labels)} if labels else None,
    )


def egress_list(
    path: str,
    sandbox: Optional[str] = None,
    verdict: Optional[str] = None,
    since: Optional[str] = None,
    after: Optional[int] = None,
    limit: Optional[int] = None,
) -> Op[List[EgressEvent]]:
    """The audit events at ``path`` (a group's or a sandbox's ``/egress``), oldest first."""
    params: Dict[str, Any] = {}
    for k, v in (
        ("sandbox", sandbox),
        ("verdict", verdict),
        ("since", since),
        ("after", after),
        ("limit", limit),
    ):
        if v is not None:
            params[k] = v
    return Op(
        "GET",
        path,
        lambda r: [parse_egress_event(e) for e in json_body(r)["items"]],
        params=params or None,
    )


def identity_token(
    group: str, sandbox_id: str, audience: str, ttl_s: Optional[int]
) -> Op[Dict[str, Any]]:
    body: Dict[str, Any] = {"audience": audience}
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    return Op("POST", f"{sandbox_path(group, sandbox_id)}/identity/token", _json, json=body)


def identity_events(
    group: str, sandbox: Optional[str], after: Optional[int], limit: Optional[int]
) -> Op[List[Dict[str, Any]]]:
    params: Dict[str, Any] = {
        k: v for k, v in (("sandbox", sandbox), ("after", after), ("limit", limit)) if v is not None
    }
    return Op(
        "GET",
        f"{group_path(group)}/identity/events",
        lambda r: list(json_body(r)["items"]),
        params=params or None,
    )


def sandbox_delete(group: str, sandbox_id: str) -> Op[None]:
    return Op("DELETE", sandbox_path(group, sandbox_id), _none)


def sandbox_verb(group: str, sandbox_id: str, verb: str) -> Op[SandboxInfo]:
    return Op(
        "POST", f"{sandbox_path(group, sandbox_id)}/{verb}", lambda r: parse_sandbox(json_body(r))
    )


def snapshot_create(group: str, sandbox_id: str, name: str) -> Op[Snapshot]:
    return Op(
        "POST",
        f"{sandbox_path(group, sandbox_id)}/snapshots",
        lambda r: parse_snapshot(json_body(r)),
        json={"name": name},
    )


def port_expose(group: str, sandbox_id: str, port: int, base_url: str) -> Op[Port]:
    return Op(
        "POST",
        f"{sandbox_path(group, sandbox_id)}/ports",
        lambda r: parse_port(json_body(r), base_url),
        json={"port": port},
    )


def port_list(group: str, sandbox_id: str, base_url: str) -> Op[List[Port]]:
    return Op(
        "GET",
        f"{sandbox_path(group, sandbox_id)}/ports",
        lambda r: [parse_port(p, base_url) for p in json_body(r)["ports"]],
    )


def port_close(group: str, sandbox_id: str, port: int) -> Op[None]:
    return Op("DELETE", f"{sandbox_path(group, sandbox_id)}/ports/{int(port)}", _none)


def snapshot_path(group: str, name: str) -> str:
    return f"{group_path(group)}/snapshots/{seg(name)}"


def node_list() -> Op[List[Node]]:
    return Op("GET", "/v1/nodes", lambda r: [parse_node(n) for n in json_body(r)["nodes"]])


def node_get(name: str) -> Op[Node]:
    return Op("GET", f"/v1/nodes/{seg(name)}", lambda r: parse_node(json_body(r)))


def node_drain(name: str, drain: bool) -> Op[Node]:
    verb = "drain" if drain else "undrain"
    return Op("POST", f"/v1/nodes/{seg(name)}/{verb}", lambda r: parse_node(json_body(r)))


def sealing_key_rotate() -> Op[SealingKeyRotation]:
    return Op(
        "POST", "/v1/sealing-key/rotate", lambda r: parse_sealing_key_rotation(json_body(r))
    )


def snapshot_get(group: str, name: str) -> Op[Snapshot]:
    return Op("GET", snapshot_path(group, name), lambda r: parse_snapshot(json_body(r)))


def snapshot_list(group: str) -> Op[List[Snapshot]]:
    return Op(
        "GET",
        f"{group_path(group)}/snapshots",
        lambda r: [parse_snapshot(s) for s in json_body(r)["snapshots"]],
    )


def snapshot_delete(group: str, name: str) -> Op[None]:
    return Op("DELETE", snapshot_path(group, name), _none)


def sandbox_fork(
    group: str,
    snapshot: str,
    count: int,
    env: Optional[Mapping[str, str]],
    labels: Optional[Mapping[str, str]],
) -> Op[List[SandboxInfo]]:
    body: Dict[str, Any] = {"from_snapshot": snapshot, "count": count}
    if env:
        body["env"] = dict(env)
    if labels:
        body["labels"] = dict(labels)
    return Op(
        "POST",
        f"{group_path(group)}/sandboxes",
        lambda r: [parse_sandbox(s) for s in json_body(r)["sandboxes"]],
        json=body,
    )


def command_body(
    cmd: Command,
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    user: Union[str, int, None],
    timeout: Optional[float],
) -> Dict[str, Any]:
    body: Dict[str, Any] = {}
    if isinstance(cmd, str):
        body["command"] = cmd
    elif isinstance(cmd, (bytes, bytearray)):
        raise TypeError("give the command as a str (a shell command line) or a list of str (argv)")
    else:
        argv = list(cmd)
        if not all(isinstance(a, str) for a in argv):
            raise TypeError(f"argv must be a list of str, got {argv!r}")
        body["argv"] = argv
    if env:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if user is not None:
        body["user"] = str(user)
    if timeout is not None:
        body["timeout_s"] = float(timeout)
    return body


def exec_body(
    cmd: Command,
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    user: Union[str, int, None],
    stdin: Union[str, bytes, None],
    timeout: Optional[float],
) -> Dict[str, Any]:
    body = command_body(cmd, env, cwd, user, timeout)
    if stdin is not None:
        # The API carries stdin as a JSON string.
        body["stdin"] = stdin if isinstance(stdin, str) else bytes(stdin).decode("utf-8")
    return body


def exec_timeout(timeout: Optional[float]) -> httpx.Timeout:
    return long_timeout(None if timeout is None else float(timeout) + EXEC_SLACK)


def exec_collect(
    group: str, sandbox_id: str, body: Dict[str, Any], timeout: Optional[float]
) -> Op[ExecResult]:
    return Op(
        "POST",
        f"{sandbox_path(group, sandbox_id)}/exec",
        lambda r: parse_exec_result(json_body(r)),
        json=body,
        timeout=exec_timeout(timeout),
    )


def exec_stream(
    group: str, sandbox_id: str, body: Dict[str, Any], timeout: Optional[float]
) -> Op[None]:
    return Op(
        "POST",
        f"{sandbox_path(group, sandbox_id)}/exec",
        _none,
        json=body,
        headers={"Accept": "application/x-ndjson"},
        # Output may pause for as long as the command likes.
        timeout=long_timeout(None),
    )


def parse_frame(line: str) -> ExecEvent:
    """One NDJSON line of a streamed exec; an ``{"error": …}`` line raises."""
    try:
        d = json.loads(line)
    except ValueError:
        raise MoatError(
            None, "bad_stream", f"the daemon sent a line that is not JSON: {line[:200]!r}"
        ) from None
    if isinstance(d, dict):
        if "stdout" in d:
            return ExecOutput("stdout", str(d["stdout"]))
        if "stderr" in d:
            return ExecOutput("stderr", str(d["stderr"]))
        if "exit" in d:
            return parse_exec_exit(d["exit"])
        if "error" in d:
            raise error_from_frame(d["error"])
    raise MoatError(None, "bad_stream", f"unexpected line in an exec stream: {line[:200]!r}")


def stream_ended_early() -> ConnectionFailed:
    return ConnectionFailed(None, "broken", "the exec stream ended before the command's exit")


def files_path(group: str, sandbox_id: str) -> str:
    return f"{sandbox_path(group, sandbox_id)}/files"


def file_write(
    group: str, sandbox_id: str, path: str, content: Any, mode: Optional[int], parents: bool
) -> Op[FileWritten]:
    params = {"path": path}
    if mode is not None:
        params["mode"] = f"{mode:04o}"
    if parents:
        params["parents"] = "true"

    def parse(r: httpx.Response) -> FileWritten:
        d = json_body(r)
        return FileWritten(path=str(d["path"]), size=int(d["size"]), created=r.status_code == 201)

    return Op(
        "PUT",
        files_path(group, sandbox_id),
        parse,
        params=params,
        content=content,
        headers={"Content-Type": "application/octet-stream"},
        timeout=long_timeout(None),
    )


def file_read(group: str, sandbox_id: str, path: str) -> Op[bytes]:
    return Op(
        "GET",
        files_path(group, sandbox_id),
        lambda r: r.content,
        params={"path": path},
        timeout=long_timeout(None),
    )


def file_list(group: str, sandbox_id: str, path: str) -> Op[List[FileEntry]]:
    return Op(
        "GET",
        f"{files_path(group, sandbox_id)}/list",
        lambda r: [parse_file_entry(e) for e in json_body(r)["entries"]],
        params={"path": path},
    )


def file_remove(group: str, sandbox_id: str, path: str, recursive: bool) -> Op[None]:
    params = {"path": path}
    if recursive:
        params["recursive"] = "true"
    return Op("DELETE", files_path(group, sandbox_id), _none, params=params)


def sync_content(data: FileData) -> Union[bytes, Iterable[bytes]]:
    """A request body from what ``files.write`` accepts; files are streamed in chunks."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        return data.encode("utf-8")
    read = getattr(data, "read", None)
    if read is not None:

        def chunks() -> Iterator[bytes]:
            while True:
                b = read(CHUNK)
                if not b:
                    return
                if isinstance(b, str):
                    raise TypeError("open the file in binary mode ('rb') to upload it")
                yield b

        return chunks()
    return data


def proc_start(group: str, sandbox_id: str, body: Dict[str, Any]) -> Op[Dict[str, Any]]:
    return Op(
        "POST",
        f"{sandbox_path(group, sandbox_id)}/processes",
        lambda r: dict(json_body(r)),
        json=body,
    )


def proc_list(group: str, sandbox_id: str) -> Op[List[ProcessInfo]]:
    return Op(
        "GET",
        f"{sandbox_path(group, sandbox_id)}/processes",
        lambda r: [parse_process(p) for p in json_body(r)["processes"]],
    )


def proc_kill(group: str, sandbox_id: str, proc_id: str, signal: int) -> Op[None]:
    return Op(
        "POST", f"{proc_path(group, sandbox_id, proc_id)}/kill", _none, json={"signal": signal}
    )


def proc_wait(group: str, sandbox_id: str, proc_id: str, timeout: float) -> Op[ExecExit]:
    return Op(
        "POST",
        f"{proc_path(group, sandbox_id, proc_id)}/wait",
        lambda r: parse_exec_exit(json_body(r)),
        params={"timeout_s": repr(float(timeout))},
        timeout=long_timeout(float(timeout) + EXEC_SLACK),
    )


def proc_logs(group: str, sandbox_id: str, proc_id: str) -> Op[ProcessLogs]:
    def parse(r: httpx.Response) -> ProcessLogs:
        d = json_body(r)
        return ProcessLogs(stdout=str(d["stdout"]), stderr=str(d["stderr"]))

    return Op("GET", f"{proc_path(group, sandbox_id, proc_id)}/logs", parse)
