"""A pod's connection handlers with the mesh: HBONE out (15001), HBONE in (15008), authorized plaintext in
(15006). Without xDS (`ctx.mesh is None`) each falls back to plain passthrough (passthrough.py).

Theory of operation
-------------------
Outbound (15001): the original destination is resolved against the xDS state from the pod's own workload
(`resolve_outbound`, hbone/resolve.py):

    Passthrough        -> plain TCP from the pod's netns to the route's address (an unknown destination, or a
                          workload outside the mesh), as without xDS
    NoHealthyUpstream  -> a `connection failed` line with the reason; the app's connection is closed
    HboneRoute         -> a CONNECT stream on the pod's pool (mTLS with the pod identity's certificate, to
                          the peer's 15008, verified against the expected SPIFFE identities), relayed until
                          both sides end; one `connection complete` line with both identities, `dst.addr` =
                          the peer's 15008 and `dst.hbone_addr` = the target

Inbound HBONE (15008): `serve_hbone_connection` with the pod identity's certificate; each CONNECT is
authorized against the current policies (`authorize_from_state`, with the peer's verified identity),
delivered to the app from the client's own IP (the transparent upstream socket; the peer connects from the
client pod's netns, so its TCP source is the client pod IP), and logged once when it ends, with `dst.addr` =
this pod's 15008 and `dst.hbone_addr` = the app address. When the pod drains gracefully (ztunnel shutdown),
each inbound connection gets a GOAWAY as soon as it carries no tunnel.

Inbound plaintext (15006): the same policies with no identity, then passthrough to the app.

The pod's own workload comes from xDS (name, namespace and service account of the ZDS WorkloadInfo, among
this node's workloads); a connection that needs it and finds none waits up to 5 s for xDS, then fails.
"""

from __future__ import annotations

import logging
import socket
import time

import trio

from services.ztunnel.authz import AuthzRequest, Decision, authorize_from_state
from services.ztunnel.errors import ConnectError
from services.ztunnel.hbone.connection import HboneConnection
from services.ztunnel.hbone.core import Addr
from services.ztunnel.hbone.outbound import tunnel_outbound
from services.ztunnel.hbone.server import InboundInfo, InboundRecord, serve_hbone_connection
from services.ztunnel.hbone.stream import HboneStream
from services.ztunnel.net import connect, local_addr
from services.ztunnel.peers import workload_peer
from services.ztunnel.proxy import passthrough
from services.ztunnel.proxy.context import Mesh, PodContext
from services.ztunnel.proxy.resolve import HboneRoute, NoHealthyUpstream, resolve_outbound
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import Service, Workload
from services.ztunnel.telemetry.access_log import ConnectionRecord, Peer, format_addr
from shared.netns import NetnsError

log = logging.getLogger("ztunnel.proxy")

POLICY_REJECTION = "connection closed due to policy rejection"


def _no_workload(ctx: PodContext) -> str:
    info = ctx.info
    who = f"{info.namespace}/{info.name} (service account {info.service_account or 'default'})" if info \
        else f"uid {ctx.uid}"
    node = ctx.mesh.node if ctx.mesh is not None and ctx.mesh.node else "this node"
    return (f"unknown source workload: xDS has no workload for pod {who} on {node}, so it has no identity "
            f"(is the pod in the control plane's world, and NODE_NAME right?)")


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


# --- outbound (15001) -----------------------------------------------------------------------------------


def baggage_of(workload: Workload, *, cluster: str | None = None, region: str | None = None,
               zone: str | None = None) -> str:
    """The `baggage` header upstream sends for a source workload (SPEC §5): only the keys it knows.

    `k8s.cluster.name, k8s.namespace.name, k8s.<workload_type>.name, service.name, service.version,
    cloud.region, cloud.availability_zone`, comma-joined.
    """
    items = [
        ("k8s.cluster.name", cluster or workload.cluster_id),
        ("k8s.namespace.name", workload.namespace),
        (f"k8s.{workload.workload_type.value}.name", workload.workload_name),
        ("service.name", workload.canonical_name),
        ("service.version", workload.canonical_revision),
        ("cloud.region", region),
        ("cloud.availability_zone", zone),
    ]
    return ",".join(f"{key}={value}" for key, value in items if value)



