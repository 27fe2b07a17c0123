"""ztunnel's network ground floor, below `proxy/` and `hbone/`'s I/O modules: its ports and packet mark,
addresses, original destination, connect with a deadline, and the accept loop every listener runs.

Addresses as text (`Addr`, unmapping, family) are the ground floor's, shared/addr.py; the accept loop's
retry rule is shared/accept.py's."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from typing import Final

import trio

from services.ztunnel.errors import ConnectError
from shared.accept import ACCEPT_CAPACITY_ERRNOS, ACCEPT_RETRY_DELAY
from shared.addr import Addr, unmap

PACKET_MARK: Final = 1337
"""SO_MARK on every socket ztunnel makes in a pod, so the pod's own redirect rules skip its traffic."""
OUTBOUND_PORT: Final = 15001
INBOUND_PLAINTEXT_PORT: Final = 15006
INBOUND_HBONE_PORT: Final = 15008
"""A pod's HBONE port, and the default port of a peer's HBONE (xDS may name another for a gateway)."""
DNS_PROXY_PORT: Final = 15053
"""The DNS proxy, UDP and TCP, on the pod's loopback (the node agent's DNS rules redirect port 53 here)."""
ZTUNNEL_PORTS: Final = frozenset({OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT, DNS_PROXY_PORT})
"""Every port ztunnel listens on in a pod. A connection whose destination is one of them on this
node, or a CONNECT to one of them, would come back into ztunnel without end: refused as a self call."""
SELF_CALL_ERROR: Final = "attempted recursive call to ourselves"
"""Upstream's words for a self call (its `Error::SelfCall`)."""

ACCEPT_BURST: Final = 16
"""Connections an accept loop takes in a row, with the backlog never empty, before it lets other tasks run."""

SO_ORIGINAL_DST: Final = 80  # netfilter, SOL_IP
IP6T_SO_ORIGINAL_DST: Final = 80  # netfilter, SOL_IPV6
_SOL_IP: Final = 0
_SOL_IPV6: Final = 41


def peer_addr(raw: tuple[object, ...]) -> Addr:
    return unmap(str(raw[0])), int(str(raw[1]))


def original_dst(sock: socket.socket) -> Addr | None:
    """The pre-REDIRECT destination of an accepted connection: SO_ORIGINAL_DST, then the IPv6 variant.

    Returns None when the connection was not redirected by netfilter (no conntrack entry).
    """
    try:
        raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    except OSError:
        pass
    try:
        raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return unmap(socket.inet_ntop(socket.AF_INET6, raw[8:24])), port
    except OSError:
        return None


def local_addr(sock: socket.socket) -> Addr:
    return peer_addr(sock.getsockname())


def describe_os_error(exc: OSError) -> str:
    """Upstream's io error wording: `io error: Connection refused (os error 111)`."""
    if exc.errno is not None:
        return f"io error: {os.strerror(exc.errno)} (os error {exc.errno})"
    return f"io error: {exc}"


async def connect(sock: socket.socket, addr: Addr, *, connect_timeout: float) -> None:
    """Connect a non-blocking socket, waiting at most `connect_timeout` seconds.

    Raises:
        ConnectError: timed out, or the kernel reported an error (refused, unreachable, ...).
    """
    try:
        sock.connect(addr)
        return
    except BlockingIOError:
        pass
    except OSError as exc:
        raise ConnectError(describe_os_error(exc)) from exc
    with trio.move_on_after(connect_timeout) as scope:
        await trio.lowlevel.wait_writable(sock)
    if scope.cancelled_caught:
        raise ConnectError(f"connection timed out after {connect_timeout:g}s, maybe there is a firewall or "
                           f"nothing routes to {addr[0]}")
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise ConnectError(describe_os_error(OSError(err, os.strerror(err))))


KEEPALIVE_TIME: Final = 180
"""TCP keepalive: idle seconds before the first probe, seconds between probes, and probes before the
kernel drops the connection; upstream ztunnel's defaults (180 s, 180 s, 9), so a silent peer or a middlebox
that forgot the connection is found within 30 minutes, and long-idle tunnels are not dropped by NATs."""
KEEPALIVE_INTERVAL: Final = 180
KEEPALIVE_PROBES: Final = 9


def set_keepalive(sock: socket.socket) -> None:
    """Turn on TCP keepalive with upstream's timings on `sock` (accepted or about to connect)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_TIME)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


async def accept_forever(listener: socket.socket, spawn: Callable[[socket.socket, Addr], None], *,
                         on_capacity_error: Callable[[OSError], None]) -> None:
    """Accept on the non-blocking `listener` until cancelled; does not close it.

    Each connection is made non-blocking with TCP_NODELAY and TCP keepalive (`set_keepalive`: an idle
    HBONE tunnel or app connection is probed, as upstream's are) and handed to `spawn(conn, peer)`, which must
    not block (it starts the connection's task). Accept errors from resource exhaustion (EMFILE, ENFILE,
    ENOMEM, ENOBUFS) go to `on_capacity_error` and are retried after ACCEPT_RETRY_DELAY (100 ms); any other
    error propagates.
    """
    burst = 0
    while True:
        try:
            conn, raw = listener.accept()
        except BlockingIOError:
            burst = 0
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as exc:
            if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                on_capacity_error(exc)
                await trio.sleep(ACCEPT_RETRY_DELAY)
                continue
            raise
        conn.setblocking(False)
        # Small writes (HTTP/2 HEADERS, an app's short answers) must not wait for Nagle + delayed ACK:
        # 40 ms per request/response otherwise. Upstream sets nodelay on every socket too.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_keepalive(conn)
        spawn(conn, peer_addr(raw))
        # The next accept usually finds the backlog empty and waits (a checkpoint); an explicit one only
        # every ACCEPT_BURST connections, so that a full backlog cannot keep the handlers from running.
        # One per connection cost every connection a scheduler turn.
        burst += 1
        if burst >= ACCEPT_BURST:
            burst = 0
            await trio.lowlevel.checkpoint()
