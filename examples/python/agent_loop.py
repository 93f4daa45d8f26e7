"""A minimal code-interpreter agent: a model writes Python, moat runs it in a sandbox, the
output goes back to the model, until the model answers.

The "model" here is a scripted stand-in (no API key needed); replace `ScriptedModel.next` with
a call to a real model (see PLUG A REAL MODEL HERE below). Run it against a local daemon:

    MOAT_API_KEY=moat_… python3 examples/python/agent_loop.py

(`pip install ./sdk/python` first; MOAT_URL defaults to http://127.0.0.1:7070.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

from moat import Client

GROUP = os.environ.get("MOAT_EXAMPLE_GROUP", "examples")
TASK = "What is the sum of the squares of the primes below 100?"


@dataclass
class Turn:
    """One message of the conversation: the model's code, or what running it printed."""

    role: str  # "model" or "tool"
    content: str


@dataclass
class Reply:
    code: Optional[str] = None  # Python to run, or…
    answer: Optional[str] = None  # …the final answer.


class ScriptedModel:
    """Stands in for a model: first it explores, then it computes, then it answers from what
    the sandbox printed."""

    def next(self, task: str, history: List[Turn]) -> Reply:
        # ---- PLUG A REAL MODEL HERE -------------------------------------------------------
        # Send `task` and `history` to your model (with a tool that takes Python code) and
        # turn its answer into Reply(code=…) or Reply(answer=…).
        # ------------------------------------------------------------------------------------
        step = sum(1 for t in history if t.role == "model")
        if step == 0:
            return Reply(code="import sys, platform\nprint(sys.version.split()[0], platform.machine())")
        if step == 1:
            return Reply(
                code=(
                    "primes = [n for n in range(2, 100) if all(n % d for d in range(2, int(n**0.5) + 1))]\n"
                    "print(len(primes), sum(p * p for p in primes))"
                )
            )
        count, total = history[-1].content.split()
        return Reply(answer=f"There are {count} primes below 100; the sum of their squares is {total}.")


def main() -> None:
    client = Client()
    client.groups.apply(GROUP, {"tier": "s"})
    model = ScriptedModel()
    history: List[Turn] = []
    # One sandbox for the whole conversation, so that files and installed packages persist
    # between steps; deleted when the block ends.
    with client.sandboxes.create(GROUP, labels={"example": "agent-loop"}) as sb:
        for _ in range(10):  # never let a model loop forever
            reply = model.next(TASK, history)
            if reply.answer is not None:
                print(f"answer: {reply.answer}")
                return
            assert reply.code is not None
            history.append(Turn("model", reply.code))
            print(f"--- model runs:\n{reply.code}")
            result = sb.exec(["python3", "-"], stdin=reply.code, timeout=60)
            output = result.stdout + result.stderr
            if result.exit_code != 0:
                output += f"\n(exit code {result.exit_code})"
            print(f"--- sandbox says:\n{output.rstrip()}")
            history.append(Turn("tool", output.strip()))
    raise SystemExit("the model did not answer within 10 steps")


if __name__ == "__main__":
    main()