async def handle_outbound(ctx: PodContext, client: socket.socket, peer: Addr) -> None:
    """A connection the pod's app made, redirected to 15001: HBONE, passthrough or refused, by xDS."""
    mesh, pool = ctx.mesh, ctx.pool
    if mesh is None or pool is None:
        await passthrough.handle_outbound(ctx, client, peer)
        return
    dst = passthrough.outbound_dst(ctx, client, peer)
    if dst is None:
        return
    source = ctx.workload()
    route = resolve_outbound(mesh.store, dst, source=source)
    if isinstance(route, NoHealthyUpstream):
        ctx.telemetry.connection_failed(src_addr=format_addr(peer), dst_addr=format_addr(dst),
                                        direction="outbound", error=route.reason)
        return
    if not isinstance(route, HboneRoute):
        dst_peer = (workload_peer(route.workload, service=route.service) if route.workload is not None
                    else ctx.peers.by_address(dst[0]) or Peer())
        record = ConnectionRecord(direction="outbound", src_addr=format_addr(peer),
                                  dst_addr=format_addr(route.dst), src=ctx.peer, dst=dst_peer)
        await passthrough.proxy_outbound(ctx, client, route.dst, record)
        return
    if source is None:
        source = await ctx.wait_workload()
        if source is None:
            ctx.telemetry.connection_failed(src_addr=format_addr(peer), dst_addr=format_addr(dst),
                                            direction="outbound", error=_no_workload(ctx))
            return
    await _tunnel(ctx, mesh, client, peer, source, route)


async def _tunnel(ctx: PodContext, mesh: Mesh, client: socket.socket, peer: Addr, source: Workload,
                  route: HboneRoute) -> None:
    assert ctx.pool is not None
    cluster = ctx.config.cluster_id
    record = ConnectionRecord(
        direction="outbound", src_addr=format_addr(peer), dst_addr=format_addr(route.dst),
        dst_hbone_addr=format_addr(route.target),
        src=workload_peer(source, mtls=True, cluster=cluster),
        dst=workload_peer(route.workload, mtls=True, service=route.service, cluster=cluster))
    opened = False

    def on_open(stream: HboneStream) -> None:
        nonlocal opened
        opened = True
        ctx.telemetry.connection_opened(record)

    error: str | None = "connection drained"
    ctx.active_connections += 1
    try:
        result = await tunnel_outbound(ctx.pool, route, client, src_identity=source.identity, src_addr=peer,
                                       baggage=baggage_of(source, cluster=cluster), on_open=on_open)
        record.bytes_sent, record.bytes_recv = result.bytes_sent, result.bytes_recv
        error = result.error
    finally:
        ctx.active_connections -= 1
        ctx.telemetry.connection_complete(record, error=error, opened=opened)


# --- inbound HBONE (15008) ------------------------------------------------------------------------------


