"""The API's objects as Python types, and their parsing from the daemon's JSON.

Requests use TypedDicts (plain dicts that a type checker understands); answers are frozen
dataclasses. Parsing ignores fields it does not know, so a newer daemon does not break an
older SDK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Mapping, Optional, TypedDict, Union

Tier = Literal["xs", "s", "m", "l", "xl"]
Role = Literal["reader", "user", "owner", "admin"]
SandboxState = Literal[
    "creating", "running", "suspending", "suspended", "resuming", "deleting", "failed", "lost"
]
NodeState = Literal["ready", "draining", "lost"]
FileKind = Literal["file", "dir", "symlink", "other"]
SandboxesState = Literal["ready", "preparing", "failed", "unavailable"]
SetupStep = Literal["kernel", "base_image", "initramfs"]


class PoolSpec(TypedDict, total=False):
    size: int


class LifecycleSpec(TypedDict, total=False):
    idle_timeout_s: Optional[int]
    on_idle: Literal["suspend", "delete"]
    suspended_ttl_s: Optional[int]
    max_lifetime_s: Optional[int]


class EgressTransform(TypedDict, total=False):
    """Headers set on a host's HTTPS requests (``${secret:NAME}`` in values), optionally only
    on some ``paths`` and ``methods`` (see docs/NETWORK.md, "Secrets and injection")."""

    headers: Dict[str, str]
    paths: List[str]
    methods: List[str]
    upgrade_to_https: bool


class EgressRule(TypedDict, total=False):
    """One rule: exactly one of ``host`` (a name, or ``*.suffix``) and ``cidr`` (IPv4)."""

    host: str
    cidr: str
    ports: List[int]
    protocol: Literal["tcp", "udp"]
    action: Literal["allow", "deny"]
    transform: EgressTransform


class EgressSpec(TypedDict, total=False):
    """A group's egress policy: the first rule that matches decides, else ``default``."""

    default: Literal["deny", "allow"]
    rules: List[EgressRule]


class NetworkLimits(TypedDict, total=False):
    """A group's per-sandbox network limits; an absent key keeps its default (docs/API.md)."""

    max_flows: int
    new_flows_per_s: int
    dns_qps: int
    bandwidth: int
    """Bytes per second across a sandbox's TCP flows, both directions together."""
class IdentitySpec(TypedDict, total=False):
    """A group's workload identity (docs/IDENTITY.md): off unless ``enabled``; tokens only
    for ``audiences``; ``ttl_s`` 60–3600; ``subject`` names the group or each sandbox;
    ``in_guest`` lets guest code fetch tokens itself."""

    enabled: bool
    audiences: List[str]
    ttl_s: int
    subject: Literal["group", "sandbox"]
    in_guest: bool


PlacementStrategy = Literal["spread", "pack"]


class PlacementSpec(TypedDict, total=False):
    """Which nodes of a fleet run a group's sandboxes (docs/FLEET.md, "Placement"): only
    nodes with every label of ``node_labels``; ``spread`` (default) or ``pack``."""

    node_labels: Dict[str, str]
    strategy: PlacementStrategy


class GroupSpec(TypedDict, total=False):
    """A group's settings; every field is optional (see docs/API.md, "GroupSpec")."""

    image: str
    tier: Tier
    pool: PoolSpec
    lifecycle: LifecycleSpec
    egress: EgressSpec
    network_limits: NetworkLimits
    labels: Dict[str, str]
    identity: IdentitySpec
    placement: PlacementSpec


@dataclass(frozen=True)
class SandboxesHealth:
    """Whether the daemon can run sandboxes yet: one on a fresh MOAT_HOME prepares them first."""

    state: SandboxesState
    message: str
    """What the daemon is doing, or what went wrong and what to do."""
    step: Optional[SetupStep]
    """The preparation step running (``preparing``) or that failed (``failed``)."""
    steps_done: int
    steps_total: int
    attempt: int
    retry_after_s: Optional[int]
    """Seconds until the next attempt (``failed``)."""


@dataclass(frozen=True)
class Health:
    status: str
    version: str
    sandboxes: Optional[SandboxesHealth]
    """None from a daemon older than this part of ``/healthz``."""
    jail: Optional[str] = None
    """Whether QEMU and the network stacks run jailed and what the host offers the jail
    (``on: uids …, namespaces …, seccomp, cgroup v2`` or ``off (…)``); None until the sandbox
    runtime is ready."""


