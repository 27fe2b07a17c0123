"""Test tiers: unit/ and service/ run anywhere; netns/ needs root. Locally a netns test is skipped with the
reason; in CI (CI=true) a netns test that cannot run is a failure, never a skip."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def netns_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) for real network namespaces"
    for tool in ("ip", "iptables-restore", "nft"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"needs the {tool} binary (apt-get install iproute2 iptables nftables)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = netns_unavailable_reason()
    for item in items:
        if "tests/netns/" in item.nodeid.replace(os.sep, "/"):
            item.add_marker(pytest.mark.netns)
        if reason is None or item.get_closest_marker("netns") is None:
            continue
        if IN_CI:
            item.user_properties.append(("ci_netns_unavailable", reason))
        else:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item: pytest.Item) -> None:
    for key, value in item.user_properties:
        if key == "ci_netns_unavailable":
            pytest.fail(f"CI=true but this root/netns test cannot run: {value}", pytrace=False)


def istioctl_path() -> str | None:
    """Upstream's istioctl, as scripts/build-istioctl caches it (or $ISTIOCTL); None when it is not built."""
    path = os.environ.get("ISTIOCTL")
    if not path:
        script = Path(__file__).resolve().parents[1] / "scripts" / "build-istioctl"
        path = subprocess.run([str(script), "--print-path"], check=True, capture_output=True,
                              text=True).stdout.strip()
    return path if os.access(path, os.X_OK) else None


@pytest.fixture(scope="session")
def istioctl() -> str:
    """The istioctl binary. Locally a test that needs it is skipped when it is not built; in CI it fails."""
    path = istioctl_path()
    if path is None:
        reason = "upstream's istioctl is not built: run scripts/build-istioctl (needs Go, the module proxy)"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)
    return path
