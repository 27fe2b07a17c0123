"""Fakes for the node agent's seams, used by service tests (and handy for a dry run of the lifecycle)."""

from __future__ import annotations

import os

import trio

from services.node_agent.apply import ApplyOutcome
from services.node_agent.errors import NetnsGoneError, RuleApplyError
from services.node_agent.lifecycle import NodeAgent
from services.node_agent.model import Pod
from services.node_agent.rules import PodRedirect, RuleSettings
from services.node_agent.verify import Findings
from shared.netns import netns_id
from shared.zds.errors import ZdsNack, ZdsNoConnection
from shared.zds.types import PodUid, WorkloadInfo


class FakeRuleApplier:
    """Records applies/deletes per netns identity; `fail_apply` makes the next applies fail."""

    def __init__(self) -> None:
        self.installed: dict[tuple[int, int], PodRedirect] = {}
        self.calls: list[tuple[str, tuple[int, int]]] = []
        self.fail_apply = False

    async def apply(self, netns_fd: int, redirect: PodRedirect) -> ApplyOutcome:
        await trio.lowlevel.checkpoint()
        ident = netns_id(netns_fd)
        self.calls.append(("apply", ident))
        if self.fail_apply:
            raise RuleApplyError("`iptables-restore --noflush -v` failed (exit 2): fake; rolled back")
        before = self.installed.get(ident)
        self.installed[ident] = redirect
        if before == redirect:
            return ApplyOutcome.UNCHANGED
        return ApplyOutcome.INSTALLED if before is None else ApplyOutcome.REPAIRED

    async def delete(self, netns_fd: int) -> None:
        await trio.lowlevel.checkpoint()
        ident = netns_id(netns_fd)
        self.calls.append(("delete", ident))
        self.installed.pop(ident, None)


class FakeZtunnel:
    """A ZtunnelLink: adds succeed while `connected`; `nack` makes them NACK with that text."""

    def __init__(self, *, connected: bool = True) -> None:
        self._connected = connected
        self.nack: str | None = None
        self.added: list[tuple[PodUid, WorkloadInfo, tuple[int, int]]] = []
        self.deleted: list[PodUid] = []

    @property
    def connected(self) -> bool:
        return self._connected

    def set_connected(self, value: bool) -> None:
        self._connected = value

    async def add_workload(self, uid: PodUid, info: WorkloadInfo, netns_fd: int) -> None:
        await trio.lowlevel.checkpoint()
        if not self._connected:
            raise ZdsNoConnection()
        if self.nack is not None:
            raise ZdsNack(self.nack)
        self.added.append((uid, info, netns_id(netns_fd)))

    async def del_workload(self, uid: PodUid) -> None:
        await trio.lowlevel.checkpoint()
        self.deleted.append(uid)


class RecordingStatus:
    """A StatusReporter that remembers the current annotation per pod and every change."""

    def __init__(self) -> None:
        self.current: dict[PodUid, str] = {}
        self.history: list[tuple[PodUid, str | None]] = []
        self.changed = trio.Event()

    async def report(self, pod: Pod, status: str | None) -> None:
        await trio.lowlevel.checkpoint()
        self.history.append((pod.uid, status))
        if status is None:
            self.current.pop(pod.uid, None)
        else:
            self.current[pod.uid] = status
        self.changed.set()
        self.changed = trio.Event()


class PipeNetnsOpener:
    """Stands in for netns handles with pipe fds: one pipe per netns path, `dup`ed on every open.

    A pod without a path is found "by IP" (key `ip:<first IP>`), as the real opener scans for it. A key
    listed in `missing` raises NetnsGoneError, like a pod whose namespace vanished.
    """

    def __init__(self) -> None:
        self.handles: dict[str, int] = {}
        self.missing: set[str] = set()

    async def open(self, pod: Pod) -> int:
        await trio.lowlevel.checkpoint()
        path = pod.netns_path or (f"ip:{pod.ips[0]}" if pod.ips else None)
        if path is None or path in self.missing:
            raise NetnsGoneError(f"network namespace {path} does not exist")
        if path not in self.handles:
            r, w = os.pipe()
            os.close(w)
            self.handles[path] = r
        return os.dup(self.handles[path])

    def close(self) -> None:
        for fd in self.handles.values():
            os.close(fd)
        self.handles.clear()


class ScriptedInspector:
    """Answers each inspection with the next Findings of `script` (the last one repeats)."""

    def __init__(self, *script: Findings) -> None:
        self.script = list(script)
        self.calls: list[frozenset[int] | None] = []

    async def inspect(
        self, netns_fd: int, redirect: PodRedirect, ztunnel_pids: frozenset[int] | None
    ) -> Findings:
        await trio.lowlevel.checkpoint()
        self.calls.append(ztunnel_pids)
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


class FakeNode:
    """A NodeAgent on a fresh fake of every seam above; `close()` releases its fds and the opener's."""

    def __init__(self) -> None:
        self.applier = FakeRuleApplier()
        self.ztunnel = FakeZtunnel()
        self.status = RecordingStatus()
        self.opener = PipeNetnsOpener()
        self.agent = NodeAgent(
            applier=self.applier,
            ztunnel=self.ztunnel,
            status=self.status,
            settings=RuleSettings(),
            opener=self.opener,
        )

    def close(self) -> None:
        self.agent.close()
        self.opener.close()