@dataclass(frozen=True)
class GroupStatus:
    pool_ready: int
    """Ready VMs in the group's warm pool right now (fewer than ``pool.size`` while it refills)."""


@dataclass(frozen=True)
class Group:
    name: str
    spec: GroupSpec
    """The stored spec, every default filled in."""
    created_at: str
    updated_at: str
    status: GroupStatus
    """Read from the daemon when it answered, not stored."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: Role
    groups: List[str]
    prefix: str
    """The key's first characters (``moat_`` + 8), to recognise it."""
    created_at: str
    expires_at: Optional[str] = None
    """When the key stops working (RFC 3339, UTC); None: never."""
    last_used_at: Optional[str] = None
    """Its last use, to within a minute; None: never used (not shown on a create)."""
    rotated_at: Optional[str] = None
    rate_limit: Optional[RateLimit] = None
    """The key's own rate limit; None: the daemon's."""


@dataclass(frozen=True)
class SecretInfo:
    """A group secret as listed: never its value."""

    name: str
    created_at: str
    updated_at: str


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``per_s`` requests a second on average, bursts of up to ``burst``."""

    per_s: int
    burst: int


@dataclass(frozen=True)
class AuditEvent:
    """One mutating API call (``GET /v1/audit``): never a request body."""

    n: int
    at: str
    key_id: Optional[str]
    """None: the call carried no valid key."""
    action: str
    """``METHOD /route/{template}``."""
    target: str
    group: Optional[str]
    status: int
    request_id: str


@dataclass(frozen=True)
class CreatedApiKey(ApiKey):
    key: str = ""
    """The secret: shown only in the answer to the create or rotation."""


@dataclass(frozen=True)
class SandboxHealth:
    """Whether a running sandbox's agent answers: ``agent`` is ``ok`` or ``unresponsive`` (the
    daemon is then reconnecting, and requests answer 502 meanwhile)."""

    agent: str
    reason: Optional[str] = None
    """What was seen (``unresponsive`` only)."""
    since: Optional[str] = None
    """Since when (RFC 3339, UTC; ``unresponsive`` only)."""


@dataclass(frozen=True)
class SandboxInfo:
    id: str
    group: str
    state: SandboxState
    image: str
    """Manifest digest of the image it runs."""
    tier: Tier
    env: Dict[str, str]
    labels: Dict[str, str]
    created_at: str
    updated_at: str
    reason: Optional[str] = None
    """Why the sandbox is ``failed`` or ``lost``."""
    node: Optional[str] = None
    """The node that runs it (``client.nodes.get``)."""
    last_activity_at: Optional[str] = None
    """The end of its last exec, file transfer or shell, for the idle timer."""
    health: Optional[SandboxHealth] = None
    """Whether its agent answers; present while the sandbox is running."""


@dataclass(frozen=True)
class ExecResult:
    """How an exec ended, with its whole output (UTF-8; invalid bytes become U+FFFD)."""

    exit_code: int
    """As a shell reports it: the code, 128+N after signal N, 124 after the timeout, 127 when
    the command does not exist."""
    stdout: str
    stderr: str
    signal: Optional[int] = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class ExecExit:
    """The last event of a streamed exec (and the answer of a process wait)."""

    exit_code: int
    signal: Optional[int] = None
    timed_out: bool = False


@dataclass(frozen=True)
class ExecOutput:
    """A piece of a streamed exec's output, as the process wrote it."""

    stream: Literal["stdout", "stderr"]
    data: str


ExecEvent = Union[ExecOutput, ExecExit]


@dataclass(frozen=True)
class FileWritten:
    path: str
    size: int
    """Bytes the daemon received and wrote."""
    created: bool
    """True when there was no file at ``path`` before (201), False when one was replaced."""


@dataclass(frozen=True)
class FileEntry:
    name: str
    kind: FileKind
    size: int
    mode: str
    """Permission bits in octal, e.g. ``"0644"``."""
    mtime: str
    link_target: Optional[str] = None


@dataclass(frozen=True)
class ProcessExit:
    code: Optional[int]
    """The exit code, when it exited by itself."""
    signal: Optional[int]
    timed_out: bool


