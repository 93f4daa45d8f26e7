"""Fixtures of the SDK's tests against a real daemon.

The daemon tests need ``MOAT_URL`` and ``MOAT_API_KEY`` (an admin key) of a running
``moat serve`` that can boot VMs; ``crates/cli/tests/sdk_python.rs`` starts one and runs this
suite (``cargo test -p moat-cli --test sdk_python``). Without them the daemon tests are skipped,
and the unit tests still run; with ``MOAT_TEST_REQUIRE_DAEMON=1`` (as the Rust test sets) a
missing daemon fails them instead, so that nothing is skipped unnoticed.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterator

import pytest

import moat

GROUP = os.environ.get("MOAT_TEST_GROUP", "sdk-test")


def _need(var: str) -> str:
    value = os.environ.get(var)
    if not value:
        why = f"{var} is not set: this test needs a running moat daemon"
        if os.environ.get("MOAT_TEST_REQUIRE_DAEMON") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return value


@pytest.fixture(scope="session")
def url() -> str:
    return _need("MOAT_URL")


@pytest.fixture(scope="session")
def admin_key() -> str:
    return _need("MOAT_API_KEY")


@pytest.fixture(scope="session")
def client(url: str, admin_key: str) -> Iterator[moat.Client]:
    with moat.Client(url, admin_key) as c:
        yield c


@pytest.fixture(scope="session")
def group(client: moat.Client) -> Iterator[str]:
    """The tests' group (tier s: the smallest VM that runs everything here). Deleted at the
    end with its sandboxes."""
    client.groups.apply(GROUP, {"tier": "s", "labels": {"suite": "sdk"}})
    yield GROUP
    client.groups.delete(GROUP, force=True)


def eventually(check: Callable[[], bool], what: str, within: float = 30.0) -> None:
    """Polls ``check`` until it holds, for changes with no signal to wait on."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
