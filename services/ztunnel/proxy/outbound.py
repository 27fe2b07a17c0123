"""A pod's outbound connections (15001): what the app dialled, resolved, then passthrough or HBONE.

Theory of operation
-------------------
The original destination (netfilter SO_ORIGINAL_DST) is where the app was going. One of this ztunnel's own
listeners there (`is_self_call`) is refused at once, as upstream refuses a self call: it would loop back
into ztunnel without end (one `connection failed` line, counted as failed). Without xDS
(`ctx.mesh is None`) every connection is plain TCP passthrough to it. With xDS it is resolved against the
state from the pod's own workload (`resolve_outbound`, resolve.py):

    Passthrough        -> plain TCP from the pod's netns to the route's address (an unknown destination, or a
                          workload outside the mesh), as without xDS
    NoHealthyUpstream  -> a `connection failed` line with the reason; the app's connection is reset
    HboneRoute         -> a CONNECT stream on the pod's pool (mTLS with the pod identity's certificate, to
                          the peer's 15008, verified against the expected SPIFFE identities), relayed until
                          both sides end; one `connection complete` line with both identities, `dst.addr` =
                          the peer's 15008 and `dst.hbone_addr` = the target

Plain TCP goes through `proxy_tcp` (tcp.py): a socket made in the pod's netns with SO_MARK 1337, so the
pod's own redirect rules skip it. The tunnel (`tunnel`) is a pooled stream (hbone/pool.py) and the relay
(hbone/relay.py). Either way the connection ends in one `ConnectionOutcome` for the access log and the
metrics. A connection that needs the pod's workload (for its identity) and finds none waits up to 5 s for
xDS, then fails.

A connection that was resolved to a destination but not carried to a clean end (no healthy upstream, the
workload missing, the tunnel not opened: the peer's 15008 unreachable, TLS or the CONNECT failed, a
passthrough upstream refused) is reset (`abort_on_close`: SO_LINGER 0, so the close sends RST). The app's
connect succeeded because ztunnel accepted it, so a FIN would read as the destination's clean, empty
answer; only a tunnel whose peer half-closed cleanly ends in a FIN (hbone/relay.py). A connection refused
before resolution (a self call, no original destination) is closed as upstream closes it.
"""

from __future__ import annotations

import socket

import trio

from services.ztunnel.hbone.core import ERROR_CANCEL
from services.ztunnel.hbone.errors import HttpStatusError
from services.ztunnel.hbone.pool import HbonePool
from services.ztunnel.hbone.relay import abort_on_close, relay
from services.ztunnel.net import SELF_CALL_ERROR, ZTUNNEL_PORTS, describe_os_error, local_addr
from services.ztunnel.peers import workload_peer
from services.ztunnel.proxy.context import Mesh, PodContext
from services.ztunnel.proxy.resolve import HboneRoute, NoHealthyUpstream, resolve_outbound
from services.ztunnel.proxy.tcp import proxy_tcp
from services.ztunnel.state.types import Workload
from services.ztunnel.telemetry.access_log import ConnectionOutcome, Peer, Telemetry, format_addr
from shared.addr import Addr
from shared.errors import AmbientError
from shared.identity import SpiffeId


