"""Fixtures for the root tier: uniquely named namespaces that are always removed, also on failure."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest


def run(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, inside `netns` (ip netns exec) when given; output captured as text."""
    cmd = ["ip", "netns", "exec", netns, *args] if netns else list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


@pytest.fixture
def make_netns() -> Iterator[Callable[[str], str]]:
    """Factory: make_netns("pod") -> a fresh `ip netns` name like t<pid>-<hex>-pod, deleted at teardown."""
    made: list[str] = []

    def factory(label: str) -> str:
        name = f"t{os.getpid()}-{uuid.uuid4().hex[:6]}-{label}"[:40]
        run("ip", "netns", "add", name)
        made.append(name)
        run("ip", "link", "set", "lo", "up", netns=name)
        return name

    try:
        yield factory
    finally:
        for name in reversed(made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
