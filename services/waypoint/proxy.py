"""The waypoint's 15008: which CONNECT targets it serves, and each tunnel as HTTP or as opaque TCP.

Theory of operation
-------------------
The HBONE server (`serve_hbone_tunnels`, ztunnel's transport) terminates mTLS with the waypoint's own
certificate and hands every valid CONNECT to `WaypointProxy.handle`, in its own task. The target is served
(`served`) when it is

* a service VIP and one of its ports, and the service's waypoint is this one; or
* a workload's own ip:port, and the workload's waypoint is this one.

Anything else is answered `400` with a `connection failed` line naming why (a client ztunnel that sends
a service here whose waypoint is another, a stale xDS view, a direct dial).

The port's protocol is Istio's selection as the Address xDS carries it: `app_protocol` HTTP/1.1, HTTP/2 or
gRPC makes it HTTP, anything else opaque TCP.

* HTTP: 200 at once, then the tunnel's requests are served one by one (http.py), or concurrently when it
  speaks HTTP/2 (http2.py); besides each request's line, the tunnel ends in one `connection complete`
  line (`dst.addr` the waypoint's 15008, `dst.workload` the waypoint, `dst.service` the target's).
* Opaque TCP: L4 authorization over the policies that select the waypoint's own workload (401 on a
  deny), an endpoint chosen and connected (503 when none can be), 200, then bytes copied both ways with
  half-close; one `connection complete` line and the `istio_tcp_*` families, reported as `waypoint`.

A tunnel whose exchange broke mid-response is reset, never ended cleanly.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Final

import msgspec
import trio

from services.waypoint.http import HttpProxy, Tunnel, TunnelAborted, is_h2, sniff
from services.waypoint.http2 import serve_h2
from services.waypoint.telemetry import REPORTER, WaypointTelemetry
from services.waypoint.upstream import UpstreamError, Upstreams
from services.ztunnel.authz import AuthzRequest, authorize
from services.ztunnel.hbone.connection import HboneConnection
from services.ztunnel.hbone.core import ERROR_CANCEL, ERROR_INTERNAL
from services.ztunnel.hbone.server import InboundInfo, policy_rejection
from services.ztunnel.hbone.stream import HboneStream
from services.ztunnel.peers import workload_peer
from services.ztunnel.proxy.resolve import is_waypoint_of
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import AppProtocol, Port, Service, TunnelProtocol, Workload
from services.ztunnel.telemetry.access_log import ConnectionOutcome, Peer, format_addr
from shared.identity import SpiffeId

log = logging.getLogger("waypoint.proxy")

HTTP_PROTOCOLS: Final = frozenset({AppProtocol.HTTP11, AppProtocol.HTTP2, AppProtocol.GRPC})
READ_SIZE: Final = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class Served:
    service: Service | None
    workload: Workload | None
    """Set when the target is the workload's own address."""
    http: bool


def _port_of(service: Service, port: int, *, target: bool) -> Port | None:
    for p in service.ports:
        if (p.target_port or p.service_port if target else p.service_port) == port:
            return p
    return None


def served(store: StateStore, me: Workload, target: tuple[str, int]) -> Served | str:
    """What `target` is to the waypoint `me`: served (and how), or why not."""
    ip, port = target
    service = store.service_by_vip(ip)
    if service is not None:
        if service.waypoint is None or not is_waypoint_of(me, service.waypoint, store):
            return f"service {service.hostname} does not use this waypoint"
        sp = _port_of(service, port, target=False)
        if sp is None:
            return f"port {port} is not a port of service {service.hostname}"
        return Served(service=service, workload=None, http=sp.app_protocol in HTTP_PROTOCOLS)
    workload = store.workload_by_ip(ip)
    if workload is None:
        return f"{ip} is neither a service nor a workload that xDS knows"
    if workload.waypoint is None or not is_waypoint_of(me, workload.waypoint, store):
        return f"workload {workload.namespace}/{workload.name} does not use this waypoint"
    for key in sorted(workload.services):
        svc = store.service_by_key(key)
        sp = _port_of(svc, port, target=True) if svc is not None else None
        if svc is not None and sp is not None:
            return Served(service=svc, workload=workload, http=sp.app_protocol in HTTP_PROTOCOLS)
    return Served(service=None, workload=workload, http=False)


