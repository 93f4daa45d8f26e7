"""Nodes through the SDK: a daemon on its own store is one ready node; draining it refuses
creates (Unavailable) until it is undrained; it shows its sealing key, and a rotation without
a next key is refused saying how to make one."""

from __future__ import annotations

import pytest

import moat


def test_one_node_drains_and_undrains(client: moat.Client, group: str) -> None:
    nodes = client.nodes.list()
    assert len(nodes) == 1
    n = nodes[0]
    assert n.state == "ready" and n.epoch >= 1 and n.lease_s >= 3
    assert n.capacity.memory_mib > 0 and n.used.sandboxes >= 0
    assert client.nodes.get(n.name).advertise_url == n.advertise_url
    with pytest.raises(moat.NotFound):
        client.nodes.get("no-such-node")
    try:
        assert client.nodes.drain(n.name).state == "draining"
        with pytest.raises(moat.Unavailable, match="draining"):
            client.sandboxes.create(group)
    finally:
        assert client.nodes.undrain(n.name).state == "ready"


def test_the_sealing_key_is_shown_and_a_rotation_needs_a_next_key(client: moat.Client) -> None:
    n = client.nodes.list()[0]
    assert n.sealing_key_id is not None and len(n.sealing_key_id) == 16
    assert n.next_sealing_key_id is None
    with pytest.raises(moat.Conflict, match="moat sealing-key new"):
        client.nodes.rotate_sealing_key()
