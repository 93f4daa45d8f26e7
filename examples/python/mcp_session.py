"""An MCP client session with moat's MCP server, as an agent framework would hold one: the
official MCP Python SDK starts `moat mcp` on stdio, lists the tools, runs code, moves a file.
The session's sandbox is created on the first call and deleted when the session ends.

    pip install mcp==2.3.0
    MOAT_API_KEY=moat_… python3 examples/python/mcp_session.py

MOAT_BIN names the moat binary (default: `moat` on PATH). To use the daemon's /mcp over HTTP
instead, see docs/MCP.md.
"""

from __future__ import annotations

import asyncio
import os

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

GROUP = os.environ.get("MOAT_EXAMPLE_GROUP", "examples")


async def call(session: ClientSession, tool: str, args: dict) -> dict:
    r = await session.call_tool(tool, args)
    if r.is_error:
        raise SystemExit(f"{tool} failed: {' '.join(c.text for c in r.content)}")
    return r.structured_content


async def main() -> None:
    params = StdioServerParameters(
        command=os.environ.get("MOAT_BIN", "moat"),
        args=["mcp", "--group", GROUP],
        env={
            "MOAT_URL": os.environ.get("MOAT_URL", "http://127.0.0.1:7070"),
            "MOAT_API_KEY": os.environ["MOAT_API_KEY"],
        },
    )
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            print(f"server: {init.server_info.name} {init.server_info.version}")
            tools = (await session.list_tools()).tools
            print(f"tools: {', '.join(sorted(t.name for t in tools))}")

            out = await call(session, "run_code", {
                "language": "python",
                "code": "import json\njson.dump({'squares': [n * n for n in range(5)]}, open('out.json', 'w'))\nprint('wrote out.json')",
            })
            print(f"run_code in {out['sandbox']}: exit {out['exit_code']}, {out['stdout'].strip()}, "
                  f"files produced: {[f['path'] for f in out['files_produced']]}")

            await call(session, "write_file", {"path": "/workspace/notes.txt", "content": "from the MCP client\n"})
            out = await call(session, "run_code", {"language": "shell", "code": "cat out.json; echo; wc -c < notes.txt"})
            print(f"shell: {out['stdout'].strip()}")
            out = await call(session, "read_file", {"path": "/workspace/out.json"})
            print(f"read_file: {out}")
    print("session closed: its sandbox is deleted")


if __name__ == "__main__":
    asyncio.run(main())
