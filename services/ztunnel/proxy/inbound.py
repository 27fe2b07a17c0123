"""A pod's inbound HBONE (15008): terminate mTLS as the pod's identity, authorize each tunnel, deliver it.

Theory of operation
-------------------
Without xDS there are no identities: 15008 stays bound and accepting, and each connection is closed with a
log line. With xDS, `serve_hbone_connection` (hbone/server.py) runs the connection with the pod identity's
certificate and asks this module's `InboundPolicy`, one per connection:

* each CONNECT is authorized against the current policies (`authorize_from_state`, with the peer's verified
  identity; a deny is logged here and answered 401 by the server);
* it is delivered to the app from the client's own IP (`app_socket`, tcp.py: the peer connects from the
  client pod's netns, so its TCP source is the client pod IP);
* it ends in one `ConnectionOutcome`, written when the stream ends, with `dst.addr` = this pod's 15008 and
  `dst.hbone_addr` = the app address; its ends are looked up once per connection and xDS generation.

When the pod drains gracefully (ztunnel shutdown), each inbound connection gets a GOAWAY as soon as it
carries no tunnel. The pod's own workload comes from xDS; a connection that finds none waits up to 5 s for
xDS, then fails.
"""

from __future__ import annotations

import logging
import socket

import msgspec
import trio

from services.ztunnel.authz import AuthzRequest, Decision, authorize_from_state
from services.ztunnel.errors import ConnectError
from services.ztunnel.hbone.connection import HboneConnection
from services.ztunnel.hbone.server import InboundInfo, serve_hbone_connection
from services.ztunnel.net import connect, local_addr
from services.ztunnel.peers import workload_peer
from services.ztunnel.proxy.context import Mesh, PodContext
from services.ztunnel.proxy.tcp import app_socket
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import Service, Workload
from services.ztunnel.telemetry.access_log import ConnectionOutcome, Peer, format_addr
from shared.addr import Addr
from shared.netns import NetnsError

log = logging.getLogger("ztunnel.proxy")


def authz_request(info: InboundInfo) -> AuthzRequest:
    """What `authz` decides on: the TCP peer's IP, the target, and the verified peer identity."""
    return AuthzRequest(src_ip=info.src_addr[0], dst_ip=info.target[0], dst_port=info.target[1],
                        src_identity=info.src_identity)


def forwarded_host(forwarded: str | None) -> str | None:
    """The `host=` parameter of a `Forwarded` header (RFC 7239; the client's ztunnel names the service it
    resolved this way), unquoted; None when absent or empty."""
    if not forwarded:
        return None
    for part in forwarded.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name.strip().lower() == "host":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value or None
    return None


def service_for_port(store: StateStore, workload: Workload, port: int) -> Service | None:
    """The service of `workload` that maps some port to its `port` (for `dst.service` of inbound lines)."""
    for key, ports in sorted(workload.services.items()):
        service = store.service_by_key(key)
        if service is None:
            continue
        for p in ports or service.ports:
            if (p.target_port or p.service_port) == port:
                return service
    return None


