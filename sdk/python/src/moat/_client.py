"""The synchronous client."""

from __future__ import annotations

from types import TracebackType
from typing import (
    Any,
    Dict,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
)

import httpx

from . import _base as b
from ._errors import NotFound, error_from_response
from ._types import (
    ApiKey,
    AuditEvent,
    CreatedApiKey,
    RateLimit,
    EgressEvent,
    ExecEvent,
    ExecExit,
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
    SandboxState,
    SecretInfo,
    Snapshot,
    Tier,
)

T = TypeVar("T")


class Client:
    """A client of the moat daemon.

    ``url`` defaults to ``MOAT_URL``, else ``http://127.0.0.1:7070``; ``unix:///path/moatd.sock``
    uses the daemon's Unix socket. ``api_key`` defaults to ``MOAT_API_KEY``. ``timeout`` bounds
    ordinary requests (seconds, None for none); execs, file transfers and process waits last as
    long as they need (an exec's own ``timeout`` bounds it).
    """

    def __init__(
        self,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: Optional[float] = b.DEFAULT_TIMEOUT,
        transport: Optional[httpx.BaseTransport] = None,
    ) -> None:
        self._endpoint = b.endpoint(url)
        if transport is None and self._endpoint.uds is not None:
            transport = httpx.HTTPTransport(uds=self._endpoint.uds)
        self._http = httpx.Client(
            base_url=self._endpoint.base_url,
            headers=b.headers(api_key),
            verify=b.verify(self._endpoint.base_url),
            timeout=b.client_timeout(timeout),
            transport=transport,
        )
        self.groups = Groups(self)
        self.sandboxes = Sandboxes(self)
        self.api_keys = ApiKeys(self)
        self.snapshots = Snapshots(self)
        self.nodes = Nodes(self)

    @property
    def url(self) -> str:
        return self._endpoint.url

    def health(self) -> Health:
        return self._run(b.health())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def _run(self, op: b.Op[T]) -> T:
        try:
            resp = self._http.send(op.request(self._http))
        except httpx.TransportError as e:
            raise b.transport_error(self._endpoint, e) from e
        if resp.status_code >= 400:
            raise error_from_response(resp.status_code, resp.content)
        return op.parse(resp)

    def _open(self, op: b.Op[Any]) -> httpx.Response:
        """Sends ``op`` and returns the answer with its body still to be read (the caller
        closes it)."""
        try:
            resp = self._http.send(op.request(self._http), stream=True)
            if resp.status_code >= 400:
                try:
                    body = resp.read()
                finally:
                    resp.close()
                raise error_from_response(resp.status_code, body)
        except httpx.TransportError as e:
            raise b.transport_error(self._endpoint, e) from e
        return resp


