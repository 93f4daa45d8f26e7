"""The egress audit through the SDK: a name the group does not allow is answered NXDOMAIN by
the sandbox's network stack, and the decision is on record for the sandbox and its group."""

from __future__ import annotations

import pytest

import moat
from conftest import eventually


def test_denied_name_is_audited(client: moat.Client, group: str) -> None:
    with client.sandboxes.create(group, labels={"sdk": "egress"}) as sb:
        r = sb.exec(
            "python3 -c \"import socket\ntry:\n socket.gethostbyname('blocked.test')\n"
            "except OSError as e:\n print('nxdomain', e)\""
        )
        assert r.stdout.startswith("nxdomain"), r

        def denied() -> bool:
            return any(e.name == "blocked.test" for e in sb.egress(verdict="deny"))

        eventually(denied, "the denied DNS query in the sandbox's audit")
        events = [e for e in sb.egress() if e.name == "blocked.test"]
        e = events[0]
        assert (e.sandbox, e.kind, e.verdict, e.rule) == (sb.id, "dns", "deny", None)
        assert "default deny" in e.reason
        assert all(x.verdict == "allow" for x in sb.egress(verdict="allow"))
        # The group's audit has it too, and `after` continues from an event.
        mine = client.groups.egress(group, sandbox=sb.id)
        assert e.id in {x.id for x in mine}
        assert all(x.id > e.id for x in client.groups.egress(group, after=e.id))
        with pytest.raises(moat.BadRequest):
            client.groups.egress(group, limit=0)
        with pytest.raises(moat.BadRequest):
            sb.egress(since="yesterday")
