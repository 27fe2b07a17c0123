"""Fakes shared by the ZDS service tests: a recording WorkloadHandler and a static snapshot source."""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from services.ztunnel.errors import ProxyStartError
from shared.zds.types import PodUid, SnapshotEntry, WorkloadInfo


def info(name: str) -> WorkloadInfo:
    return WorkloadInfo(name=name, namespace="ns", service_account=f"sa-{name}")


class RecordingHandler:
    """Records starts/stops; uids in `failing` raise ProxyStartError (like a port in use)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, PodUid]] = []
        self.failing: set[PodUid] = set()
        self.kept_fds: dict[PodUid, int] = {}

    async def start_workload(self, uid: PodUid, info: WorkloadInfo, netns_fd: int, *,
                             on_exit: Callable[[], None]) -> None:
        if uid in self.failing:
            raise ProxyStartError("address already in use (port 15008)")
        os.fstat(netns_fd)  # the fd must be alive during the call
        self.events.append(("start", uid))

    async def stop_workload(self, uid: PodUid) -> None:
        self.events.append(("stop", uid))


class StaticSnapshot:
    """A node agent cache stand-in: uid -> (info, fd or None)."""

    def __init__(self) -> None:
        self.entries: dict[PodUid, tuple[WorkloadInfo, int | None]] = {}

    def snapshot(self) -> list[SnapshotEntry]:
        return [SnapshotEntry(uid=u, info=i, netns_fd=fd) for u, (i, fd) in self.entries.items()]


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll `predicate` (every 5 ms of the test's clock) until it holds; fail after 5 seconds."""
    with trio.fail_after(5):
        while not predicate():
            await trio.sleep(0.005)


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))
