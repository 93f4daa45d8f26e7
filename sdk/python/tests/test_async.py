"""The asyncio client against a real daemon (asyncio.run: no test plugin needed)."""

from __future__ import annotations

import asyncio
import os
from typing import List

import pytest

import moat


def test_async_client(url: str, admin_key: str, group: str) -> None:
    async def main() -> None:
        async with moat.AsyncClient(url, admin_key) as client:
            assert (await client.health()).status == "ok"
            assert group in [g.name for g in await client.groups.list()]
            async with await client.sandboxes.create(group, labels={"sdk": "async"}) as sb:
                assert sb.state == "running"
                r = await sb.exec("echo hi; exit 2")
                assert (r.exit_code, r.stdout) == (2, "hi\n")

                # Execs run at once on one sandbox.
                outs = await asyncio.gather(*(sb.exec(["echo", str(i)]) for i in range(4)))
                assert [o.stdout for o in outs] == [f"{i}\n" for i in range(4)]

                events: List[moat.ExecEvent] = []
                async for ev in sb.exec_stream(["sh", "-c", "echo a; echo b >&2; exit 4"]):
                    events.append(ev)
                assert events[-1] == moat.ExecExit(4)
                assert (
                    "".join(
                        e.data
                        for e in events
                        if isinstance(e, moat.ExecOutput) and e.stream == "stdout"
                    )
                    == "a\n"
                )

                data = os.urandom(200_000)
                assert (await sb.files.write("/root/x", data)).created
                assert await sb.files.read("/root/x") == data
                assert [e.name for e in await sb.files.list("/root") if e.name == "x"] == ["x"]
                await sb.files.remove("/root/x")
                with pytest.raises(moat.NotFound):
                    await sb.files.read("/root/x")

                p = await sb.processes.start("echo bg; exit 3")
                assert (await p.wait()).exit_code == 3
                assert (await p.logs()).stdout == "bg\n"

                assert (await sb.suspend()).state == "suspended"
                assert (await sb.exec("echo back")).stdout == "back\n"
                assert (await sb.refresh()).state == "running"
                sb_id = sb.id
            with pytest.raises(moat.NotFound):
                await client.sandboxes.get(group, sb_id)

    asyncio.run(main())
