"""Try three solutions in parallel: prepare a sandbox once, snapshot it, fork it three ways
(memory, processes and files as they were) and run one candidate fix in each fork at the same
time; keep the one whose tests pass.

    MOAT_API_KEY=moat_… python3 examples/python/fork_three_ways.py
"""

from __future__ import annotations

import asyncio
import os
import time

from moat import AsyncClient

GROUP = os.environ.get("MOAT_EXAMPLE_GROUP", "examples")

# The project in the sandbox: a function with a bug, and its tests.
BUGGY = "def median(xs):\n    return sorted(xs)[len(xs) // 2]\n"
TESTS = """from stats import median
assert median([3, 1, 2]) == 2
assert median([4, 1, 3, 2]) == 2.5, median([4, 1, 3, 2])
assert median([5]) == 5
print("tests pass")
"""

# Three candidate fixes, as three attempts of an agent might propose them.
CANDIDATES = {
    "average-middle": (
        "def median(xs):\n    s = sorted(xs)\n    n = len(s)\n"
        "    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2\n"
    ),
    "upper-middle": "def median(xs):\n    s = sorted(xs)\n    return s[(len(s) + 1) // 2 - 1]\n",
    "statistics": "import statistics\n\ndef median(xs):\n    return statistics.median(xs)\n",
}


async def attempt(sb, name: str, code: str) -> tuple[str, bool, str]:
    await sb.files.write("/work/stats.py", code)
    r = await sb.exec(["python3", "test_stats.py"], cwd="/work", timeout=60)
    return name, r.exit_code == 0, (r.stdout + r.stderr).strip().splitlines()[-1]


async def main() -> None:
    async with AsyncClient() as client:
        await client.groups.apply(GROUP, {"tier": "s"})
        base = await client.sandboxes.create(GROUP, labels={"example": "fork"})
        snapshot = f"fork-example-{int(time.time())}"
        forks = []
        try:
            await base.files.write("/work/stats.py", BUGGY, parents=True)
            await base.files.write("/work/test_stats.py", TESTS)
            await base.snapshot(snapshot)
            forks = await client.sandboxes.fork(GROUP, snapshot, count=len(CANDIDATES))
            print(f"forked {base.id} three ways: {', '.join(f.id for f in forks)}")
            results = await asyncio.gather(
                *(attempt(sb, n, c) for sb, (n, c) in zip(forks, CANDIDATES.items()))
            )
            for name, ok, last in results:
                print(f"{'PASS' if ok else 'fail'}  {name}: {last}")
            winners = [name for name, ok, _ in results if ok]
            print(f"keep: {', '.join(winners) or 'none'}")
        finally:
            for sb in [base, *forks]:
                await sb.delete()
            await client.snapshots.delete(GROUP, snapshot)


if __name__ == "__main__":
    asyncio.run(main())
