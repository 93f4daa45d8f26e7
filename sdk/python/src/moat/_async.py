"""The asynchronous client (asyncio): the same API as `Client`, awaited."""

from __future__ import annotations

import collections.abc
from types import TracebackType
from typing import (
    Any,
    AsyncIterable,
    AsyncIterator,
    Dict,
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


class AsyncClient:
    """An asyncio client of the moat daemon; arguments as for ``Client``."""

    def __init__(
        self,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: Optional[float] = b.DEFAULT_TIMEOUT,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        self._endpoint = b.endpoint(url)
        if transport is None and self._endpoint.uds is not None:
            transport = httpx.AsyncHTTPTransport(uds=self._endpoint.uds)
        self._http = httpx.AsyncClient(
            base_url=self._endpoint.base_url,
            headers=b.headers(api_key),
            verify=b.verify(self._endpoint.base_url),
            timeout=b.client_timeout(timeout),
            transport=transport,
        )
        self.groups = AsyncGroups(self)
        self.sandboxes = AsyncSandboxes(self)
        self.api_keys = AsyncApiKeys(self)
        self.snapshots = AsyncSnapshots(self)
        self.nodes = AsyncNodes(self)

    @property
    def url(self) -> str:
        return self._endpoint.url

    async def health(self) -> Health:
        return await self._run(b.health())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.aclose()

    async def _run(self, op: b.Op[T]) -> T:
        try:
            resp = await self._http.send(op.request(self._http))
        except httpx.TransportError as e:
            raise b.transport_error(self._endpoint, e) from e
        if resp.status_code >= 400:
            raise error_from_response(resp.status_code, resp.content)
        return op.parse(resp)

    async def _open(self, op: b.Op[Any]) -> httpx.Response:
        try:
            resp = await self._http.send(op.request(self._http), stream=True)
            if resp.status_code >= 400:
                try:
                    body = await resp.aread()
                finally:
                    await resp.aclose()
                raise error_from_response(resp.status_code, body)
        except httpx.TransportError as e:
            raise b.transport_error(self._endpoint, e) from e
        return resp


class AsyncGroups:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client
        self.policy = AsyncPolicies(client)
        self.secrets = AsyncSecrets(client)

    async def apply(self, name: str, spec: Optional[GroupSpec] = None) -> Group:
        return await self._c._run(b.group_apply(name, spec))

    async def get(self, name: str) -> Group:
        return await self._c._run(b.group_get(name))

    async def list(self) -> List[Group]:
        return await self._c._run(b.group_list())

    async def delete(self, name: str, *, force: bool = False) -> None:
        await self._c._run(b.group_delete(name, force))

    async def egress(
        self,
        name: str,
        *,
        sandbox: Optional[str] = None,
        verdict: Optional[Literal["allow", "deny"]] = None,
        since: Optional[str] = None,
        after: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> List[EgressEvent]:
        return await self._c._run(
            b.egress_list(f"{b.group_path(name)}/egress", sandbox, verdict, since, after, limit)
        )

    async def identity_token(
        self, name: str, sandbox_id: str, audience: str, *, ttl_s: Optional[int] = None
    ) -> Dict[str, Any]:
        return await self._c._run(b.identity_token(name, sandbox_id, audience, ttl_s))

    async def identity_events(
        self,
        name: str,
        *,
        sandbox: Optional[str] = None,
        after: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> List[Dict[str, Any]]:
        return await self._c._run(b.identity_events(name, sandbox, after, limit))


class AsyncSecrets:
    """A group's secrets; as :class:`moat.Secrets`."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def set(self, group: str, name: str, value: str) -> SecretInfo:
        return await self._c._run(b.secret_set(group, name, value))

    async def list(self, group: str) -> List[SecretInfo]:
        return await self._c._run(b.secret_list(group))

    async def delete(self, group: str, name: str) -> None:
        await self._c._run(b.secret_delete(group, name))


class AsyncPolicies:
    """A group's policy; as :class:`moat.Policies`."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def get(self, group: str) -> Dict[str, Any]:
        return await self._c._run(b.policy_get(group))

    async def apply(self, group: str, policy: Mapping[str, Any]) -> Dict[str, Any]:
        return await self._c._run(b.policy_apply(group, policy))

    async def rollback(self, group: str, version: int) -> Dict[str, Any]:
        return await self._c._run(b.policy_rollback(group, version))

    async def versions(self, group: str) -> List[Dict[str, Any]]:
        return await self._c._run(b.policy_versions(group))

    async def check(self, group: str, request: Mapping[str, Any]) -> Dict[str, Any]:
        return await self._c._run(b.policy_check(group, request))

    async def decisions(
        self,
        group: str,
        *,
        verdict: Optional[str] = None,
        since: Optional[int] = None,
        after: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> Dict[str, Any]:
        return await self._c._run(b.policy_decisions(group, verdict, since, after, limit))

    async def replay(
        self, group: str, policy: Mapping[str, Any], *, limit: Optional[int] = None
    ) -> Dict[str, Any]:
        return await self._c._run(b.policy_replay(group, policy, limit))


class AsyncApiKeys:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(
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
        return await self._c._run(b.key_create(name, role, groups, expires_in_s, rate_limit))

    async def list(self) -> List[ApiKey]:
        return await self._c._run(b.key_list())

    async def get(self, key_id: str) -> ApiKey:
        return await self._c._run(b.key_get(key_id))

    async def rotate(self, key_id: str, *, expires_in_s: Optional[int] = None) -> CreatedApiKey:
        """A new secret for the key (same id, role, groups and rate limit), shown this once;
        the old secret stops working at once. ``expires_in_s`` is needed when the key has
        expired; without it the expiry stays as it was."""
        return await self._c._run(b.key_rotate(key_id, expires_in_s))

    async def audit(
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
        return await self._c._run(b.audit_list(since, key, group, after, limit))

    async def delete(self, key_id: str) -> None:
        await self._c._run(b.key_delete(key_id))


class AsyncSandboxes:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(
        self,
        group: str,
        *,
        image: Optional[str] = None,
        tier: Optional[Tier] = None,
        env: Optional[Mapping[str, str]] = None,
        labels: Optional[Mapping[str, str]] = None,
    ) -> AsyncSandbox:
        info = await self._c._run(b.sandbox_create(group, image, tier, env, labels))
        return AsyncSandbox(self._c, info)

    async def fork(
        self,
        group: str,
        snapshot: str,
        count: int = 1,
        *,
        env: Optional[Mapping[str, str]] = None,
        labels: Optional[Mapping[str, str]] = None,
    ) -> List[AsyncSandbox]:
        infos = await self._c._run(b.sandbox_fork(group, snapshot, count, env, labels))
        return [AsyncSandbox(self._c, i) for i in infos]

    async def get(self, group: str, sandbox_id: str) -> AsyncSandbox:
        return AsyncSandbox(self._c, await self._c._run(b.sandbox_get(group, sandbox_id)))

    async def list(
        self, group: str, *, labels: Optional[Mapping[str, str]] = None
    ) -> List[AsyncSandbox]:
        return [AsyncSandbox(self._c, i) for i in await self._c._run(b.sandbox_list(group, labels))]


class AsyncNodes:
    """The daemons sharing the store (a fleet's nodes): list, get, and (admin keys) drain,
    undrain and rotate the sealing key they share."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self) -> List[Node]:
        return await self._c._run(b.node_list())

    async def get(self, name: str) -> Node:
        return await self._c._run(b.node_get(name))

    async def drain(self, name: str) -> Node:
        """The node takes no new sandboxes; those it runs stay."""
        return await self._c._run(b.node_drain(name, True))

    async def undrain(self, name: str) -> Node:
        return await self._c._run(b.node_drain(name, False))

    async def rotate_sealing_key(self) -> SealingKeyRotation:
        """Re-seals the store's secrets and signing keys with the key every node holds as
        ``MOAT_HOME/secrets.key.next`` (admin keys; made with ``moat sealing-key new``)."""
        return await self._c._run(b.sealing_key_rotate())


class AsyncSnapshots:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def get(self, group: str, name: str) -> Snapshot:
        return await self._c._run(b.snapshot_get(group, name))

    async def list(self, group: str) -> List[Snapshot]:
        return await self._c._run(b.snapshot_list(group))

    async def delete(self, group: str, name: str) -> None:
        await self._c._run(b.snapshot_delete(group, name))


class AsyncSandbox:
    """A sandbox. Deleted when an ``async with`` block around it ends."""

    def __init__(self, client: AsyncClient, info: SandboxInfo) -> None:
        self._c = client
        self.info = info
        self.files = AsyncFiles(self)
        self.processes = AsyncProcesses(self)

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
        return f"AsyncSandbox(id={self.id!r}, group={self.group!r}, state={self.state!r})"

    async def refresh(self) -> SandboxInfo:
        self.info = await self._c._run(b.sandbox_get(self.group, self.id))
        return self.info

    async def exec(
        self,
        cmd: b.Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Union[str, int, None] = None,
        stdin: Union[str, bytes, None] = None,
        timeout: Optional[float] = None,
    ) -> ExecResult:
        body = b.exec_body(cmd, env, cwd, user, stdin, timeout)
        return await self._c._run(b.exec_collect(self.group, self.id, body, timeout))

    def exec_stream(
        self,
        cmd: b.Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Union[str, int, None] = None,
        stdin: Union[str, bytes, None] = None,
        timeout: Optional[float] = None,
    ) -> AsyncExecStream:
        """``async for ev in sb.exec_stream(...)``; in an ``async with`` block to stop early."""
        body = b.exec_body(cmd, env, cwd, user, stdin, timeout)
        return AsyncExecStream(self._c, b.exec_stream(self.group, self.id, body, timeout))

    async def suspend(self) -> SandboxInfo:
        self.info = await self._c._run(b.sandbox_verb(self.group, self.id, "suspend"))
        return self.info

    async def resume(self) -> SandboxInfo:
        self.info = await self._c._run(b.sandbox_verb(self.group, self.id, "resume"))
        return self.info

    async def snapshot(self, name: str) -> Snapshot:
        return await self._c._run(b.snapshot_create(self.group, self.id, name))

    async def egress(
        self,
        *,
        verdict: Optional[Literal["allow", "deny"]] = None,
        since: Optional[str] = None,
        after: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> List[EgressEvent]:
        path = f"{b.sandbox_path(self.group, self.id)}/egress"
        return await self._c._run(b.egress_list(path, None, verdict, since, after, limit))

    async def expose_port(self, port: int) -> Port:
        """Exposes the guest's TCP ``port`` (1-65535) through the daemon: HTTP and WebSocket
        requests under the returned ``url`` reach it, with this client's API key."""
        return await self._c._run(b.port_expose(self.group, self.id, port, self._c.url))

    async def ports(self) -> List[Port]:
        """The exposed ports, lowest first."""
        return await self._c._run(b.port_list(self.group, self.id, self._c.url))

    async def close_port(self, port: int) -> None:
        """Closes an exposed port (``NotFound`` if it is not exposed)."""
        await self._c._run(b.port_close(self.group, self.id, port))

    async def delete(self) -> None:
        await self._c._run(b.sandbox_delete(self.group, self.id))

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            await self.delete()
        except NotFound:
            pass  # already deleted


class AsyncExecStream:
    """The events of a streamed exec, as ``ExecStream``, for ``async for``."""

    def __init__(self, client: AsyncClient, op: b.Op[None]) -> None:
        self._c = client
        self._op = op
        self._resp: Optional[httpx.Response] = None
        self._started = False
        self.exit: Optional[ExecExit] = None

    async def _open(self) -> httpx.Response:
        if self._resp is None:
            if self._started:
                raise RuntimeError("an exec stream can be iterated only once")
            self._started = True
            self._resp = await self._c._open(self._op)
        return self._resp

    async def _events(self) -> AsyncIterator[ExecEvent]:
        resp = await self._open()
        try:
            async for line in resp.aiter_lines():
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
            await self.aclose()

    def __aiter__(self) -> AsyncIterator[ExecEvent]:
        return self._events()

    async def aclose(self) -> None:
        if self._resp is not None:
            resp, self._resp = self._resp, None
            await resp.aclose()

    async def __aenter__(self) -> AsyncExecStream:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.aclose()


def _async_content(data: Any) -> Any:
    """As ``_base.sync_content``; an async iterable of bytes is streamed as it is, and a sync
    file or iterable is fed through an async generator (httpx's async client takes no sync
    streams)."""
    if isinstance(data, collections.abc.AsyncIterable):
        return data
    content = b.sync_content(data)
    if isinstance(content, bytes):
        return content

    async def chunks() -> AsyncIterator[bytes]:
        for chunk in content:
            yield chunk

    return chunks()


class AsyncFiles:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def write(
        self,
        path: str,
        data: Union[b.FileData, AsyncIterable[bytes]],
        *,
        mode: Optional[int] = None,
        parents: bool = False,
    ) -> FileWritten:
        sb = self._sb
        op = b.file_write(sb.group, sb.id, path, _async_content(data), mode, parents)
        return await sb._c._run(op)

    async def read(self, path: str) -> bytes:
        sb = self._sb
        return await sb._c._run(b.file_read(sb.group, sb.id, path))

    async def list(self, path: str) -> List[FileEntry]:
        sb = self._sb
        return await sb._c._run(b.file_list(sb.group, sb.id, path))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        sb = self._sb
        await sb._c._run(b.file_remove(sb.group, sb.id, path, recursive))


class AsyncProcess:
    def __init__(self, sandbox: AsyncSandbox, proc_id: str, pid: int) -> None:
        self._sb = sandbox
        self.id = proc_id
        self.pid = pid

    def __repr__(self) -> str:
        return f"AsyncProcess(id={self.id!r}, pid={self.pid!r})"

    async def kill(self, signal: int = 15) -> None:
        await self._sb.processes.kill(self.id, signal)

    async def wait(self, timeout: float = 30.0) -> ExecExit:
        return await self._sb.processes.wait(self.id, timeout)

    async def logs(self) -> ProcessLogs:
        return await self._sb.processes.logs(self.id)


class AsyncProcesses:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def start(
        self,
        cmd: b.Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Union[str, int, None] = None,
        timeout: Optional[float] = None,
    ) -> AsyncProcess:
        sb = self._sb
        body: Dict[str, Any] = b.command_body(cmd, env, cwd, user, timeout)
        started = await sb._c._run(b.proc_start(sb.group, sb.id, body))
        return AsyncProcess(sb, str(started["id"]), int(started["pid"]))

    async def list(self) -> List[ProcessInfo]:
        sb = self._sb
        return await sb._c._run(b.proc_list(sb.group, sb.id))

    async def kill(self, proc_id: str, signal: int = 15) -> None:
        sb = self._sb
        await sb._c._run(b.proc_kill(sb.group, sb.id, proc_id, signal))

    async def wait(self, proc_id: str, timeout: float = 30.0) -> ExecExit:
        sb = self._sb
        return await sb._c._run(b.proc_wait(sb.group, sb.id, proc_id, timeout))

    async def logs(self, proc_id: str) -> ProcessLogs:
        sb = self._sb
        return await sb._c._run(b.proc_logs(sb.group, sb.id, proc_id))
