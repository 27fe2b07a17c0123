"""ztunnel's in-pod state manager: what each ZDS message does to the set of running pod proxies.

Theory of operation
-------------------
This is upstream ztunnel's in-pod state manager (`WorkloadProxyManagerState`) in one object, and the one place
that decides, for every message, whether a pod's proxies are added, kept, moved to a new netns, retried or
deleted. The `WorkloadHandler` below it only starts and stops listener sets as told. It keeps

* `running`: pods whose proxies are up, with the netns identity (st_ino, st_dev) they were started in;
* `pending`: pods whose proxy failed to start, with their netns fd, retried every 5 s while connected;
* `snapshot_names`: the uids named by the current connection's snapshot (add or keep).

Every new connection resets the snapshot bookkeeping and drops pending pods (the node agent will send them
again); running proxies survive reconnects and are reconciled when the new snapshot ends: any running pod
the snapshot did not name is stopped. Starting and stopping proxies is delegated to a `WorkloadHandler`
(ztunnel's per-pod proxy supervisor, or a recorder in tests and `ambient zds watch`). One lock serialises
messages and retries, so the handler never sees two operations at once.

The netns fd of an add is the manager's from the moment `handle()` is called: it is kept while the pod is
pending (for the retries) and closed once the proxies run (the handler keeps its own duplicate) or the pod
is dropped. A pod whose proxy set ends on its own (an accept loop died) is reported back through the
`on_exit` callback handed to `start_workload`, so a later add starts it again.

After every change of state the manager writes `state_file` (if set) and calls `on_change(manager)` (if
set).

The result of each operation is the text of the answer: "" for an ACK, upstream's NACK text otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import msgspec
import trio

from services.ztunnel.errors import ProxyStartError
from shared.netns import NetnsId, netns_id
from shared.zds.codec import close_fds
from shared.zds.types import (
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    PodUid,
    Request,
    SnapshotSent,
    WorkloadInfo,
)

log = logging.getLogger("zds.workloads")

RETRY_INTERVAL = 5.0  # upstream RETRY_DURATION


class WorkloadHandler(Protocol):
    """Starts and stops one pod's proxy set. Implemented by ztunnel's in-pod supervisor."""

    async def start_workload(self, uid: PodUid, info: WorkloadInfo, netns_fd: int, *,
                             on_exit: Callable[[], None]) -> None:
        """Bind the pod's listeners inside `netns_fd` and serve them; return once all are bound.

        `uid` is not running (the manager stops a pod before starting it again). Raises ProxyStartError
        (nothing left running) when it cannot. The fd stays the caller's: duplicate it to keep it.
        `on_exit()` is to be called if the proxy set later ends without `stop_workload` having been asked.
        """
        ...

    async def stop_workload(self, uid: PodUid) -> None:
        """Immediate drain: close the pod's listeners and its open connections."""
        ...


class RunningWorkload(msgspec.Struct, frozen=True, kw_only=True):
    uid: PodUid
    info: WorkloadInfo
    netns: NetnsId
    generation: int  # increases on every (re)start, so observers can tell a rebind from a no-op


class _Pending(msgspec.Struct, kw_only=True):
    info: WorkloadInfo
    netns_fd: int
    error: str


