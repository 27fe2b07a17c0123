"""A real network namespace fd crosses ZDS: the receiving side holds the very same namespace."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import trio

from services.node_agent.zds_server import ZdsServer
from services.ztunnel.inpod.statemanager import WorkloadManager
from services.ztunnel.inpod.zds_client import run_zds_client
from shared.netns import entered, is_netns, netns_id, open_netns
from shared.zds.types import PodUid, WorkloadInfo
from tests.service.zds_fakes import StaticSnapshot


class NetnsCheckingHandler:
    """Records the netns identity and the namespace's loopback state as seen through the received fd."""

    def __init__(self) -> None:
        self.seen: dict[PodUid, tuple[tuple[int, int], str]] = {}

    async def start_workload(self, uid: PodUid, info: WorkloadInfo, netns_fd: int, *,
                             on_exit: Callable[[], None]) -> None:
        assert is_netns(netns_fd)
        with entered(netns_fd):
            inode = os.readlink("/proc/thread-self/ns/net")
        self.seen[uid] = (netns_id(netns_fd), inode)

    async def stop_workload(self, uid: PodUid) -> None:
        self.seen.pop(uid, None)


async def test_real_netns_fd_arrives_as_the_same_namespace(
    make_netns: Callable[[str], str], tmp_path: Path
) -> None:
    name = make_netns("zds")
    fd = open_netns(name)
    try:
        expected = netns_id(fd)
        expected_link = f"net:[{expected[0]}]"
        home = os.readlink("/proc/thread-self/ns/net")
        snapshot = StaticSnapshot()
        handler = NetnsCheckingHandler()
        manager = WorkloadManager(handler)
        path = str(tmp_path / "zds.sock")
        async with trio.open_nursery() as nursery:
            server = ZdsServer(path, snapshot, accept_interval=0)
            await nursery.start(server.serve)
            await nursery.start(run_zds_client, path, manager)
            with trio.fail_after(10):
                await server.wait_connections(1)
                await server.add_workload(
                    PodUid("pod-1"), WorkloadInfo(name="p", namespace="ns", service_account="sa"), fd
                )
            nursery.cancel_scope.cancel()
        assert handler.seen[PodUid("pod-1")] == (expected, expected_link)
        assert manager.running[PodUid("pod-1")].netns == expected
        assert os.readlink("/proc/thread-self/ns/net") == home, "the thread must be back in its own netns"
    finally:
        os.close(fd)


def test_entered_returns_home_and_nested_blocks_return_to_their_outer_namespace(
    make_netns: Callable[[str], str],
) -> None:
    def here() -> str:
        return os.readlink("/proc/thread-self/ns/net")

    a, b = open_netns(make_netns("ea")), open_netns(make_netns("eb"))
    try:
        home = here()
        link_a, link_b = f"net:[{netns_id(a)[0]}]", f"net:[{netns_id(b)[0]}]"
        with entered(a):
            pass  # the thread's home handle is now open and kept
        fds = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            with entered(a):
                assert here() == link_a
                with entered(b):
                    assert here() == link_b
                assert here() == link_a  # the inner block went back to a, not to the thread's home
            assert here() == home
        assert len(os.listdir("/proc/self/fd")) == fds  # no handle opened per block is left behind
        try:
            with entered(b):
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        assert here() == home
    finally:
        os.close(a)
        os.close(b)