def baggage_of(workload: Workload, *, cluster: str | None = None, region: str | None = None,
               zone: str | None = None) -> str:
    """The `baggage` header upstream sends for a source workload: only the keys it knows.

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


def is_self_call(dst: Addr, client: socket.socket, mesh: Mesh | None) -> bool:
    """Whether the original destination `dst` is one of this ztunnel's own listeners: one of ztunnel's ports
    on the very listener the connection reached (`client`'s local address: not redirected, as an app dialling
    its own pod IP goes out on `lo`, which the pod's rules leave alone), on a loopback address, or on the IP
    of a pod of this node (xDS). One set lookup for any other port; nothing more per connection."""
    if dst[1] not in ZTUNNEL_PORTS:
        return False
    ip = dst[0]
    if ip.startswith("127.") or ip == "::1" or dst == local_addr(client):
        return True
    if mesh is None:
        return False
    workload = mesh.store.workload_by_ip(ip)
    return workload is not None and (not mesh.node or workload.node == mesh.node)


async def handle_outbound(ctx: PodContext, client: socket.socket, peer: Addr) -> None:
    """A connection the pod's app made, redirected to 15001: HBONE, passthrough or refused, by xDS."""
    dst = ctx.sockets.original_dst(client)
    if dst is None:
        ctx.telemetry.connection_failed(src_addr=format_addr(peer), dst_addr=format_addr(local_addr(client)),
                                        direction="outbound",
                                        error="no original destination (connection was not redirected)")
        return
    mesh, pool = ctx.mesh, ctx.pool
    if is_self_call(dst, client, mesh):
        refused = ConnectionOutcome(direction="outbound", src_addr=format_addr(peer),
                                    dst_addr=format_addr(dst), src=ctx.peer,
                                    dst=ctx.peers.by_address(dst[0]) or Peer())
        ctx.telemetry.connection_failed(src_addr=refused.src_addr, dst_addr=refused.dst_addr,
                                        direction="outbound", error=SELF_CALL_ERROR, outcome=refused)
        return
    if mesh is None or pool is None:
        await proxy_tcp(ctx, client, dst, ConnectionOutcome(
            direction="outbound", src_addr=format_addr(peer), dst_addr=format_addr(dst), src=ctx.peer,
            dst=ctx.peers.by_address(dst[0]) or Peer()))
        return
    source = ctx.workload()
    route = resolve_outbound(mesh.store, dst, source=source)
    if isinstance(route, NoHealthyUpstream):
        ctx.telemetry.connection_failed(src_addr=format_addr(peer), dst_addr=format_addr(dst),
                                        direction="outbound", error=route.reason)
        abort_on_close(client)
        return
    if not isinstance(route, HboneRoute):
        dst_peer = (workload_peer(route.workload, service=route.service) if route.workload is not None
                    else ctx.peers.by_address(dst[0]) or Peer())
        outcome = ConnectionOutcome(
            direction="outbound", src_addr=format_addr(peer), dst_addr=format_addr(route.dst), src=ctx.peer,
            dst=dst_peer)
        outcome.original = dst
        await proxy_tcp(ctx, client, route.dst, outcome)
        return
    if source is None:
        source = await ctx.wait_workload()
        if source is None:
            ctx.telemetry.connection_failed(src_addr=format_addr(peer), dst_addr=format_addr(dst),
                                            direction="outbound", error=ctx.missing_workload())
            abort_on_close(client)
            return
    cluster = ctx.config.cluster_id
    outcome = ConnectionOutcome(
        direction="outbound", src_addr=format_addr(peer), dst_addr=format_addr(route.dst),
        dst_hbone_addr=format_addr(route.target),
        src=workload_peer(source, mtls=True, cluster=cluster),
        dst=workload_peer(route.workload, mtls=True, service=route.service, cluster=cluster))
    outcome.original = dst
    if route.via_waypoint:
        outcome.waypoint = route.workload.workload_name or route.workload.name
    outcome.error = "connection drained"
    ctx.counters.active_connections += 1
    try:
        await tunnel(pool, route, client, outcome, src_identity=source.identity, src_addr=peer,
                     baggage=baggage_of(source, cluster=cluster), telemetry=ctx.telemetry)
    finally:
        ctx.counters.active_connections -= 1
        ctx.telemetry.connection_complete(outcome)


async def tunnel(pool: HbonePool, route: HboneRoute, client: socket.socket, outcome: ConnectionOutcome, *,
                 src_identity: SpiffeId, src_addr: Addr, baggage: str | None = None,
                 telemetry: Telemetry) -> None:
    """Open a pooled CONNECT stream for `route` and relay `client` through it until both sides end.

    Fills `outcome`: the CONNECT answer (`status`), the bytes from the client's side and, on failure, the
    `error` in upstream's words (`http status: 401 Unauthorized`, `io error: Connection refused (os error
    111)`, ...). Failures never raise (except cancellation, which resets the stream).

    Args:
        pool: the source pod's pool (its socket factory makes marked sockets in the pod's netns).
        route: from `resolve_outbound`.
        client: the accepted, non-blocking app socket (not closed here).
        src_identity / src_addr: the source workload's identity and the app's ip:port (`forwarded`).
        baggage: see `baggage_of`.
        telemetry: told once the tunnel is open (200), for the "connection opened" line and metric; the
            caller writes the outcome when this returns.
    """
    host = route.service.hostname if route.service is not None else None
    try:
        try:
            stream = await pool.connect(route.pool_key(src_identity, src_addr[0]), route.target,
                                        forwarded_for=src_addr, baggage=baggage, host=host)
        except BaseException:
            abort_on_close(client)  # no tunnel (or cancelled while opening it): the app gets RST, not FIN
            raise
    except HttpStatusError as exc:
        outcome.status = exc.status
        outcome.error = str(exc)
        return
    except OSError as exc:
        outcome.error = describe_os_error(exc)
        return
    except AmbientError as exc:  # connect, TLS, identity, certificate, connection-closed errors
        outcome.error = str(exc)
        return
    outcome.status = 200
    try:
        telemetry.connection_opened(outcome)
        await relay(stream, client)
        outcome.error = None
    except OSError as exc:
        outcome.error = describe_os_error(exc)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        outcome.error = str(exc.__cause__ or exc) or "the HBONE stream was closed"
    except BaseException:
        stream.reset(ERROR_CANCEL)  # cancelled: the destination must not take this for a complete stream
        raise
    finally:
        outcome.bytes_sent = stream.bytes_sent
        outcome.bytes_recv = stream.bytes_received
        stream.close_nowait()
