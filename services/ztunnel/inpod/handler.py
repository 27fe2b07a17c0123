"""The ZDS client's view of ztunnel: start and stop a pod's proxy set.

Theory of operation
-------------------
`InPodWorkloadHandler` is what the in-pod state manager (statemanager.py) calls to start and stop a pod's
proxies. It owns no protocol state and makes no decisions (duplicate adds, netns moves, pending retries and
readiness are the state manager's); it only keeps `uid -> PodHandle` for the pods whose proxy sets are
running, each started with `pods_nursery.start(run_pod_proxies, ...)` so `start_workload` returns exactly
when the pod's listeners are all bound, or raises ProxyStartError with nothing left running. A pod whose set
ends without being asked to (an accept loop died) is reported through the `on_exit()` given with its start.

    async with trio.open_nursery() as pods:
        handler = InPodWorkloadHandler(pods, config=ProxyConfig(), telemetry=Telemetry())
        await handler.start_workload(uid, info, fd, on_exit=...)   # the caller keeps and closes its own fd
        await handler.stop_workload(uid)              # immediate drain
        ...
        await handler.drain_all(grace=5.0)            # shutdown: stop accepting, then force-close
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import trio

from services.ztunnel.errors import ProxyStartError
from services.ztunnel.inpod.proxies import PodHandle, run_pod_proxies
from services.ztunnel.inpod.sockets import InPodSocketFactory
from services.ztunnel.proxy.context import (
    Mesh,
    NoPeers,
    PeerLookup,
    PodContext,
    ProxyConfig,
    SocketFactory,
)
from services.ztunnel.proxy.limits import ConnectionLimits
from services.ztunnel.telemetry.access_log import Telemetry
from shared.addr import format_host_port
from shared.identity import SpiffeId
from shared.zds.types import PodUid, WorkloadInfo

log = logging.getLogger("ztunnel.inpod")


def _identity(ctx: PodContext) -> SpiffeId | None:
    workload = ctx.workload()
    return workload.identity if workload is not None else None


class InPodWorkloadHandler:
    """Starts/stops per-pod proxy sets in `pods_nursery` (one child task, one nursery, per pod).

    Implements `services.ztunnel.inpod.statemanager.WorkloadHandler`.
    """

    def __init__(self, pods_nursery: trio.Nursery, *, config: ProxyConfig | None = None,
                 telemetry: Telemetry | None = None, sockets: SocketFactory | None = None,
                 peers: PeerLookup | None = None, mesh: Mesh | None = None) -> None:
        self._nursery = pods_nursery
        self.mesh = mesh
        self.config = config if config is not None else ProxyConfig()
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.limits = ConnectionLimits(max_connections=self.config.max_connections,
                                       max_per_pod=self.config.max_connections_per_pod,
                                       metrics=self.telemetry.metrics)
        """The connection caps, read once the process has raised its open-files limit (proxy/limits.py)."""
        log.info("connection limits", extra={"fields": [
            ("max_connections", self.limits.max_connections),
            ("max_connections_per_pod", self.limits.max_per_pod)]})
        self.sockets = sockets if sockets is not None else InPodSocketFactory(self.config)
        self.peers = peers if peers is not None else NoPeers()
        self._pods: dict[PodUid, PodHandle] = {}

    @property
    def pods(self) -> dict[PodUid, PodHandle]:
        """Running pods (read only by convention: used by the admin endpoint and tests)."""
        return self._pods

    async def start_workload(self, uid: PodUid, info: WorkloadInfo | None, netns_fd: int, *,
                             on_exit: Callable[[], None] | None = None) -> None:
        """Bind and serve the pod's listener set; return once all are bound.

        The fd is duplicated: the caller keeps (and closes) its own copy. `uid` must not be running (the
        state manager stops it first). `on_exit()` is called if the set later ends without a stop or drain
        having been asked for.

        Raises:
            ProxyStartError: not a usable netns, or a listener could not be bound; nothing is left running.
        """
        assert uid not in self._pods, f"pod {uid} is already running; the state manager stops it first"
        try:
            fd = os.dup(netns_fd)
        except OSError as exc:
            raise ProxyStartError(f"cannot use the netns fd of pod {uid}: {exc.strerror}") from exc
        ctx = PodContext(uid=uid, info=info, netns_fd=fd, config=self.config,
                         telemetry=self.telemetry.for_pod(uid, info),
                         sockets=self.sockets, peers=self.peers, mesh=self.mesh,
                         connections=self.limits.for_pod())
        try:
            handle: PodHandle = await self._nursery.start(self._run_pod, ctx, on_exit)
        except ProxyStartError:
            raise
        except OSError as exc:
            raise ProxyStartError(f"cannot start proxies for pod {uid}: {exc.strerror or exc}") from exc
        self._pods[uid] = handle
        metrics = self.telemetry.metrics
        metrics.proxies_started.inc()
        metrics.active_proxies.set(len(self._pods))

    async def _run_pod(self, ctx: PodContext, on_exit: Callable[[], None] | None, *,
                       task_status: trio.TaskStatus[PodHandle]) -> None:
        ended: list[PodHandle] = []
        try:
            await run_pod_proxies(ctx, task_status=task_status)
        finally:
            for uid, handle in list(self._pods.items()):
                if handle.context is ctx:
                    del self._pods[uid]
                    ended.append(handle)
                    self.telemetry.metrics.proxies_stopped.inc()
            self.telemetry.metrics.active_proxies.set(len(self._pods))
            self._forget_identity(ctx)
        # Only on a normal return (not when the pods nursery is cancelled): the set failed on its own.
        if on_exit is not None and any(not handle.stop_requested for handle in ended):
            on_exit()

    def _forget_identity(self, gone: PodContext) -> None:
        """The last pod of an identity left the node: stop rotating its certificate, drop its TLS contexts."""
        mesh = self.mesh
        workload = gone.workload()
        if mesh is None or workload is None:
            return
        identity = workload.identity
        if any(_identity(h.context) == identity for h in self._pods.values()):
            return
        mesh.certs.forget(identity)
        mesh.contexts.forget(identity)

    async def stop_workload(self, uid: PodUid) -> None:
        """Immediate drain: the pod's listeners and open connections are closed before this returns.
        Unknown uids are ignored."""
        handle = self._pods.get(uid)
        if handle is None:
            return
        await handle.drain_immediately()

    async def drain_all(self, *, grace: float) -> None:
        """Shutdown: every pod stops accepting, connections get `grace` seconds to finish, then are closed."""
        handles = list(self._pods.values())
        for handle in handles:
            handle.stop_accepting()
        with trio.move_on_after(grace):
            for handle in handles:
                await handle.done.wait()
        for handle in handles:
            handle.scope.cancel()
        for handle in handles:
            await handle.done.wait()

    def dump(self) -> list[dict[str, Any]]:
        """The pods and their listeners, for /config_dump."""
        out = []
        for uid, handle in sorted(self._pods.items()):
            info = handle.context.info
            out.append({
                "uid": uid,
                "workload": None if info is None else {"name": info.name, "namespace": info.namespace,
                                                       "service_account": info.service_account},
                "netns": {"inode": handle.netns[0], "dev": handle.netns[1]},
                "state": "draining" if handle.accept_scope.cancel_called else "up",
                "active_connections": handle.context.counters.active_connections,
                "open_connections": handle.context.connections.open,
                "listeners": [{"role": li.role, "address": format_host_port(li.address, li.port),
                               "mark": li.mark} for li in handle.listeners],
                "identity": str(identity) if (identity := _identity(handle.context)) is not None else None,
                "pool": handle.pool.dump() if handle.pool is not None else None,
            })
        return out