class WaypointProxy:
    """The `ConnectionPolicy` and the tunnel handler of the waypoint's 15008."""

    def __init__(self, *, store: StateStore, me: Workload | None, identity: SpiffeId, http: HttpProxy,
                 upstreams: Upstreams, telemetry: WaypointTelemetry, cluster: str | None = None,
                 instance_ip: str = "") -> None:
        self.store = store
        self._me = me
        self.identity = identity
        self.http = http
        self.upstreams = upstreams
        self.telemetry = telemetry
        self.cluster = cluster
        self.instance_ip = instance_ip
        self.connections: weakref.WeakSet[HboneConnection] = weakref.WeakSet()
        """The accepted connections still alive (for the drain)."""

    def me(self) -> Workload | None:
        """The waypoint's own workload: given, or found in xDS by INSTANCE_IP."""
        if self._me is not None:
            return self._me
        return self.store.workload_by_ip(self.instance_ip) if self.instance_ip else None

    # --- ConnectionPolicy ---

    def accepted(self, conn: HboneConnection) -> None:
        self.connections.add(conn)

    def refused(self, outcome: ConnectionOutcome) -> None:
        self.telemetry.connection_failed(src_addr=outcome.src_addr, dst_addr=outcome.dst_addr,
                                         direction="inbound", error=outcome.error or "refused")

    # --- tunnels ---

    def _source(self, info: InboundInfo) -> Peer:
        workload = self.store.workload_by_ip(info.src_addr[0])
        peer = workload_peer(workload, cluster=self.cluster) if workload is not None else Peer()
        return msgspec.structs.replace(peer, identity=info.src_identity.uri)

    async def handle(self, conn: HboneConnection, stream: HboneStream, info: InboundInfo) -> None:
        me = self.me()
        what = served(self.store, me, info.target) if me is not None else (
            "the waypoint's own workload is not in xDS yet")
        if isinstance(what, str):
            log.warning("waypoint does not serve this target", extra={"fields": [
                ("src.addr", format_addr(info.src_addr)), ("src.identity", info.src_identity.uri),
                ("dst.hbone_addr", format_addr(info.target)), ("reason", what)]})
            self.telemetry.connection_failed(src_addr=format_addr(info.src_addr),
                                             dst_addr=format_addr(info.dst_addr), direction="inbound",
                                             error=f"not served: {what}")
            conn.respond(stream, 400)
            return
        tunnel = Tunnel(src_addr=info.src_addr, src_identity=info.src_identity, src=self._source(info),
                        target=info.target, service=what.service, workload=what.workload)
        assert me is not None
        http_tunnel: ConnectionOutcome | None = None
        try:
            if what.http:
                # The tunnel's own L4 line (`connection complete`) besides one line per request.
                http_tunnel = self._outcome(info, tunnel, workload_peer(
                    me, mtls=True, service=what.service, cluster=self.cluster))
                http_tunnel.dst_addr = format_addr(info.dst_addr)
                http_tunnel.status = 200
                conn.respond(stream, 200)
                self.telemetry.connection_opened(http_tunnel)
                first = await sniff(stream)
                if is_h2(first):
                    await serve_h2(self.http, stream, tunnel, first)
                else:
                    await self.http.serve(stream, tunnel, first)
            else:
                await self._tcp(conn, stream, info, tunnel, me)
        except (TunnelAborted, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("waypoint tunnel aborted", extra={"fields": [
                ("src.addr", format_addr(info.src_addr)), ("dst.hbone_addr", format_addr(info.target)),
                ("error", str(exc))]})
            if http_tunnel is not None:
                http_tunnel.error = str(exc.__cause__ or exc) or "the tunnel was aborted"
            stream.reset(ERROR_CANCEL)
        except Exception as exc:
            # A bug: this stream fails, the connection and its other streams carry on.
            log.exception("waypoint tunnel failed", extra={"fields": [
                ("src.addr", format_addr(info.src_addr)), ("dst.hbone_addr", format_addr(info.target))]})
            if http_tunnel is not None:
                http_tunnel.error = f"internal error: {exc!r}"
            if stream.status is None:
                conn.respond(stream, 503)
            else:
                stream.reset(ERROR_INTERNAL)
        except BaseException:
            if http_tunnel is not None:
                http_tunnel.error = "connection drained"
            stream.reset(ERROR_CANCEL)
            raise
        finally:
            stream.close_nowait()
            if http_tunnel is not None:
                http_tunnel.bytes_sent = stream.bytes_received  # client -> waypoint
                http_tunnel.bytes_recv = stream.bytes_sent
                self.telemetry.connection_complete(http_tunnel)

    def _outcome(self, info: InboundInfo, tunnel: Tunnel, dst: Peer) -> ConnectionOutcome:
        target = format_addr(info.target)
        outcome = ConnectionOutcome(direction="inbound", src_addr=format_addr(info.src_addr),
                                    dst_addr=target, dst_hbone_addr=target, src=tunnel.src, dst=dst)
        outcome.reporter = REPORTER
        return outcome

    async def _tcp(self, conn: HboneConnection, stream: HboneStream, info: InboundInfo, tunnel: Tunnel,
                   me: Workload) -> None:
        outcome = self._outcome(info, tunnel, Peer())
        try:
            decision = authorize(self.store.policies.values(), me, AuthzRequest(
                src_ip=info.src_addr[0], dst_ip=info.target[0], dst_port=info.target[1],
                src_identity=info.src_identity))
            outcome.verdict = decision
            if not decision.allowed:
                outcome.status = 401
                outcome.error = policy_rejection(decision.reason)
                conn.respond(stream, 401)
                return
            try:
                opened = await self.upstreams.open(info.target, forwarded_for=info.src_addr)
            except UpstreamError as exc:
                outcome.status = 503
                outcome.error = str(exc)
                conn.respond(stream, 503)
                return
            outcome.dst_addr = format_addr(opened.addr)
            if opened.workload is not None:
                outcome.dst = workload_peer(opened.workload, service=opened.service or tunnel.service,
                                            mtls=opened.workload.tunnel_protocol is TunnelProtocol.HBONE,
                                            cluster=self.cluster)
            outcome.status = 200
            conn.respond(stream, 200)
            self.telemetry.connection_opened(outcome)
            async with opened.stream as upstream:
                await copy_both_ways(stream, upstream, outcome)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            outcome.error = str(exc.__cause__ or exc) or "the stream was closed"
            raise
        finally:
            self.telemetry.connection_complete(outcome)


async def copy_both_ways(client: trio.abc.HalfCloseableStream, upstream: trio.abc.HalfCloseableStream,
                         outcome: ConnectionOutcome) -> None:
    """Copy until both directions ended (each EOF passed on as a half-close); bytes counted on `outcome`."""
    async def one_way(src: trio.abc.ReceiveStream, dst: trio.abc.HalfCloseableStream, sent: bool) -> None:
        while data := await src.receive_some(READ_SIZE):
            await dst.send_all(data)
            if sent:
                outcome.bytes_sent += len(data)
            else:
                outcome.bytes_recv += len(data)
        await dst.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one_way, client, upstream, True)
        nursery.start_soon(one_way, upstream, client, False)