class Groups:
    def __init__(self, client: Client) -> None:
        self._c = client
        self.policy = Policies(client)
        self.secrets = Secrets(client)

    def apply(self, name: str, spec: Optional[GroupSpec] = None) -> Group:
        """Creates the group or replaces its whole spec (idempotent)."""
        return self._c._run(b.group_apply(name, spec))

    def get(self, name: str) -> Group:
        return self._c._run(b.group_get(name))

    def list(self) -> List[Group]:
        return self._c._run(b.group_list())

    def delete(self, name: str, *, force: bool = False) -> None:
        """Refused (Conflict) while the group has sandboxes, unless ``force``, which deletes them."""
        self._c._run(b.group_delete(name, force))

    def egress(
        self,
        name: str,
        *,
        sandbox: Optional[str] = None,
        verdict: Optional[Literal["allow", "deny"]] = None,
        since: Optional[str] = None,
        after: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> List[EgressEvent]:
        """The group's egress audit, oldest first: the newest ``limit`` events (default 100),
        or with ``after`` (an event's ``id``) the oldest ones after it. ``since`` is an RFC 3339
        UTC time; ``sandbox`` includes deleted sandboxes."""
        return self._c._run(
            b.egress_list(f"{b.group_path(name)}/egress", sandbox, verdict, since, after, limit)
        )

    def identity_token(
        self, name: str, sandbox_id: str, audience: str, *, ttl_s: Optional[int] = None
    ) -> Dict[str, Any]:
        """A workload-identity token for a running sandbox of the group (owner and admin keys;
        for debugging a federation setup): ``{"token", "expires_on", "jti", "kid", …}``."""
        return self._c._run(b.identity_token(name, sandbox_id, audience, ttl_s))

    def identity_events(
        self,
        name: str,
        *,
        sandbox: Optional[str] = None,
        after: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> List[Dict[str, Any]]:
        """The group's identity audit (mints and refusals, never a token), oldest first."""
        return self._c._run(b.identity_events(name, sandbox, after, limit))


class Secrets:
    """A group's secrets: the values egress transforms inject (``${secret:NAME}``). Values go
    in and never come back: listing shows names and times."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def set(self, group: str, name: str, value: str) -> SecretInfo:
        """Creates or replaces the secret (owner and admin keys); running sandboxes use the
        new value before this returns."""
        return self._c._run(b.secret_set(group, name, value))

    def list(self, group: str) -> List[SecretInfo]:
        return self._c._run(b.secret_list(group))

    def delete(self, group: str, name: str) -> None:
        """Requests whose transform needs it are refused from then on."""
        self._c._run(b.secret_delete(group, name))


class Policies:
    """A group's policy (docs/POLICY.md): the answers are the API's JSON objects."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def get(self, group: str) -> Dict[str, Any]:
        """The policy in force: ``{"group", "version", "policy", "sha256", "author",
        "created_at"}`` (version 0: none was ever applied, so it is off)."""
        return self._c._run(b.policy_get(group))

    def apply(self, group: str, policy: Mapping[str, Any]) -> Dict[str, Any]:
        """Applies ``policy`` (the policy object) as the group's new version (owner or admin);
        BadRequest lists every problem, including examples in its ``tests`` it contradicts."""
        return self._c._run(b.policy_apply(group, policy))

    def rollback(self, group: str, version: int) -> Dict[str, Any]:
        """Makes version ``version``'s policy the one in force again, as a new version (the
        history stays append-only; owner or admin). NotFound when there is no such version."""
        return self._c._run(b.policy_rollback(group, version))

    def versions(self, group: str) -> List[Dict[str, Any]]:
        return self._c._run(b.policy_versions(group))

    def check(self, group: str, request: Mapping[str, Any]) -> Dict[str, Any]:
        """Dry run: ``{"allowed", "mode", "findings", "policy_version"}`` for an exec request
        (``argv`` or ``command``, …) or ``{"python": CODE}`` / ``{"shell": CODE}``."""
        return self._c._run(b.policy_check(group, request))

    def decisions(
        self,
        group: str,
        *,
        verdict: Optional[str] = None,
        since: Optional[int] = None,
        after: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> Dict[str, Any]:
        """A page of the hash-chained decisions log: ``{"items", "next"}`` (owner or admin)."""
        return self._c._run(b.policy_decisions(group, verdict, since, after, limit))

    def replay(
        self, group: str, policy: Mapping[str, Any], *, limit: Optional[int] = None
    ) -> Dict[str, Any]:
        """Which of the newest recorded requests ``policy`` would decide differently."""
        return self._c._run(b.policy_replay(group, policy, limit))


class ApiKeys:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(
        self,
        name: str,
        role: Role,
        groups: Sequence[str] = (),
        *,
        expires_in_s: Optional[int] = None,
        rate_limit: Optional[RateLimit] = None,
    ) -> CreatedApiKey:
        """The answer's ``key`` is the secret, shown this once. ``expires_in_s``: the key stops
        working that many seconds from now; ``rate_limit``: its own, instead of the daemon's."""
        return self._c._run(b.key_create(name, role, groups, expires_in_s, rate_limit))

    def list(self) -> List[ApiKey]:
        return self._c._run(b.key_list())

    def get(self, key_id: str) -> ApiKey:
        return self._c._run(b.key_get(key_id))

    def rotate(self, key_id: str, *, expires_in_s: Optional[int] = None) -> CreatedApiKey:
        """A new secret for the key (same id, role, groups and rate limit), shown this once;
        the old secret stops working at once. ``expires_in_s`` is needed when the key has
        expired; without it the expiry stays as it was."""
        return self._c._run(b.key_rotate(key_id, expires_in_s))

    def audit(
        self,
        *,
        since: Optional[int] = None,
        key: Optional[str] = None,
        group: Optional[str] = None,
        after: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> Tuple[List[AuditEvent], Optional[int]]:
        """A page of the audit log of mutating API calls (admin keys), oldest first, and the
        ``after`` of the next page (None on the last). ``since``: unix seconds."""
        return self._c._run(b.audit_list(since, key, group, after, limit))

    def delete(self, key_id: str) -> None:
        self._c._run(b.key_delete(key_id))


class Sandboxes:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(
        self,
        group: str,
        *,
        image: Optional[str] = None,
        tier: Optional[Tier] = None,
        env: Optional[Mapping[str, str]] = None,
        labels: Optional[Mapping[str, str]] = None,
    ) -> Sandbox:
        """A new running sandbox; image and tier default to the group's."""
        return Sandbox(self._c, self._c._run(b.sandbox_create(group, image, tier, env, labels)))

    def fork(
        self,
        group: str,
        snapshot: str,
        count: int = 1,
        *,
        env: Optional[Mapping[str, str]] = None,
        labels: Optional[Mapping[str, str]] = None,
    ) -> List[Sandbox]:
        """``count`` (1–16) new sandboxes from the group's snapshot ``snapshot``: processes,
        memory and files as they were, with fresh entropy, clock and hostname. All or none."""
        infos = self._c._run(b.sandbox_fork(group, snapshot, count, env, labels))
        return [Sandbox(self._c, i) for i in infos]

    def get(self, group: str, sandbox_id: str) -> Sandbox:
        return Sandbox(self._c, self._c._run(b.sandbox_get(group, sandbox_id)))

    def list(self, group: str, *, labels: Optional[Mapping[str, str]] = None) -> List[Sandbox]:
        """The group's sandboxes; with ``labels``, those that have every one of them."""
        return [Sandbox(self._c, i) for i in self._c._run(b.sandbox_list(group, labels))]


class Nodes:
    """The daemons sharing the store (a fleet's nodes): list, get, and (admin keys) drain,
    undrain and rotate the sealing key they share."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> List[Node]:
        return self._c._run(b.node_list())

    def get(self, name: str) -> Node:
        return self._c._run(b.node_get(name))

    def drain(self, name: str) -> Node:
        """The node takes no new sandboxes; those it runs stay."""
        return self._c._run(b.node_drain(name, True))

    def undrain(self, name: str) -> Node:
        return self._c._run(b.node_drain(name, False))

    def rotate_sealing_key(self) -> SealingKeyRotation:
        """Re-seals the store's secrets and signing keys with the key every node holds as
        ``MOAT_HOME/secrets.key.next`` (admin keys; made with ``moat sealing-key new``)."""
        return self._c._run(b.sealing_key_rotate())


class Snapshots:
    """A group's named snapshots (taken with ``Sandbox.snapshot``, used by
    ``sandboxes.fork``)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def get(self, group: str, name: str) -> Snapshot:
        return self._c._run(b.snapshot_get(group, name))

    def list(self, group: str) -> List[Snapshot]:
        return self._c._run(b.snapshot_list(group))

    def delete(self, group: str, name: str) -> None:
        """Its forks are not affected."""
        self._c._run(b.snapshot_delete(group, name))


class Sandbox:
    """A sandbox. Deleted when a ``with`` block around it ends."""

    def __init__(self, client: Client, info: SandboxInfo) -> None:
        self._c = client
        self.info = info
        """What the daemon said about it last (see ``refresh``)."""
        self.files = Files(self)
        self.processes = Processes(self)

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def group(self) -> str:
        return self.info.group

    @property
    def state(self) -> SandboxState:
        return self.info.state

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, group={self.group!r}, state={self.state!r})"

    def refresh(self) -> SandboxInfo:
        self.info = self._c._run(b.sandbox_get(self.group, self.id))
        return self.info

    def exec(
        self,
        cmd: b.Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Union[str, int, None] = None,
        stdin: Union[str, bytes, None] = None,
        timeout: Optional[float] = None,
    ) -> ExecResult:
        """Runs ``cmd`` (a shell command line, or an argv list) to its end and returns its
        output (at most 16 MiB of each stream; beyond that use ``exec_stream``). A suspended
        sandbox is resumed first. After ``timeout`` seconds the process tree is killed and the
        result has ``timed_out`` set and exit code 124."""
        body = b.exec_body(cmd, env, cwd, user, stdin, timeout)
        return self._c._run(b.exec_collect(self.group, self.id, body, timeout))

    def exec_stream(
        self,
        cmd: b.Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Union[str, int, None] = None,
        stdin: Union[str, bytes, None] = None,
        timeout: Optional[float] = None,
    ) -> ExecStream:
        """Like ``exec``, but yields ``ExecOutput`` pieces as the command writes them, then
        one ``ExecExit``. Use it in a ``with`` block to stop early: leaving it closes the
        connection, which kills the command."""
        body = b.exec_body(cmd, env, cwd, user, stdin, timeout)
        return ExecStream(self._c, b.exec_stream(self.group, self.id, body, timeout))

    def suspend(self) -> SandboxInfo:
        """Saves memory and disk and stops the VM; the next exec or file request (or
        ``resume``) brings it back as it was."""
        self.info = self._c._run(b.sandbox_verb(self.group, self.id, "suspend"))
        return self.info

    def resume(self) -> SandboxInfo:
        self.info = self._c._run(b.sandbox_verb(self.group, self.id, "resume"))
        return self.info

    def snapshot(self, name: str) -> Snapshot:
        """A named snapshot of the sandbox (unique in its group), for ``sandboxes.fork``; the
        sandbox runs on (a suspended one is resumed first)."""
        return self._c._run(b.snapshot_create(self.group, self.id, name))

    def egress(
        self,
        *,
        verdict: Optional[Literal["allow", "deny"]] = None,
        since: Optional[str] = None,
        after: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> List[EgressEvent]:
        """This sandbox's egress audit (see ``Groups.egress``)."""
        path = f"{b.sandbox_path(self.group, self.id)}/egress"
        return self._c._run(b.egress_list(path, None, verdict, since, after, limit))

    def expose_port(self, port: int) -> Port:
        """Exposes the guest's TCP ``port`` (1-65535) through the daemon: HTTP and WebSocket
        requests under the returned ``url`` reach it, with this client's API key."""
        return self._c._run(b.port_expose(self.group, self.id, port, self._c.url))

    def ports(self) -> List[Port]:
        """The exposed ports, lowest first."""
        return self._c._run(b.port_list(self.group, self.id, self._c.url))

    def close_port(self, port: int) -> None:
        """Closes an exposed port (``NotFound`` if it is not exposed)."""
        self._c._run(b.port_close(self.group, self.id, port))

    def delete(self) -> None:
        self._c._run(b.sandbox_delete(self.group, self.id))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            self.delete()
        except NotFound:
            pass  # already deleted


class ExecStream:
    """The events of a streamed exec. Iterate it (once); ``exit`` holds the ``ExecExit`` after
    the end. The request is sent when iteration (or the ``with`` block) starts."""

    def __init__(self, client: Client, op: b.Op[None]) -> None:
        self._c = client
        self._op = op
        self._resp: Optional[httpx.Response] = None
        self._started = False
        self.exit: Optional[ExecExit] = None

    def _open(self) -> httpx.Response:
        if self._resp is None:
            if self._started:
                raise RuntimeError("an exec stream can be iterated only once")
            self._started = True
            self._resp = self._c._open(self._op)
        return self._resp

    def __iter__(self) -> Iterator[ExecEvent]:
        resp = self._open()
        try:
            for line in resp.iter_lines():
                if not line.strip():
                    continue
                ev = b.parse_frame(line)
                if isinstance(ev, ExecExit):
                    self.exit = ev
                yield ev
                if self.exit is not None:
                    return
            raise b.stream_ended_early()
        except httpx.TransportError as e:
            raise b.transport_error(self._c._endpoint, e) from e
        finally:
            self.close()

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None

    def __enter__(self) -> ExecStream:
        self._open()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


class Files:
    """Files in the sandbox; paths are absolute paths inside it."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def write(
        self, path: str, data: b.FileData, *, mode: Optional[int] = None, parents: bool = False
    ) -> FileWritten:
        """Writes (atomically replaces) the file with ``data``: bytes, str (as UTF-8), a
        binary file object or an iterable of bytes (both streamed). ``mode`` as an int,
        e.g. ``0o755``; ``parents`` creates missing directories."""
        sb = self._sb
        op = b.file_write(sb.group, sb.id, path, b.sync_content(data), mode, parents)
        return sb._c._run(op)

    def read(self, path: str) -> bytes:
        sb = self._sb
        return sb._c._run(b.file_read(sb.group, sb.id, path))

    def list(self, path: str) -> List[FileEntry]:
        sb = self._sb
        return sb._c._run(b.file_list(sb.group, sb.id, path))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        sb = self._sb
        sb._c._run(b.file_remove(sb.group, sb.id, path, recursive))


class Process:
    """A background process of a sandbox."""

    def __init__(self, sandbox: Sandbox, proc_id: str, pid: int) -> None:
        self._sb = sandbox
        self.id = proc_id
        """The sandbox's name for it: ``p1``, ``p2``, …"""
        self.pid = pid
        """Its pid in the guest (informational)."""

    def __repr__(self) -> str:
        return f"Process(id={self.id!r}, pid={self.pid!r})"

    def kill(self, signal: int = 15) -> None:
        self._sb.processes.kill(self.id, signal)

    def wait(self, timeout: float = 30.0) -> ExecExit:
        return self._sb.processes.wait(self.id, timeout)

    def logs(self) -> ProcessLogs:
        return self._sb.processes.logs(self.id)


class Processes:
    """Background processes: they outlive the request that started them, a daemon restart and
    a suspend."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def start(
        self,
        cmd: b.Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Union[str, int, None] = None,
        timeout: Optional[float] = None,
    ) -> Process:
        sb = self._sb
        body: Dict[str, Any] = b.command_body(cmd, env, cwd, user, timeout)
        started = sb._c._run(b.proc_start(sb.group, sb.id, body))
        return Process(sb, str(started["id"]), int(started["pid"]))

    def list(self) -> List[ProcessInfo]:
        """Running processes and the newest finished ones, oldest first."""
        sb = self._sb
        return sb._c._run(b.proc_list(sb.group, sb.id))

    def kill(self, proc_id: str, signal: int = 15) -> None:
        """Signals the process's group (9 kills everything it started)."""
        sb = self._sb
        sb._c._run(b.proc_kill(sb.group, sb.id, proc_id, signal))

    def wait(self, proc_id: str, timeout: float = 30.0) -> ExecExit:
        """How the process ended; raises ``Conflict`` if it still runs after ``timeout``
        seconds (0–300; 0 only looks)."""
        sb = self._sb
        return sb._c._run(b.proc_wait(sb.group, sb.id, proc_id, timeout))

    def logs(self, proc_id: str) -> ProcessLogs:
        sb = self._sb
        return sb._c._run(b.proc_logs(sb.group, sb.id, proc_id))
