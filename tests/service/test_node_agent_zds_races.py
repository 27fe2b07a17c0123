"""Regression tests for upstream's pod-delete races, against the real node agent lifecycle, the real ZDS
server and the real ZDS client and state manager (ztunnel's side), over a Unix socket:

* istio/istio#56738: a deleted pod left in the node agent's snapshot; ztunnel then retries it without end
  and never becomes ready. A delete must never be lost: not while ztunnel is away, not when it arrives
  while the pod's enrolment is still under way.
* istio/ztunnel#1674 (readiness after a reconnect): a delete racing a ztunnel reconnect, arriving while the
  new connection's snapshot is being applied, ends with the pod stopped on every ztunnel, nothing pending,
  every ztunnel ready, and no fd left behind.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
import trio.testing

from services.node_agent.cache import NetnsCache
from services.node_agent.lifecycle import NodeAgent
from services.node_agent.model import STATUS_ENABLED, Pod
from services.node_agent.rules import RuleSettings
from services.node_agent.testing import FakeRuleApplier, PipeNetnsOpener, RecordingStatus
from services.node_agent.zds_server import ZdsServer
from services.ztunnel.inpod.statemanager import WorkloadManager
from services.ztunnel.inpod.zds_client import run_zds_client
from shared.zds.types import PodUid, WorkloadInfo
from tests.service.zds_fakes import RecordingHandler, open_fd_count, wait_until

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def pod(name: str, *, labels: dict[str, str] | None = None) -> Pod:
    return Pod(uid=PodUid(f"uid-{name}"), name=name, namespace="default", service_account=f"sa-{name}",
               labels=AMBIENT if labels is None else labels, netns_path=f"/run/netns/{name}")


class GatedHandler(RecordingHandler):
    """A ztunnel whose next proxy start waits for `release` (it is busy binding the pod's listeners)."""

    def __init__(self) -> None:
        super().__init__()
        self.starting = trio.Event()
        self.release = trio.Event()

    async def start_workload(self, uid: PodUid, info: WorkloadInfo, netns_fd: int, *,
                             on_exit: Callable[[], None]) -> None:
        self.starting.set()
        await self.release.wait()
        await super().start_workload(uid, info, netns_fd, on_exit=on_exit)


class GatedStatus(RecordingStatus):
    """A status writer whose writes wait while `gate` is set (a slow control plane)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: trio.Event | None = None

    async def report(self, pod: Pod, status: str | None) -> None:
        if self.gate is not None:
            await self.gate.wait()
        await super().report(pod, status)


@dataclass
class Node:
    agent: NodeAgent
    server: ZdsServer
    cache: NetnsCache
    status: GatedStatus
    nursery: trio.Nursery
    path: str

    async def ztunnel(self, handler: RecordingHandler, manager: WorkloadManager | None = None,
                      ) -> tuple[WorkloadManager, trio.CancelScope]:
        """Connect a ztunnel (its ZDS client and state manager: `manager` to reconnect one that was
        connected before); cancel the scope to stop it."""
        manager = manager if manager is not None else WorkloadManager(handler)
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await run_zds_client(self.path, manager)

        self.nursery.start_soon(run)
        await wait_until(lambda: manager.connected)
        return manager, scope

    async def enrolled(self, *pods: Pod) -> tuple[RecordingHandler, WorkloadManager, trio.CancelScope]:
        """A ztunnel connected and `pods` enrolled through CNI ADDs (started and acked by it)."""
        handler = RecordingHandler()
        manager, scope = await self.ztunnel(handler)
        for p in pods:
            await self.agent.cni_add(p, None)
        assert handler.events == [("start", p.uid) for p in pods]
        return handler, manager, scope


@asynccontextmanager
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    path = str(tmp_path / "zds.sock")
    cache = NetnsCache()
    server = ZdsServer(path, cache, accept_interval=0)
    opener = PipeNetnsOpener()
    status = GatedStatus()
    agent = NodeAgent(applier=FakeRuleApplier(), ztunnel=server, status=status, settings=RuleSettings(),
                      opener=opener, cache=cache)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            await nursery.start(agent.run)
            yield Node(agent=agent, server=server, cache=cache, status=status, nursery=nursery, path=path)
            nursery.cancel_scope.cancel()
    finally:
        agent.close()
        opener.close()


async def test_a_pod_deleted_while_ztunnel_is_away_is_not_in_its_next_snapshot(tmp_path: Path) -> None:
    # istio/istio#56738: the pod must not come back in the snapshot of the next connection, whether it is
    # the same ztunnel reconnecting (which must stop the pod) or a new ztunnel process (which must not
    # start it); both become ready.
    p, q = pod("gone"), pod("stays")
    before = open_fd_count()
    with trio.fail_after(20):
        async with node(tmp_path) as n:
            first, manager, scope = await n.enrolled(p, q)
            assert n.status.current == {p.uid: STATUS_ENABLED, q.uid: STATUS_ENABLED}
            scope.cancel()  # ztunnel goes away
            await wait_until(lambda: not n.server.connected)
            await n.agent.pod_deleted(p)
            assert [e.uid for e in n.cache.snapshot()] == [q.uid]
            again, _ = await n.ztunnel(first, manager)  # the same ztunnel reconnecting, with its state
            await wait_until(lambda: again.ready)
            assert set(again.running) == {q.uid}  # the snapshot did not name the deleted pod: stopped
            fresh = RecordingHandler()
            restarted, _ = await n.ztunnel(fresh)  # a restarted ztunnel
            await wait_until(lambda: restarted.ready)
            assert set(restarted.running) == {q.uid}
            n.nursery.cancel_scope.cancel()
    assert first.events == [("start", p.uid), ("start", q.uid), ("stop", p.uid)]
    assert fresh.events == [("start", q.uid)]
    assert open_fd_count() == before


async def test_a_delete_queued_behind_another_operation_of_the_pod_is_not_lost(tmp_path: Path) -> None:
    # istio/istio#56738's race: the delete arrives while an enrolment of the pod is waiting to run (here it
    # waits behind the pod's previous removal, held up by a slow status write), so the pod is neither in
    # the cache nor enrolled at that moment. A delete dropped then lets the enrolment put the deleted pod
    # into every later snapshot.
    p = pod("racer")
    with trio.fail_after(20):
        async with node(tmp_path) as n:
            await n.agent.cni_add(p, None)  # enrolled, pending: no ztunnel yet
            n.status.gate = trio.Event()
            n.nursery.start_soon(n.agent.pod_changed, pod("racer", labels={}), {})  # leaves the mesh...
            await trio.testing.wait_all_tasks_blocked()
            n.nursery.start_soon(n.agent.cni_add, p, None)  # ...comes back through a CNI ADD...
            await trio.testing.wait_all_tasks_blocked()
            assert p.uid not in n.cache and n.agent.status_of(p.uid) is None
            n.nursery.start_soon(n.agent.pod_deleted, p)  # ...and is deleted, all before the removal ends
            await trio.testing.wait_all_tasks_blocked()
            n.status.gate.set()
            n.status.gate = None
            await trio.testing.wait_all_tasks_blocked()  # the removal, the enrolment, the delete: done
            assert n.cache.snapshot() == []
            assert n.agent.status_of(p.uid) is None
            handler = RecordingHandler()
            manager, _ = await n.ztunnel(handler)
            await wait_until(lambda: manager.ready)
            assert manager.running == {} and handler.events == []
            n.nursery.cancel_scope.cancel()


async def test_a_delete_during_a_reconnects_snapshot_stops_the_pod_everywhere(tmp_path: Path) -> None:
    # istio/ztunnel#1674: ztunnel reconnects (a second connection) and is still applying the snapshot's add
    # of the pod when the pod is deleted. The delete must reach it after the snapshot (none lost), leave no
    # proxy running or pending on either connection, and both ztunnels end ready.
    p = pod("flaky")
    before = open_fd_count()
    with trio.fail_after(20):
        async with node(tmp_path) as n:
            old, old_manager, _ = await n.enrolled(p)
            slow = GatedHandler()
            new_manager, _ = await n.ztunnel(slow)
            with trio.fail_after(5):
                await slow.starting.wait()  # the new connection's snapshot: add of the pod, in progress
            assert not new_manager.snapshot_received
            deleted = trio.Event()

            async def delete() -> None:
                await n.agent.pod_deleted(p)
                deleted.set()

            n.nursery.start_soon(delete)
            await trio.testing.wait_all_tasks_blocked()
            assert p.uid not in n.cache  # the next snapshot, of any connection, no longer has it
            slow.release.set()
            await deleted.wait()
            await wait_until(lambda: new_manager.ready and old_manager.ready)
            assert new_manager.running == {} and old_manager.running == {}
            assert not new_manager.pending and not old_manager.pending
            n.nursery.cancel_scope.cancel()
    assert old.events == [("start", p.uid), ("stop", p.uid)]
    assert slow.events == [("start", p.uid), ("stop", p.uid)]
    assert open_fd_count() == before, "a netns fd was left open"
    assert os.listdir(tmp_path) == []  # the ZDS socket is gone with the server