@dataclass(frozen=True)
class ProcessInfo:
    id: str
    pid: int
    argv: List[str]
    running: bool
    exit: Optional[ProcessExit]
    started_at: str


@dataclass(frozen=True)
class ProcessLogs:
    """The newest 1 MiB of each stream, as the guest kept it."""

    stdout: str
    stderr: str


@dataclass(frozen=True)
class NodeCapacity:
    """What a node's sandboxes may hold together."""

    memory_mib: int
    vcpus: float


@dataclass(frozen=True)
class NodeUse:
    """What a node's sandboxes and pool VMs hold, as of its last lease renewal."""

    memory_mib: int
    vcpus: float
    sandboxes: int


@dataclass(frozen=True)
class DrainMove:
    """A sandbox a draining node moved to another node by live migration."""

    sandbox: str
    node: str
    """The node it runs on now."""
    pause_ms: int
    """From QEMU stopping the guest on the old node to the hand-over."""
    total_ms: int
    """From the start of the move to the hand-over: requests wait this long at most."""
    disk: str | None = None
    """How its disk travelled: "top" (its own layer; the node had the file under it) or
    "full" (the whole disk)."""


@dataclass(frozen=True)
class DrainFailure:
    """A sandbox a draining node could not move: it runs on there."""

    sandbox: str
    reason: str


@dataclass(frozen=True)
class DrainProgress:
    """How a draining node's moving of its running sandboxes goes."""

    running_left: int
    moved: List[DrainMove]
    failed: List[DrainFailure]
    done: bool
    moving: Optional[str] = None
    """The sandbox being moved now."""


@dataclass(frozen=True)
class Node:
    """A daemon sharing the store (a fleet's node): its lease, capacity and use."""

    name: str
    advertise_url: str
    """How other nodes and clients reach it."""
    accelerator: str
    labels: Dict[str, str]
    state: NodeState
    epoch: int
    """Grows each time the node takes its lease."""
    lease_s: int
    lease_expires_at: str
    acquired_at: str
    capacity: NodeCapacity
    used: NodeUse
    shared_storage: bool
    """Started with --shared-dir: another node takes its suspends over when it is lost or drains."""
    suspended_local: int
    """Its suspended sandboxes whose files are on its own disk: no other node can resume them."""
    lost_at: Optional[str] = None
    lost_reason: Optional[str] = None
    drain: Optional[DrainProgress] = None
    """While it drains: how moving its running sandboxes away goes."""
    sealing_key_id: Optional[str] = None
    """The id of its sealing key (names the key, reveals nothing of it)."""
    next_sealing_key_id: Optional[str] = None
    """The id of the key in its ``secrets.key.next``: what a rotation switches to."""
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The whole object the daemon answered (fields this SDK does not name yet included)."""


@dataclass(frozen=True)
class SealingKeyRotation:
    """What ``nodes.rotate_sealing_key()`` re-sealed, and with which key."""

    key_id: str
    previous_key_id: str
    secrets: int
    signing_keys: int


@dataclass(frozen=True)
class Snapshot:
    """A named snapshot (memory and disk) of a sandbox, scoped to its group."""

    name: str
    group: str
    sandbox: str
    """Id of the sandbox it was taken from (which may since have been deleted)."""
    image: str
    tier: Tier
    size_bytes: int
    """Bytes it takes on the host."""
    created_at: str
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The whole object the daemon answered (fields this SDK does not name yet included)."""


@dataclass(frozen=True)
class EgressEvent:
    """One decision of a sandbox's network stack: a DNS answer, or a connection (recorded when
    it ends, with its bytes)."""

    id: int
    """Increases with every stored event: pass it as ``after`` to follow the audit."""
    time: str
    sandbox: str
    kind: Literal["dns", "tcp", "udp"]
    name: Optional[str]
    address: Optional[str]
    port: Optional[int]
    verdict: Literal["allow", "deny"]
    rule: Optional[int]
    """Index of the deciding rule in the group's ``egress.rules`` (None: the default, or a
    check outside the rules such as the floor)."""
    reason: str
    bytes_sent: int
    bytes_received: int
    duration_ms: int


