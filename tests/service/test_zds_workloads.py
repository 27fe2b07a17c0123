"""ztunnel's handling of each ZDS message, in each state it can arrive in, against WorkloadManager, with
pipe fds standing in for netns fds and a recording handler standing in for the proxy supervisor."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from services.ztunnel.inpod.statemanager import WorkloadManager
from shared.zds.types import AddWorkload, DelWorkload, KeepWorkload, PodUid, SnapshotSent
from tests.service.zds_fakes import RecordingHandler, info, open_fd_count

A, B = PodUid("a"), PodUid("b")


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
def manager(handler: RecordingHandler) -> Iterator[WorkloadManager]:
    before = open_fd_count()
    mgr = WorkloadManager(handler)
    mgr.connection_started()
    yield mgr
    mgr.connection_started()  # a new connection drops pending pods; its empty snapshot stops the rest
    trio.run(mgr.handle, SnapshotSent())
    assert open_fd_count() == before, "the manager leaked a netns fd"


def netns_fd() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def add(uid: PodUid, fd: int | None = None) -> AddWorkload:
    return AddWorkload(uid=uid, workload_info=info(uid), netns_fd=netns_fd() if fd is None else fd)


async def test_add_before_snapshot_starts_and_names_it(
    manager: WorkloadManager, handler: RecordingHandler
) -> None:
    assert await manager.handle(add(A)) == ""
    assert handler.events == [("start", A)]
    assert A in manager.snapshot_names
    assert not manager.ready
    assert await manager.handle(SnapshotSent()) == ""
    assert manager.ready


async def test_duplicate_add_same_netns_is_a_noop(
    manager: WorkloadManager, handler: RecordingHandler
) -> None:
    fd = netns_fd()
    await manager.handle(add(A, os.dup(fd)))
    generation = manager.running[A].generation
    assert await manager.handle(add(A, os.dup(fd))) == ""
    os.close(fd)
    assert handler.events == [("start", A)]
    assert manager.running[A].generation == generation


async def test_add_with_other_netns_replaces(manager: WorkloadManager, handler: RecordingHandler) -> None:
    await manager.handle(add(A))
    assert await manager.handle(add(A)) == ""
    assert handler.events == [("start", A), ("stop", A), ("start", A)]


async def test_start_failure_nacks_keeps_pending_and_retries(
    manager: WorkloadManager, handler: RecordingHandler
) -> None:
    handler.failing.add(A)
    answer = await manager.handle(add(A))
    assert answer.startswith("failure to start proxy : ")
    assert "address already in use" in answer
    await manager.handle(SnapshotSent())
    assert A in manager.pending and not manager.ready
    await manager.retry_pending()
    assert A in manager.pending
    handler.failing.clear()
    await manager.retry_pending()
    assert A in manager.running and not manager.pending and manager.ready


async def test_reconnect_drops_pending(manager: WorkloadManager, handler: RecordingHandler) -> None:
    handler.failing.add(A)
    await manager.handle(add(A))
    manager.connection_lost()
    manager.connection_started()
    assert not manager.pending


async def test_keep_before_snapshot_preserves_running(
    manager: WorkloadManager, handler: RecordingHandler
) -> None:
    await manager.handle(add(A))
    await manager.handle(add(B))
    await manager.handle(SnapshotSent())
    manager.connection_lost()
    manager.connection_started()
    assert await manager.handle(KeepWorkload(uid=B)) == ""
    await manager.handle(SnapshotSent())
    assert set(manager.running) == {B}
    assert handler.events[-1] == ("stop", A)


async def test_reconnect_reconcile_leaves_kept_untouched(
    manager: WorkloadManager, handler: RecordingHandler
) -> None:
    fd_a = netns_fd()
    await manager.handle(add(A, os.dup(fd_a)))
    await manager.handle(add(B))
    await manager.handle(SnapshotSent())
    generation = manager.running[A].generation
    manager.connection_lost()
    manager.connection_started()
    await manager.handle(add(A, os.dup(fd_a)))
    os.close(fd_a)
    await manager.handle(SnapshotSent())
    assert set(manager.running) == {A}
    assert manager.running[A].generation == generation
    assert handler.events.count(("start", A)) == 1


async def test_del_before_snapshot_drops_at_reconcile(
    manager: WorkloadManager, handler: RecordingHandler
) -> None:
    await manager.handle(add(A))
    assert await manager.handle(DelWorkload(uid=A)) == ""
    assert A in manager.running  # only dropped at reconcile
    await manager.handle(SnapshotSent())
    assert A not in manager.running


async def test_del_before_snapshot_drops_pending(manager: WorkloadManager, handler: RecordingHandler) -> None:
    handler.failing.add(A)
    await manager.handle(add(A))
    await manager.handle(DelWorkload(uid=A))
    assert not manager.pending


async def test_del_after_snapshot_stops_and_unknown_is_acked(
    manager: WorkloadManager, handler: RecordingHandler
) -> None:
    await manager.handle(SnapshotSent())
    await manager.handle(add(A))
    assert await manager.handle(DelWorkload(uid=A)) == ""
    assert handler.events == [("start", A), ("stop", A)]
    assert await manager.handle(DelWorkload(uid=PodUid("nobody"))) == ""


async def test_exited_workload_is_no_longer_running_and_a_new_add_restarts_it(
    manager: WorkloadManager, handler: RecordingHandler
) -> None:
    changes = 0

    def changed() -> None:
        nonlocal changes
        changes += 1

    await manager.handle(SnapshotSent())
    await manager.handle(add(A))
    manager.on_change = lambda _manager: changed()
    manager.workload_exited(A)
    assert A not in manager.running and changes == 1
    manager.workload_exited(A)  # already gone (or never known): nothing to do
    assert changes == 1
    assert await manager.handle(add(A)) == ""
    assert handler.events == [("start", A), ("start", A)]
    assert A in manager.running


async def test_readiness_false_after_disconnect(manager: WorkloadManager) -> None:
    await manager.handle(SnapshotSent())
    assert manager.ready
    manager.connection_lost()
    assert not manager.ready


async def test_retry_loop_runs_on_its_interval(
    manager: WorkloadManager, handler: RecordingHandler, autojump_clock: trio.testing.MockClock
) -> None:
    from services.ztunnel.inpod.zds_client import _retry_pending

    handler.failing.add(A)
    await manager.handle(add(A))
    await manager.handle(SnapshotSent())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_retry_pending, manager, 5.0)
        await trio.sleep(4.9)
        handler.failing.clear()
        assert A in manager.pending
        await trio.sleep(0.2)
        assert A in manager.running
        nursery.cancel_scope.cancel()
