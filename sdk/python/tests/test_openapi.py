"""The SDK's types against the daemon's own OpenAPI document: a field or value the daemon adds
or renames must show up here, not as a silently missing attribute."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, Set, get_args

import httpx
import pytest

import moat

# Fields the SDK adds itself: `created` comes from the status (201/200), `raw` keeps the object.
SDK_ONLY = {"created", "raw"}

RESPONSES = {
    "ApiKey": moat.ApiKey,
    "CreatedApiKey": moat.CreatedApiKey,
    "Sandbox": moat.SandboxInfo,
    "SandboxHealth": moat.SandboxHealth,
    "ExecResult": moat.ExecResult,
    "ExecExit": moat.ExecExit,
    "FileEntry": moat.FileEntry,
    "FileWritten": moat.FileWritten,
    "Group": moat.Group,
    "GroupStatus": moat.GroupStatus,
    "Health": moat.Health,
    "SandboxesHealth": moat.SandboxesHealth,
    "Process": moat.ProcessInfo,
    "ProcessExit": moat.ProcessExit,
    "ProcessLogs": moat.ProcessLogs,
    "EgressEvent": moat.EgressEvent,
    "SecretInfo": moat.SecretInfo,
    "Node": moat.Node,
    "NodeCapacity": moat.NodeCapacity,
    "NodeUse": moat.NodeUse,
    "DrainProgress": moat.DrainProgress,
    "DrainMove": moat.DrainMove,
    "DrainFailure": moat.DrainFailure,
}

SPECS = {
    "GroupSpec": moat.GroupSpec,
    "PoolSpec": moat.PoolSpec,
    "PlacementSpec": moat.PlacementSpec,
    "LifecycleSpec": moat.LifecycleSpec,
    "EgressSpec": moat.EgressSpec,
    "EgressRule": moat.EgressRule,
    "EgressTransform": moat.EgressTransform,
}

ENUMS = {
    "Tier": moat.Tier,
    "Role": moat.Role,
    "SandboxState": moat.SandboxState,
    "EntryKind": moat.FileKind,
    "SandboxesState": moat.SandboxesState,
    "SetupStep": moat.SetupStep,
    "NodeState": moat.NodeState,
    "PlacementStrategy": moat.PlacementStrategy,
}

# Request fields that a method takes under another name.
RENAMED = {"argv": "cmd", "command": "cmd", "timeout_s": "timeout"}
REQUESTS: Dict[str, Callable[..., Any]] = {
    "CreateSandbox": moat.Sandboxes.create,
    "ExecRequest": moat.Sandbox.exec,
    "StartProcess": moat.Processes.start,
    "CreateApiKey": moat.ApiKeys.create,
}


@pytest.fixture(scope="module")
def schemas(url: str) -> Dict[str, Any]:
    doc = httpx.get(f"{url}/openapi.json", timeout=30).json()
    return dict(doc["components"]["schemas"])


def props(schemas: Dict[str, Any], name: str) -> Set[str]:
    return set(schemas[name].get("properties", {}))


# A CreatedApiKey is an ApiKey: the fields the create answer does not carry are None in it.
INHERITED = {"CreatedApiKey": {"last_used_at", "rotated_at"}}


@pytest.mark.parametrize("name", sorted(RESPONSES))
def test_response_types(schemas: Dict[str, Any], name: str) -> None:
    fields = {f.name for f in dataclasses.fields(RESPONSES[name])} - SDK_ONLY
    fields -= INHERITED.get(name, set())
    assert props(schemas, name) == fields


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_types(schemas: Dict[str, Any], name: str) -> None:
    assert props(schemas, name) == set(SPECS[name].__annotations__)


@pytest.mark.parametrize("name", sorted(ENUMS))
def test_enums(schemas: Dict[str, Any], name: str) -> None:
    assert set(schemas[name]["enum"]) == set(get_args(ENUMS[name]))


# A create from a snapshot is `Sandboxes.fork` (test_snapshot.py).
FORK_FIELDS = {"from_snapshot", "count"}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_request_bodies(schemas: Dict[str, Any], name: str) -> None:
    params = set(inspect.signature(REQUESTS[name]).parameters) - {"self", "group"}
    assert {RENAMED.get(p, p) for p in props(schemas, name) - FORK_FIELDS} == params
