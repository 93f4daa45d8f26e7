"""Exposed ports through the SDK: expose, list, close, and the daemon's refusals."""

from __future__ import annotations

import pytest

import moat


def test_expose_list_and_close_ports(client: moat.Client, group: str) -> None:
    with client.sandboxes.create(group, labels={"sdk": "ports"}) as sb:
        assert sb.ports() == []
        p = sb.expose_port(8080)
        assert p.port == 8080
        assert p.url == f"{client.url.rstrip('/')}/v1/sandbox-groups/{group}/sandboxes/{sb.id}/ports/8080/"
        assert p.raw["url"].startswith("/v1/")
        sb.expose_port(80)
        assert [q.port for q in sb.ports()] == [80, 8080]
        with pytest.raises(moat.Conflict):
            sb.expose_port(8080)
        for bad in (0, 65536):
            with pytest.raises(moat.BadRequest):
                sb.expose_port(bad)
        sb.close_port(8080)
        assert [q.port for q in sb.ports()] == [80]
        with pytest.raises(moat.NotFound):
            sb.close_port(8080)


def test_async_ports(url: str, admin_key: str, group: str) -> None:
    import asyncio

    async def main() -> None:
        async with moat.AsyncClient(url, admin_key) as c:
            sb = await c.sandboxes.create(group, labels={"sdk": "ports-async"})
            try:
                p = await sb.expose_port(9000)
                assert p.url.endswith(f"/sandboxes/{sb.id}/ports/9000/")
                assert [q.port for q in await sb.ports()] == [9000]
                await sb.close_port(9000)
                assert await sb.ports() == []
            finally:
                await sb.delete()

    asyncio.run(main())
