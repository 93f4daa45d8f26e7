"""Typed errors from a real daemon: the status, the code and the daemon's own message."""

from __future__ import annotations

import pytest

import moat


def test_not_found(client: moat.Client, group: str) -> None:
    with pytest.raises(moat.NotFound) as e:
        client.sandboxes.get(group, "sb-000000000000")
    assert (e.value.status, e.value.code) == (404, "not_found")
    assert "sb-000000000000" in e.value.message
    with pytest.raises(moat.NotFound):
        client.groups.get("no-such-group")


def test_bad_request_carries_the_daemons_message(client: moat.Client, group: str) -> None:
    with pytest.raises(moat.BadRequest) as e:
        client.groups.apply("Not_A_Name")
    assert (e.value.status, e.value.code) == (400, "bad_request")
    assert "invalid group name" in e.value.message and "lowercase letters" in e.value.message
    with pytest.raises(moat.BadRequest) as e:
        client.sandboxes.create(group, labels={"bad key!": "v"})
    assert "invalid label key" in e.value.message
    assert str(e.value).startswith("400 bad_request: invalid label key")


def test_forbidden_for_a_reader_key(client: moat.Client, group: str) -> None:
    k = client.api_keys.create("sdk reader", "reader", [group])
    try:
        with moat.Client(client.url, k.key) as reader:
            with pytest.raises(moat.Forbidden) as e:
                reader.sandboxes.create(group)
            assert (e.value.status, e.value.code) == (403, "forbidden")
            # A reader sees the group, but not the others.
            reader.groups.get(group)
            with pytest.raises(moat.NotFound):
                reader.groups.get("other-group")
            with pytest.raises(moat.Forbidden):
                reader.api_keys.list()
    finally:
        client.api_keys.delete(k.id)


def test_unauthorized(url: str) -> None:
    with moat.Client(url, "moat_" + "x" * 43) as c:
        with pytest.raises(moat.Unauthorized) as e:
            c.groups.list()
        assert (e.value.status, e.value.code) == (401, "unauthorized")
        assert c.health().status == "ok"  # needs no key
    with moat.Client(url, "") as anonymous:
        with pytest.raises(moat.Unauthorized):
            anonymous.groups.list()


def test_policy_denied_from_a_real_sandbox(client: moat.Client, group: str) -> None:
    """A group policy refuses an exec before it reaches the VM: PolicyDenied with the rule, and
    the side effect of the refused command is absent; the dry run and the log agree."""
    client.groups.apply("sdk-policy", {"tier": "s"})
    try:
        applied = client.groups.policy.apply(
            "sdk-policy",
            {"mode": "enforce", "commands": {"deny": ["touch"]}},
        )
        # Versions go on across a deletion of the group, so a rerun has a higher one.
        version = applied["version"]
        check = client.groups.policy.check("sdk-policy", {"command": "touch /tmp/x"})
        assert check["allowed"] is False and check["findings"][0]["rule"] == "command.denied"
        with client.sandboxes.create("sdk-policy") as sb:
            with pytest.raises(moat.PolicyDenied) as e:
                sb.exec("echo hi > /tmp/seen; touch /tmp/refused")
            assert (e.value.status, e.value.code) == (403, "policy_denied")
            assert e.value.policy_version == version
            assert [f.rule for f in e.value.findings] == ["command.denied"]
            assert "touch" in e.value.findings[0].snippet
            ls = sb.exec(["ls", "/tmp"])
            assert "seen" not in ls.stdout and "refused" not in ls.stdout
        log = client.groups.policy.decisions("sdk-policy", verdict="deny")
        assert [d["route"] for d in log["items"]][-1:] == ["exec"]
        # Rollback: an audit version, then back to the enforcing one as a new version.
        audit = client.groups.policy.apply("sdk-policy", {"mode": "audit"})
        assert audit["version"] == version + 1
        back = client.groups.policy.rollback("sdk-policy", version)
        assert back["version"] == version + 2 and back["policy"]["mode"] == "enforce"
        with pytest.raises(moat.NotFound):
            client.groups.policy.rollback("sdk-policy", version + 100)
    finally:
        client.groups.delete("sdk-policy", force=True)