class WorkloadManager:
    """See the module docstring."""

    def __init__(self, handler: WorkloadHandler, *, state_file: str | None = None,
                 on_change: Callable[[WorkloadManager], None] | None = None) -> None:
        self.handler = handler
        self.state_file = state_file
        self.on_change = on_change
        self.running: dict[PodUid, RunningWorkload] = {}
        self.pending: dict[PodUid, _Pending] = {}
        self.snapshot_names: set[PodUid] = set()
        self.snapshot_received = False
        self.connected = False
        self.connections = 0
        self._generation = 0
        self._lock = trio.Lock()

    @property
    def ready(self) -> bool:
        """Upstream readiness: connected, the snapshot applied, and no proxy left pending."""
        return self.connected and self.snapshot_received and not self.pending

    # --- connection events ----------------------------------------------------------------------------

    def connection_started(self) -> None:
        """A new connection said hello: forget the old snapshot and pending pods, keep running ones."""
        self.connected = True
        self.connections += 1
        self.snapshot_received = False
        self.snapshot_names.clear()
        self._drop_pending()
        self._changed()

    def connection_lost(self) -> None:
        self.connected = False
        self.snapshot_received = False
        self._changed()

    # --- messages ---------------------------------------------------------------------------------------

    async def handle(self, request: Request) -> str:
        """Apply one (protocol-valid) request; returns "" to ACK or the NACK text. Takes an add's fd."""
        async with self._lock:
            match request:
                case AddWorkload(uid=uid, workload_info=info, netns_fd=fd):
                    assert info is not None, "the session rejects add without workload_info"
                    result = await self._add(uid, info, fd)
                case KeepWorkload(uid=uid):
                    self.snapshot_names.add(uid)
                    result = ""
                case DelWorkload(uid=uid):
                    await self._delete(uid)
                    result = ""
                case SnapshotSent():
                    await self._reconcile()
                    result = ""
            self._changed()
            return result

    async def _add(self, uid: PodUid, info: WorkloadInfo, fd: int) -> str:
        if not self.snapshot_received:
            self.snapshot_names.add(uid)
        try:
            nid = netns_id(fd)
        except OSError as exc:
            close_fds([fd])
            return f"failure to start proxy : cannot stat netns fd: {exc.strerror}"
        current = self.running.get(uid)
        if current is not None and current.netns == nid:
            close_fds([fd])
            log.debug("pod already running in the same netns; nothing to do",
                      extra={"fields": [("uid", uid)]})
            return ""
        if current is not None:
            log.info("pod moved to another netns; replacing its proxies", extra={"fields": [("uid", uid)]})
            await self._stop(uid)
        old = self.pending.pop(uid, None)
        if old is not None:
            close_fds([old.netns_fd])
        error = await self._start(uid, info, fd, nid)
        if error:
            self.pending[uid] = _Pending(info=info, netns_fd=fd, error=error)
            return f"failure to start proxy : {error}"
        close_fds([fd])
        return ""

    async def _delete(self, uid: PodUid) -> None:
        old = self.pending.pop(uid, None)
        if old is not None:
            close_fds([old.netns_fd])
        if not self.snapshot_received:
            # Before the snapshot ends the uid just leaves the snapshot; reconcile drops a running proxy.
            self.snapshot_names.discard(uid)
            return
        if uid in self.running:
            await self._stop(uid)
        else:
            log.debug("del for an unknown pod; ignored", extra={"fields": [("uid", uid)]})

    async def _reconcile(self) -> None:
        for uid in [u for u in self.running if u not in self.snapshot_names]:
            log.info("pod not in the node agent's snapshot; stopping its proxies",
                     extra={"fields": [("uid", uid)]})
            await self._stop(uid)
        self.snapshot_received = True

    async def retry_pending(self) -> None:
        """Try every pending pod again (called every RETRY_INTERVAL while connected)."""
        async with self._lock:
            for uid, item in list(self.pending.items()):
                error = await self._start(uid, item.info, item.netns_fd, netns_id(item.netns_fd))
                if error:
                    item.error = error
                    log.warning("pod still failing to start",
                                extra={"fields": [("uid", uid), ("error", error)]})
                    continue
                del self.pending[uid]
                close_fds([item.netns_fd])
            self._changed()

    def workload_exited(self, uid: PodUid) -> None:
        """The handler reports that a pod's proxies ended without being stopped (e.g. an accept loop died).

        The pod is no longer listed as running, so a later add for it starts it again.
        """
        if self.running.pop(uid, None) is not None:
            log.warning("pod proxies exited on their own; no longer running",
                        extra={"fields": [("uid", uid)]})
            self._changed()

    # --- helpers ----------------------------------------------------------------------------------------

    async def _start(self, uid: PodUid, info: WorkloadInfo, fd: int, nid: NetnsId) -> str:
        try:
            await self.handler.start_workload(uid, info, fd, on_exit=partial(self.workload_exited, uid))
        except ProxyStartError as exc:
            log.warning("failed to start the pod's proxies", extra={"fields": [
                ("uid", uid), ("name", info.name), ("namespace", info.namespace), ("error", str(exc))]})
            return str(exc)
        except Exception as exc:  # a handler bug must not take the ZDS connection or other pods down
            log.exception("unexpected error starting the pod's proxies", extra={"fields": [("uid", uid)]})
            return f"internal error: {exc!r}"
        self._generation += 1
        self.running[uid] = RunningWorkload(uid=uid, info=info, netns=nid, generation=self._generation)
        log.info("pod proxies started",
                 extra={"fields": [("uid", uid), ("name", info.name), ("namespace", info.namespace)]})
        return ""

    async def _stop(self, uid: PodUid) -> None:
        self.running.pop(uid, None)
        try:
            await self.handler.stop_workload(uid)
        except Exception:
            log.exception("unexpected error stopping the pod's proxies", extra={"fields": [("uid", uid)]})
        log.info("pod proxies stopped", extra={"fields": [("uid", uid)]})

    def _drop_pending(self) -> None:
        for item in self.pending.values():
            close_fds([item.netns_fd])
        self.pending.clear()

    def _changed(self) -> None:
        if self.state_file is not None:
            write_state_file(self.state_file, self.state())
        if self.on_change is not None:
            self.on_change(self)

    def state(self) -> dict[str, Any]:
        """A JSON-able view, the documented state interface of the conformance kit."""
        return {
            "connected": self.connected,
            "connections": self.connections,
            "snapshot_received": self.snapshot_received,
            "ready": self.ready,
            "workloads": {
                uid: {
                    "name": w.info.name,
                    "namespace": w.info.namespace,
                    "service_account": w.info.service_account,
                    "netns": list(w.netns),
                    "generation": w.generation,
                }
                for uid, w in sorted(self.running.items())
            },
            "pending": {uid: p.error for uid, p in sorted(self.pending.items())},
        }


def write_state_file(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write `state` as JSON atomically (write a temp file, then rename over)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(msgspec.json.encode(state))
    os.replace(tmp, path)