@dataclass(frozen=True)
class Port:
    """A port of a sandbox exposed through the daemon: HTTP and WebSocket requests under
    ``url`` (with the same API key) reach it."""

    port: int
    url: str
    """The proxy's absolute URL on the daemon (the API gives its path); a request to
    ``url + "a/b?q"`` reaches the guest as ``/a/b?q``."""
    created_at: str
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The whole object the daemon answered (fields this SDK does not name yet included)."""


# ---- parsing ----


def _opt_int(v: Any) -> Optional[int]:
    return None if v is None else int(v)


def parse_health(d: Mapping[str, Any]) -> Health:
    sb = d.get("sandboxes")
    return Health(
        status=str(d["status"]),
        version=str(d["version"]),
        sandboxes=None
        if sb is None
        else SandboxesHealth(
            state=sb["state"],
            message=str(sb["message"]),
            step=sb.get("step"),
            steps_done=int(sb["steps_done"]),
            steps_total=int(sb["steps_total"]),
            attempt=int(sb["attempt"]),
            retry_after_s=_opt_int(sb.get("retry_after_s")),
        ),
        jail=d.get("jail"),
    )


def parse_group(d: Mapping[str, Any]) -> Group:
    return Group(
        name=str(d["name"]),
        spec=d["spec"],
        created_at=str(d["created_at"]),
        updated_at=str(d["updated_at"]),
        status=GroupStatus(pool_ready=int((d.get("status") or {}).get("pool_ready", 0))),
    )


def parse_api_key(d: Mapping[str, Any]) -> ApiKey:
    rate = d.get("rate_limit")
    return ApiKey(
        id=str(d["id"]),
        name=str(d["name"]),
        role=d["role"],
        groups=[str(g) for g in d["groups"]],
        prefix=str(d["prefix"]),
        created_at=str(d["created_at"]),
        expires_at=d.get("expires_at"),
        last_used_at=d.get("last_used_at"),
        rotated_at=d.get("rotated_at"),
        rate_limit=RateLimit(per_s=int(rate["per_s"]), burst=int(rate["burst"])) if rate else None,
    )


def parse_audit_event(d: Mapping[str, Any]) -> AuditEvent:
    return AuditEvent(
        n=int(d["n"]),
        at=str(d["at"]),
        key_id=d.get("key_id"),
        action=str(d["action"]),
        target=str(d["target"]),
        group=d.get("group"),
        status=int(d["status"]),
        request_id=str(d["request_id"]),
    )


def parse_secret(d: Mapping[str, Any]) -> SecretInfo:
    return SecretInfo(
        name=str(d["name"]), created_at=str(d["created_at"]), updated_at=str(d["updated_at"])
    )


def parse_created_api_key(d: Mapping[str, Any]) -> CreatedApiKey:
    k = parse_api_key(d)
    return CreatedApiKey(
        id=k.id,
        name=k.name,
        role=k.role,
        groups=k.groups,
        prefix=k.prefix,
        created_at=k.created_at,
        expires_at=k.expires_at,
        rate_limit=k.rate_limit,
        key=str(d["key"]),
    )


def parse_sandbox(d: Mapping[str, Any]) -> SandboxInfo:
    return SandboxInfo(
        id=str(d["id"]),
        group=str(d["group"]),
        state=d["state"],
        image=str(d["image"]),
        tier=d["tier"],
        env=dict(d.get("env") or {}),
        labels=dict(d.get("labels") or {}),
        created_at=str(d["created_at"]),
        updated_at=str(d["updated_at"]),
        reason=d.get("reason"),
        node=d.get("node"),
        last_activity_at=d.get("last_activity_at"),
        health=_health(d.get("health")),
    )


def _health(h: Any) -> Optional[SandboxHealth]:
    if not isinstance(h, Mapping):
        return None
    return SandboxHealth(agent=str(h["agent"]), reason=h.get("reason"), since=h.get("since"))


def parse_egress_event(d: Mapping[str, Any]) -> EgressEvent:
    return EgressEvent(
        id=int(d["id"]),
        time=str(d["time"]),
        sandbox=str(d["sandbox"]),
        kind=d["kind"],
        name=d.get("name"),
        address=d.get("address"),
        port=_opt_int(d.get("port")),
        verdict=d["verdict"],
        rule=_opt_int(d.get("rule")),
        reason=str(d["reason"]),
        bytes_sent=int(d["bytes_sent"]),
        bytes_received=int(d["bytes_received"]),
        duration_ms=int(d["duration_ms"]),
    )


def parse_exec_result(d: Mapping[str, Any]) -> ExecResult:
    return ExecResult(
        exit_code=int(d["exit_code"]),
        stdout=str(d["stdout"]),
        stderr=str(d["stderr"]),
        signal=_opt_int(d.get("signal")),
        timed_out=bool(d.get("timed_out", False)),
    )


def parse_exec_exit(d: Mapping[str, Any]) -> ExecExit:
    return ExecExit(
        exit_code=int(d["exit_code"]),
        signal=_opt_int(d.get("signal")),
        timed_out=bool(d.get("timed_out", False)),
    )


def parse_file_entry(d: Mapping[str, Any]) -> FileEntry:
    return FileEntry(
        name=str(d["name"]),
        kind=d["kind"],
        size=int(d["size"]),
        mode=str(d["mode"]),
        mtime=str(d["mtime"]),
        link_target=d.get("link_target"),
    )


def parse_process(d: Mapping[str, Any]) -> ProcessInfo:
    e = d.get("exit")
    return ProcessInfo(
        id=str(d["id"]),
        pid=int(d["pid"]),
        argv=[str(a) for a in d["argv"]],
        running=bool(d["running"]),
        exit=None
        if e is None
        else ProcessExit(
            code=_opt_int(e.get("code")),
            signal=_opt_int(e.get("signal")),
            timed_out=bool(e.get("timed_out", False)),
        ),
        started_at=str(d["started_at"]),
    )


def parse_snapshot(d: Mapping[str, Any]) -> Snapshot:
    return Snapshot(
        name=str(d["name"]),
        group=str(d["group"]),
        sandbox=str(d["sandbox"]),
        image=str(d["image"]),
        tier=d["tier"],
        size_bytes=int(d["size_bytes"]),
        created_at=str(d["created_at"]),
        raw=dict(d),
    )


def parse_node(d: Mapping[str, Any]) -> Node:
    cap, used = d["capacity"], d["used"]
    return Node(
        name=str(d["name"]),
        advertise_url=str(d["advertise_url"]),
        accelerator=str(d["accelerator"]),
        labels=dict(d.get("labels") or {}),
        state=d["state"],
        epoch=int(d["epoch"]),
        lease_s=int(d["lease_s"]),
        lease_expires_at=str(d["lease_expires_at"]),
        acquired_at=str(d["acquired_at"]),
        capacity=NodeCapacity(memory_mib=int(cap["memory_mib"]), vcpus=float(cap["vcpus"])),
        used=NodeUse(
            memory_mib=int(used["memory_mib"]),
            vcpus=float(used["vcpus"]),
            sandboxes=int(used["sandboxes"]),
        ),
        shared_storage=bool(d["shared_storage"]),
        suspended_local=int(d["suspended_local"]),
        lost_at=d.get("lost_at"),
        lost_reason=d.get("lost_reason"),
        drain=parse_drain(d["drain"]) if d.get("drain") else None,
        sealing_key_id=d.get("sealing_key_id"),
        next_sealing_key_id=d.get("next_sealing_key_id"),
        raw=dict(d),
    )


def parse_drain(d: Mapping[str, Any]) -> DrainProgress:
    return DrainProgress(
        running_left=int(d["running_left"]),
        moved=[
            DrainMove(
                sandbox=str(m["sandbox"]),
                node=str(m["node"]),
                pause_ms=int(m["pause_ms"]),
                total_ms=int(m["total_ms"]),
                disk=m.get("disk"),
            )
            for m in d.get("moved") or []
        ],
        failed=[
            DrainFailure(sandbox=str(f["sandbox"]), reason=str(f["reason"]))
            for f in d.get("failed") or []
        ],
        done=bool(d["done"]),
        moving=d.get("moving"),
    )


def parse_sealing_key_rotation(d: Mapping[str, Any]) -> SealingKeyRotation:
    return SealingKeyRotation(
        key_id=str(d["key_id"]),
        previous_key_id=str(d["previous_key_id"]),
        secrets=int(d["secrets"]),
        signing_keys=int(d["signing_keys"]),
    )


def parse_port(d: Mapping[str, Any], base_url: str) -> Port:
    return Port(
        port=int(d["port"]),
        url=base_url.rstrip("/") + str(d["url"]),
        created_at=str(d["created_at"]),
        raw=dict(d),
    )