class _Inbound:
    """The `InboundPolicy` of one accepted 15008 connection of a pod."""

    def __init__(self, ctx: PodContext, mesh: Mesh, workload: Workload, watchers: trio.Nursery) -> None:
        self.ctx = ctx
        self.mesh = mesh
        self.workload = workload
        self.watchers = watchers
        # The ends of the last outcome: every stream of a connection has the same, so the look-ups run once
        # per connection and xDS generation, not once per stream.
        self._ends: tuple[tuple[str, int, int], Peer, Peer] | None = None
        self.held = 0
        """App connections of this connection's streams counted in the pod's connection caps."""

    def accepted(self, conn: HboneConnection) -> None:
        self.watchers.start_soon(_goaway_when_draining, self.ctx, conn)

    def refused(self, outcome: ConnectionOutcome) -> None:
        self.ctx.telemetry.connection_failed(src_addr=outcome.src_addr, dst_addr=outcome.dst_addr,
                                             direction="inbound", error=outcome.error or "refused")

    def authorize(self, info: InboundInfo) -> Decision:
        decision = authorize_from_state(self.mesh.store, authz_request(info))
        if not decision.allowed:
            log.info("inbound HBONE stream denied", extra={"fields": [
                ("src.addr", format_addr(info.src_addr)), ("src.identity", info.src_identity.uri),
                ("dst.hbone_addr", format_addr(info.target)), ("reason", decision.reason)]})
        return decision

    async def open_upstream(self, info: InboundInfo) -> socket.socket:
        # The app connection counts against the caps (proxy/limits.py) until the stream ends (`closed`).
        # Over a cap the stream is answered 503 and its access-log line names the limit.
        connections = self.ctx.connections
        refusal = connections.acquire()
        if refusal is not None:
            raise ConnectError(refusal)
        try:
            try:
                sock = app_socket(self.ctx, info.src_addr, info.target)
            except NetnsError as exc:
                raise ConnectError(str(exc)) from exc
            try:
                await connect(sock, info.target, connect_timeout=self.ctx.config.connect_timeout)
            except BaseException:
                sock.close()
                raise
        except BaseException:
            connections.release()
            raise
        self.held += 1
        return sock

    def outcome(self, info: InboundInfo) -> ConnectionOutcome:
        ctx = self.ctx
        store = self.mesh.store
        src_addr, target = info.src_addr, info.target
        key = (src_addr[0], target[1], store.generation)
        if self._ends is not None and self._ends[0] == key:
            src, dst = self._ends[1], self._ends[2]
        else:
            src_workload = store.workload_by_ip(src_addr[0])
            src = (workload_peer(src_workload, cluster=ctx.config.cluster_id) if src_workload is not None
                   else ctx.peers.by_address(src_addr[0]) or Peer())
            dst = workload_peer(self.workload, mtls=True, cluster=ctx.config.cluster_id,
                                service=service_for_port(store, self.workload, target[1]))
            if src_workload is not None:
                self._ends = (key, src, dst)
        src_identity = info.src_identity.uri
        if src.identity != src_identity:
            src = msgspec.structs.replace(src, identity=src_identity)
        outcome = ConnectionOutcome(direction="inbound", src_addr=format_addr(src_addr),
                                    dst_addr=format_addr(info.dst_addr), dst_hbone_addr=format_addr(target),
                                    src=src, dst=dst)
        outcome.for_host = forwarded_host(info.forwarded)
        return outcome

    def opened(self, outcome: ConnectionOutcome) -> None:
        self.ctx.telemetry.connection_opened(outcome)

    def closed(self, outcome: ConnectionOutcome) -> None:
        # 200 is answered only once open_upstream returned (the server sets it right after, with no await
        # in between): exactly the streams that hold an app connection.
        if outcome.status == 200 and self.held:
            self.held -= 1
            self.ctx.connections.release()
        self.ctx.telemetry.connection_complete(outcome)

    def release_all(self) -> None:
        """The connection is over: give back what its streams still hold (none, unless a stream ended
        without its `closed`)."""
        for _ in range(self.held):
            self.ctx.connections.release()
        self.held = 0


async def handle_inbound_hbone(ctx: PodContext, client: socket.socket, peer: Addr) -> None:
    """A connection to the pod's 15008: terminate mTLS as the pod's identity and serve its CONNECTs."""
    mesh = ctx.mesh
    if mesh is None:
        log.warning("inbound HBONE needs the control plane (XDS_ADDRESS is not set); closing the connection",
                    extra={"fields": [("src.addr", format_addr(peer)),
                                      ("dst.addr", format_addr(local_addr(client))), ("pod", ctx.uid)]})
        await trio.lowlevel.checkpoint()
        return
    workload = ctx.workload() or await ctx.wait_workload()
    if workload is None:
        ctx.telemetry.connection_failed(src_addr=format_addr(peer), dst_addr=format_addr(local_addr(client)),
                                        direction="inbound", error=ctx.missing_workload())
        return
    ctx.counters.active_connections += 1
    try:
        async with trio.open_nursery() as watchers:
            policy = _Inbound(ctx, mesh, workload, watchers)
            try:
                await serve_hbone_connection(client, peer, identity=workload.identity, certs=mesh.certs,
                                             contexts=mesh.contexts, policy=policy)
            finally:
                policy.release_all()
            watchers.cancel_scope.cancel()
    finally:
        ctx.counters.active_connections -= 1


async def _goaway_when_draining(ctx: PodContext, conn: HboneConnection) -> None:
    """Graceful drain: once the connection carries no tunnel, GOAWAY and close it. A client's pool keeps an
    idle connection for minutes; the pod's proxy set must not wait for that."""
    await ctx.draining.wait()
    while conn.active_streams and not conn.dead:
        await conn.wait_activity()
    conn.close()