class _Inbound:
    """The callbacks `serve_hbone_connection` runs for one accepted 15008 connection of a pod."""

    def __init__(self, ctx: PodContext, mesh: Mesh, workload: Workload) -> None:
        self.ctx = ctx
        self.mesh = mesh
        self.workload = workload
        # The ends of the last record: every stream of a connection has the same, so the look-ups run once
        # per connection and xDS generation, not twice per stream (opened, then complete).
        self._ends: tuple[tuple[str, int, int], Peer, Peer] | None = None

    def authorize(self, info: InboundInfo) -> Decision:
        decision = authorize_from_state(self.mesh.store, info.authz_request())
        if not decision.allowed:
            log.info("inbound HBONE stream denied", extra={"fields": [
                ("src.addr", format_addr(info.src_addr)), ("src.identity", info.src_identity.uri),
                ("dst.hbone_addr", format_addr(info.target)), ("reason", decision.reason)]})
        return decision

    async def open_upstream(self, info: InboundInfo) -> socket.socket:
        try:
            sock = passthrough.inbound_upstream(self.ctx, info.src_addr, info.target)
        except NetnsError as exc:
            raise ConnectError(str(exc)) from exc
        try:
            await connect(sock, info.target, connect_timeout=self.ctx.config.connect_timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def record(self, src_addr: Addr, dst_addr: Addr, target: Addr,
               src_identity: str | None) -> ConnectionRecord:
        ctx = self.ctx
        store = self.mesh.store
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
        if src_identity is not None and src.identity != src_identity:
            src = Peer(workload=src.workload, namespace=src.namespace, identity=src_identity,
                       cluster=src.cluster, service=src.service)
        return ConnectionRecord(direction="inbound", src_addr=format_addr(src_addr),
                                dst_addr=format_addr(dst_addr), dst_hbone_addr=format_addr(target), src=src,
                                dst=dst)

    def on_open(self, info: InboundInfo) -> None:
        self.ctx.telemetry.connection_opened(
            self.record(info.src_addr, info.dst_addr, info.target, info.src_identity.uri))

    def on_complete(self, done: InboundRecord) -> None:
        tel = self.ctx.telemetry
        if done.target is None:  # the connection (TLS, identity) or the request (400) was refused
            tel.connection_failed(src_addr=format_addr(done.src_addr), dst_addr=format_addr(done.dst_addr),
                                  direction="inbound",
                                  error=done.error or f"rejected with status {done.status}")
            return
        record = self.record(done.src_addr, done.dst_addr, done.target,
                             done.src_identity.uri if done.src_identity is not None else None)
        record.bytes_sent = done.bytes_recv  # un-flipped: client -> app
        record.bytes_recv = done.bytes_sent
        record.start = time.monotonic() - done.duration
        tel.connection_complete(record, error=done.error, opened=done.status == 200)


async def handle_inbound_hbone(ctx: PodContext, client: socket.socket, peer: Addr) -> None:
    """A connection to the pod's 15008: terminate mTLS as the pod's identity and serve its CONNECTs."""
    mesh = ctx.mesh
    if mesh is None:
        await passthrough.handle_inbound_hbone(ctx, client, peer)
        return
    workload = ctx.workload() or await ctx.wait_workload()
    if workload is None:
        ctx.telemetry.connection_failed(src_addr=format_addr(peer), dst_addr=format_addr(local_addr(client)),
                                        direction="inbound", error=_no_workload(ctx))
        return
    inbound = _Inbound(ctx, mesh, workload)
    ctx.active_connections += 1
    try:
        async with trio.open_nursery() as watchers:
            def on_connection(conn: HboneConnection) -> None:
                watchers.start_soon(_goaway_when_draining, ctx, conn)

            await serve_hbone_connection(client, peer, identity=workload.identity, certs=mesh.certs,
                                         contexts=mesh.contexts, authorize=inbound.authorize,
                                         open_upstream=inbound.open_upstream, on_open=inbound.on_open,
                                         on_complete=inbound.on_complete, on_connection=on_connection)
            watchers.cancel_scope.cancel()
    finally:
        ctx.active_connections -= 1


async def _goaway_when_draining(ctx: PodContext, conn: HboneConnection) -> None:
    """Graceful drain: once the connection carries no tunnel, GOAWAY and close it. A client's pool keeps an
    idle connection for minutes; the pod's proxy set must not wait for that."""
    await ctx.draining.wait()
    while conn.active_streams and not conn.dead:
        await conn.wait_activity()
    conn.close()


# --- inbound plaintext (15006) --------------------------------------------------------------------------


async def handle_inbound_plaintext(ctx: PodContext, client: socket.socket, peer: Addr) -> None:
    """A plaintext connection to the pod, redirected to 15006: authorized (no identity), then delivered."""
    mesh = ctx.mesh
    if mesh is None:
        await passthrough.handle_inbound_plaintext(ctx, client, peer)
        return
    dst = passthrough.inbound_dst(ctx, client, peer)
    if dst is None:
        return
    record = passthrough.inbound_record(ctx, peer, dst)
    decision = authorize_from_state(mesh.store, AuthzRequest(src_ip=peer[0], dst_ip=dst[0], dst_port=dst[1]))
    if not decision.allowed:
        error = f"{POLICY_REJECTION}: {decision.reason}" if decision.reason else POLICY_REJECTION
        ctx.telemetry.connection_complete(record, error=error, opened=False)
        return
    await passthrough.proxy_inbound(ctx, client, peer, dst, record)

