"""ztunnel's admin, stats and readiness endpoints: what an operator asks the running process.

    admin      127.0.0.1:15000   /config_dump (upstream's schema, see configdump.py), /logging?level=...,
                                 /debug/connections?pod=... (the live trace), and the other two sets
    stats      :15020            /metrics (also /stats/prometheus), Prometheus text
    readiness  :15021            /healthz/ready: 200 once every named readiness check passes, else 503

`Admin` reads the process's parts (`ZtunnelParts`, assembled by app.py); it changes nothing but log levels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from services.ztunnel import configdump
from services.ztunnel.config import ZtunnelConfig
from services.ztunnel.inpod.handler import InPodWorkloadHandler
from services.ztunnel.inpod.statemanager import WorkloadManager
from services.ztunnel.proxy.context import Mesh
from services.ztunnel.state.store import StateStore
from services.ztunnel.telemetry.access_log import Telemetry
from services.ztunnel.telemetry.trace import PodRef, stream_events
from shared.httpd import Request, Response
from shared.logs import current_log_levels, set_log_level

if TYPE_CHECKING:
    from services.ztunnel.xds.client import XdsClient


class Readiness:
    """Named readiness checks; ready when all pass."""

    def __init__(self) -> None:
        self._checks: dict[str, Callable[[], bool]] = {}

    def add(self, name: str, check: Callable[[], bool]) -> None:
        self._checks[name] = check

    def blocking(self) -> list[str]:
        return [name for name, check in self._checks.items() if not check()]


@dataclass(kw_only=True)
class ZtunnelParts:
    """The running process's parts, as the admin endpoints and tests see them."""

    config: ZtunnelConfig
    handler: InPodWorkloadHandler
    manager: WorkloadManager
    telemetry: Telemetry
    readiness: Readiness
    store: StateStore
    mesh: Mesh | None = None
    xds: XdsClient | None = None
    addresses: dict[str, list[tuple[str, int]]] = field(default_factory=dict)


class Admin:
    """The request handlers of the three endpoints, over the process's parts."""

    def __init__(self, parts: ZtunnelParts) -> None:
        self.parts = parts

    def config_dump(self) -> dict[str, Any]:
        """Upstream ztunnel's config dump (configdump.py), then this ztunnel's own sections under keys
        upstream does not use: `xds` (the xDS client), `pods` (the running proxy sets, their listeners and
        connection counts), `zds` (the in-pod state manager) and `readiness`."""
        parts = self.parts
        store = parts.store
        config = msgspec.to_builtins(parts.config)
        for target in ("xds_target", "ca_target"):
            if config.get(target):
                config[target]["token"] = "<redacted>" if config[target].get("token") else None
        xds: dict[str, Any] | None = None
        if parts.xds is not None:
            xds = {"connected": parts.xds.connected, "connects": parts.xds.connects,
                   "workloads": sorted(store.workloads), "services": sorted(store.services),
                   "policies": sorted(store.policies)}
        manager = parts.manager
        blocking = parts.readiness.blocking()
        return {
            "workloads": [configdump.workload(wl) for _, wl in sorted(store.workloads.items())],
            "services": [configdump.service(svc, (wl for wl, _ in store.endpoints(svc)))
                         for _, svc in sorted(store.services.items())],
            "policies": [configdump.policy(pol) for _, pol in sorted(store.policies.items())],
            "certificates": parts.mesh.certs.dump() if parts.mesh is not None else [],
            "workloadState": configdump.workload_state(
                {uid: w.info for uid, w in manager.running.items()},
                {uid: p.info for uid, p in manager.pending.items()},
                {uid: h.context.telemetry.open for uid, h in parts.handler.pods.items()}),
            "config": config,
            "xds": xds,
            "pods": parts.handler.dump(),
            "zds": manager.state(),
            "readiness": {"ready": not blocking, "blocking": blocking},
        }

    async def admin(self, request: Request) -> Response:
        if request.path == "/config_dump":
            return Response(body=msgspec.json.format(msgspec.json.encode(self.config_dump())) + b"\n",
                                content_type="application/json")
        if request.path == "/logging":
            levels = request.query.get("level")
            if not levels:
                return Response(body=f"current log level is {current_log_levels()}\n".encode())
            try:
                now = set_log_level(levels[0])
            except ValueError as exc:
                return Response(status=400, body=f"{exc}\n".encode())
            return Response(body=f"set new log level to {now}\n".encode())
        if request.path == "/healthz/ready":
            return await self.ready(request)
        if request.path == "/debug/connections":
            return self.connections(request)
        if request.path in ("/metrics", "/stats/prometheus"):
            return await self.stats(request)
        return Response(status=404, body=b"not found; try /config_dump, /logging?level=info or "
                                          b"/debug/connections?pod=NAME\n")

    def connections(self, request: Request) -> Response:
        """`/debug/connections?pod=<uid, ns/name or name>`: the live trace (telemetry/trace.py) of that pod's
        connections, or every pod's without `pod`, as JSON lines until the client leaves."""
        pods = request.query.get("pod")
        pod = pods[0] if pods else None
        running = [PodRef(uid=uid, info=h.context.info) for uid, h in self.parts.handler.pods.items()]
        trace = self.parts.telemetry.trace
        return Response(content_type="application/x-ndjson",
                        stream=lambda: stream_events(trace, pod, running))

    async def stats(self, request: Request) -> Response:
        if request.path in ("/metrics", "/stats/prometheus"):
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # first scrape: ~2.3 MiB

            return Response(body=generate_latest(self.parts.telemetry.metrics.registry),
                                content_type=CONTENT_TYPE_LATEST)
        return Response(status=404, body=b"not found; try /metrics or /stats/prometheus\n")

    async def ready(self, request: Request) -> Response:
        if request.path != "/healthz/ready":
            return Response(status=404, body=b"not found; try /healthz/ready\n")
        blocking = self.parts.readiness.blocking()
        if blocking:
            return Response(status=503, body=f"not ready: waiting for {', '.join(blocking)}\n".encode())
        return Response(body=b"ready\n")
