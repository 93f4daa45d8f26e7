"""Group secrets through the SDK: set, list (names only), delete; the value never comes back,
and a transform that names a missing secret is refused with the reason."""

from __future__ import annotations

import asyncio

import pytest

import moat


def test_secrets_set_list_delete(client: moat.Client) -> None:
    g = "sdk-secrets"
    client.groups.apply(g, {"tier": "s"})
    try:
        value = "sk-sdk-test-VALUE"
        info = client.groups.secrets.set(g, "openai", value)
        assert info.name == "openai" and value not in repr(info)
        again = client.groups.secrets.set(g, "openai", value + "2")
        assert again.created_at == info.created_at
        listed = client.groups.secrets.list(g)
        assert [s.name for s in listed] == ["openai"]
        assert value not in repr(listed)
        rule: moat.EgressRule = {
            "host": "api.openai.com",
            "ports": [443],
            "transform": {"headers": {"Authorization": "Bearer ${secret:openai}"}},
        }
        spec = client.groups.apply(g, {"tier": "s", "egress": {"rules": [rule]}}).spec
        assert spec["egress"]["rules"][0]["transform"]["headers"]["Authorization"] == (
            "Bearer ${secret:openai}"
        )
        with pytest.raises(moat.BadRequest, match="no secret"):
            bad: moat.EgressRule = {**rule, "transform": {"headers": {"A": "${secret:missing}"}}}
            client.groups.apply(g, {"tier": "s", "egress": {"rules": [bad]}})
        with pytest.raises(moat.BadRequest, match="secret name"):
            client.groups.secrets.set(g, "Bad Name", "v")
        client.groups.secrets.delete(g, "openai")
        assert client.groups.secrets.list(g) == []
        with pytest.raises(moat.NotFound):
            client.groups.secrets.delete(g, "openai")
    finally:
        client.groups.delete(g, force=True)


def test_async_secrets(url: str, admin_key: str) -> None:
    async def main() -> None:
        g = "sdk-secrets-async"
        async with moat.AsyncClient(url, admin_key) as c:
            await c.groups.apply(g, {"tier": "s"})
            try:
                await c.groups.secrets.set(g, "k", "v1")
                assert [s.name for s in await c.groups.secrets.list(g)] == ["k"]
                await c.groups.secrets.delete(g, "k")
                assert await c.groups.secrets.list(g) == []
            finally:
                await c.groups.delete(g, force=True)

    asyncio.run(main())
