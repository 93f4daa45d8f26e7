"""API keys through the SDK: expiry, rotation (the old secret stops at once), last use, a
key's own rate limit (429 as RateLimited), and the audit log of mutating calls."""

from __future__ import annotations

import time

import pytest
from conftest import eventually

import moat


def test_keys_expire_rotate_and_show_their_use(client: moat.Client, url: str) -> None:
    k = client.api_keys.create("sdk-expiring", "reader", ["sdk-keys"], expires_in_s=1)
    assert k.expires_at is not None and k.key.startswith("moat_")
    try:
        with moat.Client(url, k.key) as c:
            with pytest.raises(moat.NotFound):
                c.groups.get("sdk-keys")

            def expired() -> bool:
                try:
                    c.groups.get("sdk-keys")
                except moat.Unauthorized as e:
                    return "expired at" in e.message
                except moat.NotFound:
                    return False
                return False

            eventually(expired, "the key to expire", within=10)
        shown = client.api_keys.get(k.id)
        assert shown.last_used_at is not None and shown.rotated_at is None
        with pytest.raises(moat.BadRequest, match="expires_in_s"):
            client.api_keys.rotate(k.id)
        r = client.api_keys.rotate(k.id, expires_in_s=3600)
        assert (r.id, r.role, r.groups) == (k.id, "reader", ["sdk-keys"])
        assert r.key != k.key
        with moat.Client(url, k.key) as old, pytest.raises(moat.Unauthorized):
            old.groups.list()
        with moat.Client(url, r.key) as new:
            new.groups.list()
        assert client.api_keys.get(k.id).rotated_at is not None
    finally:
        client.api_keys.delete(k.id)


def test_a_keys_own_rate_limit_and_the_audit_log(client: moat.Client, url: str) -> None:
    since = int(time.time()) - 1
    k = client.api_keys.create(
        "sdk-slow", "reader", ["sdk-keys"], rate_limit=moat.RateLimit(per_s=1, burst=2)
    )
    try:
        assert k.rate_limit == moat.RateLimit(per_s=1, burst=2)
        with moat.Client(url, k.key) as c:
            c.groups.list()
            c.groups.list()
            with pytest.raises(moat.RateLimited, match="rate limit"):
                c.groups.list()
        events, _ = client.api_keys.audit(since=since)
        created = [e for e in events if e.action == "POST /v1/api-keys" and e.status == 201]
        assert created and created[-1].key_id is not None and created[-1].request_id
        assert k.key not in repr(events)
    finally:
        client.api_keys.delete(k.id)
