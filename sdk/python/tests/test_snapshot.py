"""Snapshots and forks through the SDK."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import httpx
import pytest

import moat


def test_snapshot_and_fork(client: moat.Client, group: str) -> None:
    with client.sandboxes.create(group, labels={"sdk": "snapshot"}) as sb:
        sb.files.write("/root/state", b"kept")
        snap = sb.snapshot("sdk-snap")
        assert (snap.name, snap.group, snap.sandbox, snap.tier) == ("sdk-snap", group, sb.id, "s")
        assert snap.size_bytes > 0 and snap.image == sb.info.image
        assert sb.exec("cat /root/state").stdout == "kept"  # it runs on
        with pytest.raises(moat.Conflict):
            sb.snapshot("sdk-snap")  # the name is taken
    assert client.snapshots.get(group, "sdk-snap") == snap
    assert [s.name for s in client.snapshots.list(group)] == ["sdk-snap"]

    forks = client.sandboxes.fork(group, "sdk-snap", 2, labels={"sdk": "fork"})
    try:
        assert len({f.id for f in forks}) == 2
        uuids = set()
        for f in forks:
            assert f.exec("cat /root/state").stdout == "kept"
            uuids.add(f.exec("cat /proc/sys/kernel/random/uuid").stdout)
        assert len(uuids) == 2  # fresh entropy in each fork
    finally:
        for f in forks:
            f.delete()
    client.snapshots.delete(group, "sdk-snap")
    with pytest.raises(moat.NotFound):
        client.snapshots.get(group, "sdk-snap")


def test_snapshot_types_match_the_openapi_document(url: str) -> None:
    schemas: Dict[str, Any] = httpx.get(f"{url}/openapi.json", timeout=30).json()["components"][
        "schemas"
    ]
    fields = {f.name for f in dataclasses.fields(moat.Snapshot)} - {"raw"}
    assert set(schemas["Snapshot"]["properties"]) == fields
    assert {"from_snapshot", "count"} <= set(schemas["CreateSandbox"]["properties"])
