"""Where the waypoint sends what it serves: an endpoint of a service, and the stream to it.

Theory of operation
-------------------
A backend is named by a service hostname and port (routes.py) or is the CONNECT target itself. Either way
it becomes a destination `ip:port` (the service's VIP and port) that is resolved as ztunnel resolves
outbound, but never back through a waypoint (`resolve_outbound(via_waypoints=False)`): one healthy endpoint
drawn with the waypoint's RNG, its target port mapped. An HBONE endpoint gets a CONNECT `podIP:targetPort`
to its 15008 on the waypoint's pool (its own identity; the endpoint's expected), an endpoint outside the
mesh a plain TCP connection. Connect failures are retried `retries` more times, each with an endpoint
drawn afresh; what cannot be reached ends in an `UpstreamError` with Envoy's status, response flag and
words (503 `UH` no healthy upstream, 503 `UF` connection failure, 503 `NC` unknown service).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import trio

from services.ztunnel.hbone.pool import HbonePool
from services.ztunnel.net import describe_os_error
from services.ztunnel.proxy.resolve import HboneRoute, NoHealthyUpstream, Passthrough, resolve_outbound
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import Service, Workload
from shared.addr import Addr, format_host_port
from shared.errors import AmbientError
from shared.identity import SpiffeId


class UpstreamError(Exception):
    """No stream to any endpoint: answer `status` with `body`, log `response_flag` and the reason."""

    def __init__(self, status: int, response_flag: str, reason: str, body: str) -> None:
        super().__init__(reason)
        self.status = status
        self.response_flag = response_flag
        self.body = body


def connect_failure(detail: str) -> UpstreamError:
    body = ("upstream connect error or disconnect/reset before headers. reset reason: connection failure, "
            f"transport failure reason: {detail}")
    return UpstreamError(503, "UF", detail, body)


@dataclass(frozen=True, kw_only=True)
class Opened:
    """A stream to one endpoint: `addr` is the `ip:port` it carries to (Envoy's upstream host)."""

    stream: trio.abc.HalfCloseableStream
    addr: Addr
    workload: Workload | None
    service: Service | None
    attempts: int

    @property
    def host(self) -> str:
        return format_host_port(*self.addr)


class Upstreams:
    """The endpoints of the services a waypoint serves, and its pool of HBONE connections to them."""

    def __init__(self, store: StateStore, pool: HbonePool, identity: SpiffeId, *,
                 rng: random.Random | None = None, connect_timeout: float = 10.0) -> None:
        self.store = store
        self.pool = pool
        self.identity = identity
        self.rng = rng if rng is not None else random.Random()
        self.connect_timeout = connect_timeout

    def service_by_hostname(self, hostname: str) -> Service | None:
        for service in self.store.services.values():
            if service.hostname == hostname:
                return service
        return None

    def backend_addr(self, hostname: str, port: int) -> Addr:
        """The VIP:port of service `hostname`. Raises UpstreamError (NC) for an unknown service."""
        service = self.service_by_hostname(hostname)
        if service is None or not service.addresses:
            raise UpstreamError(503, "NC", f"no service {hostname} is known", "no healthy upstream")
        return (service.addresses[0].address, port)

    async def open(self, dst: Addr, *, forwarded_for: Addr, retries: int = 0,
                   host: str | None = None) -> Opened:
        """A stream to an endpoint of `dst` (a VIP:port or a workload ip:port). Raises UpstreamError."""
        failure: UpstreamError | None = None
        for attempt in range(1, retries + 2):
            route = resolve_outbound(self.store, dst, via_waypoints=False, choose=self.rng.choice)
            if isinstance(route, NoHealthyUpstream):
                raise UpstreamError(503, "UH", route.reason, "no healthy upstream")
            try:
                return await self._connect(route, forwarded_for, host, attempt)
            except OSError as exc:
                failure = connect_failure(describe_os_error(exc))
            except trio.TooSlowError:
                failure = connect_failure(f"connect timed out after {self.connect_timeout:g}s")
            except AmbientError as exc:  # connect, TLS, identity, CONNECT status, connection closed
                failure = connect_failure(str(exc))
        assert failure is not None
        raise failure

    async def _connect(self, route: HboneRoute | Passthrough, forwarded_for: Addr, host: str | None,
                       attempt: int) -> Opened:
        if isinstance(route, HboneRoute):
            stream = await self.pool.connect(route.pool_key(self.identity), route.target,
                                             forwarded_for=forwarded_for, host=host)
            return Opened(stream=stream, addr=route.target, workload=route.workload,
                          service=route.service, attempts=attempt)
        with trio.fail_after(self.connect_timeout):
            sock_stream = await trio.open_tcp_stream(*route.dst)
        return Opened(stream=sock_stream, addr=route.dst, workload=route.workload,
                      service=route.service, attempts=attempt)
