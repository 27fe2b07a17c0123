"""HBONE: HTTP/2 CONNECT tunnels inside mutual TLS 1.3 between ztunnels (SPEC §5).

Layers, bottom up:

* `core`       sans-I/O `ClientCore` / `ServerCore` on h2 (bytes in, events out);
* `tls`        pyOpenSSL contexts per identity with SPIFFE verification; `tlsstream` drives them on the fd;
* `connection` `HboneConnection` (reader, writer, pinger tasks) and `HboneStream` (a half-closeable stream);
* `client`     `connect_hbone`, `open_hbone_connection`, the upstream-style pool `open_hbone_pool`;
* `server`     `serve_hbone` for a pod's 15008 listener, with `authorize` and `open_upstream` callbacks;
* `relay`      copy between an `HboneStream` and a socket, with half-close;
* `resolve`    pure outbound resolution from xDS state (`resolve_outbound` -> route);
* `outbound`   `tunnel_outbound`: pool stream + relay for one captured connection, result for the log.
"""

from services.ztunnel.hbone.client import (
    HBONE_PORT,
    CertSource,
    HbonePool,
    PoolKey,
    baggage_of,
    connect_hbone,
    open_hbone_connection,
    open_hbone_pool,
    plain_socket,
)
from services.ztunnel.hbone.connection import HboneConnection, HboneStream, new_traceparent
from services.ztunnel.hbone.errors import (
    ConnectionClosedError,
    HboneError,
    HboneProtocolError,
    HttpStatusError,
    PeerIdentityError,
    StreamResetError,
    TlsError,
)
from services.ztunnel.hbone.outbound import OutboundResult, tunnel_outbound
from services.ztunnel.hbone.relay import relay
from services.ztunnel.hbone.server import InboundInfo, InboundRecord, serve_hbone, serve_hbone_connection
from services.ztunnel.hbone.tls import TlsContextCache
from services.ztunnel.proxy.resolve import HboneRoute, NoHealthyUpstream, Passthrough, resolve_outbound

__all__ = [
    "HBONE_PORT",
    "CertSource",
    "ConnectionClosedError",
    "HboneConnection",
    "HboneError",
    "HbonePool",
    "HboneProtocolError",
    "HboneRoute",
    "HboneStream",
    "HttpStatusError",
    "InboundInfo",
    "InboundRecord",
    "NoHealthyUpstream",
    "OutboundResult",
    "Passthrough",
    "PeerIdentityError",
    "PoolKey",
    "StreamResetError",
    "TlsContextCache",
    "TlsError",
    "baggage_of",
    "connect_hbone",
    "new_traceparent",
    "open_hbone_connection",
    "open_hbone_pool",
    "plain_socket",
    "relay",
    "resolve_outbound",
    "serve_hbone",
    "serve_hbone_connection",
    "tunnel_outbound",
]
