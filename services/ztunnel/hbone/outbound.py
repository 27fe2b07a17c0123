"""Carry one captured outbound connection through an HBONE tunnel: pool stream, relay, result for the log.

This is the piece the in-pod outbound handler (15001) calls once `resolve_outbound` returned an
`HboneRoute`:

    route = resolve_outbound(store, original_dst, source=pod_workload)
    if isinstance(route, HboneRoute):
        result = await tunnel_outbound(pool, route, client_sock, src_identity=pod_identity,
                                       src_addr=client_peer, baggage=baggage_of(pod_workload))
        # result.error is None on success; bytes are counted from the client's point of view

Failures never raise (except cancellation): they come back in `OutboundResult.error` in upstream's words
(`http status: 401 Unauthorized`, `io error: Connection refused (os error 111)`, ...).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import msgspec
import trio

from services.ztunnel.hbone.core import ERROR_CANCEL, Addr
from services.ztunnel.hbone.errors import HttpStatusError
from services.ztunnel.hbone.pool import HbonePool
from services.ztunnel.hbone.relay import relay
from services.ztunnel.hbone.stream import HboneStream
from services.ztunnel.net import describe_os_error
from services.ztunnel.proxy.resolve import HboneRoute
from shared.errors import AmbientError
from shared.identity import SpiffeId


class OutboundResult(msgspec.Struct, kw_only=True):
    bytes_sent: int = 0
    """Client -> destination (what the app sent)."""
    bytes_recv: int = 0
    status: int | None = None
    """The CONNECT answer, when one came."""
    error: str | None = None


async def tunnel_outbound(pool: HbonePool, route: HboneRoute, client: socket.socket, *,
                          src_identity: SpiffeId, src_addr: Addr, baggage: str | None = None,
                          on_open: Callable[[HboneStream], None] | None = None) -> OutboundResult:
    """Open a pooled CONNECT stream for `route` and relay `client` through it until both sides end.

    Args:
        pool: the source pod's pool (its socket factory makes marked sockets in the pod's netns).
        route: from `resolve_outbound`.
        client: the accepted, non-blocking app socket (not closed here).
        src_identity / src_addr: the source workload's identity and the app's ip:port (`forwarded`).
        baggage: see `baggage_of`.
        on_open: called once the tunnel is open (200), e.g. for the "connection opened" line.
    """
    result = OutboundResult()
    host = route.service.hostname if route.service is not None else None
    try:
        stream = await pool.connect(route.pool_key(src_identity, src_addr[0]), route.target,
                                    forwarded_for=src_addr, baggage=baggage, host=host)
    except HttpStatusError as exc:
        result.status = exc.status
        result.error = str(exc)
        return result
    except OSError as exc:
        result.error = describe_os_error(exc)
        return result
    except AmbientError as exc:  # connect, TLS, identity, certificate, connection-closed errors
        result.error = str(exc)
        return result
    result.status = 200
    try:
        if on_open is not None:
            on_open(stream)
        await relay(stream, client)
    except OSError as exc:
        result.error = describe_os_error(exc)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        result.error = str(exc.__cause__ or exc) or "the HBONE stream was closed"
    except BaseException:
        stream.reset(ERROR_CANCEL)  # cancelled: the destination must not take this for a complete stream
        raise
    finally:
        result.bytes_sent = stream.bytes_sent
        result.bytes_recv = stream.bytes_received
        stream.close_nowait()
    return result
