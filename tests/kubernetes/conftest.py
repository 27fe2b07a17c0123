"""The kubernetes tier: a real kube-apiserver and etcd (ambient/kube/apiserver.py) per test.

The binaries come from scripts/build-kube (or $KUBE_BIN_DIR). Locally a test is skipped, with the reason,
when they are not built; in CI (CI=true) that is a failure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ambient.kube.apiserver import ApiServer, binaries_dir, open_api_server
from ambient.kube.errors import BinariesMissing
from tests.conftest import IN_CI


def _require_binaries() -> None:
    try:
        binaries_dir()
    except BinariesMissing as exc:
        reason = f"no Kubernetes API server to test against: {exc}"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    """etcd + kube-apiserver with the watch cache on, as in a cluster."""
    _require_binaries()
    async with open_api_server() as server:
        yield server


@pytest.fixture
async def api_uncached() -> AsyncIterator[ApiServer]:
    """etcd + kube-apiserver with the watch cache off: a watch can resume from any version etcd still has,
    also after the API server restarted (with the cache on, a restarted server may answer 410 instead)."""
    _require_binaries()
    async with open_api_server(watch_cache=False) as server:
        yield server


@pytest.fixture
def kube_binaries() -> None:
    """For tests that start the binaries themselves (`lab up --kubernetes`): skip (CI: fail) without them."""
    _require_binaries()
