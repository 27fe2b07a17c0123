"""The HBONE client side: make mTLS + HTTP/2 connections to a peer's 15008, and pool them like upstream.

Theory of operation
-------------------
`connect_hbone()` makes one connection: a non-blocking TCP socket from the caller's factory (the in-pod
factory creates it in the pod's netns with SO_MARK), TCP connect with a deadline, the TLS 1.3 handshake that
verifies the server's SPIFFE identity, then an h2 `ClientCore`. The caller runs `conn.run()` in a nursery.

`HbonePool` keeps connections per key `(source identity, destination identities, destination address,
source IP)` (upstream `pool.rs`). A stream goes on the first live connection of its key that has room
(fewer than `max_streams` = 100 concurrent streams, capped by the server's SETTINGS_MAX_CONCURRENT_STREAMS);
when all are full a new connection is made. Connection set-up for a key is serialised by a per-key lock, so a
burst of streams shares the new connection instead of racing to make one each. A connection without streams
for `idle_timeout` (5 min) is closed with a GOAWAY and dropped; a dead connection (peer gone, PING timeout)
is dropped at once. Pools are per pod (in-pod mode): every connection runs in the pool's nursery, so closing
the pool closes them all.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, NamedTuple, Protocol

import trio

from services.ztunnel.hbone.connection import PING_INTERVAL, PING_TIMEOUT, HboneConnection
from services.ztunnel.hbone.core import ClientCore
from services.ztunnel.hbone.errors import TlsError
from services.ztunnel.hbone.stream import HboneStream
from services.ztunnel.hbone.tls import TlsContextCache, check_established, client_connection
from services.ztunnel.hbone.tlsstream import TlsSocketStream
from services.ztunnel.net import connect, set_keepalive
from shared.addr import Addr, format_host_port, ip_family
from shared.identity import CertBundle, SpiffeId

MAX_STREAMS_PER_CONNECTION = 100
IDLE_TIMEOUT = 300.0
CONNECT_TIMEOUT = 10.0

SocketFactory = Callable[[socket.AddressFamily], socket.socket]


class CertSource(Protocol):
    """Where workload certificates come from (the ztunnel certificate manager, or a fake)."""

    async def fetch_certificate(self, identity: SpiffeId) -> CertBundle: ...


def plain_socket(family: socket.AddressFamily) -> socket.socket:
    """The default socket factory: a non-blocking TCP socket in the current netns, TCP_NODELAY and
    upstream's keepalive."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_keepalive(sock)
    return sock


async def connect_hbone(dst: Addr, *, bundle: CertBundle, expected: Collection[SpiffeId],
                        contexts: TlsContextCache, make_socket: SocketFactory = plain_socket,
                        connect_timeout: float = CONNECT_TIMEOUT,
                        ping_interval: float | None = PING_INTERVAL,
                        ping_timeout: float = PING_TIMEOUT) -> HboneConnection:
    """TCP + TLS to `dst` presenting `bundle`; the server must prove one of `expected`. Not yet running.

    Raises:
        ConnectError: TCP connect failed or timed out.
        TlsError / PeerIdentityError: the handshake failed or the server is not who we expect.
    """
    sock = make_socket(ip_family(dst[0]))
    try:
        sock.setblocking(False)
        await connect(sock, dst, connect_timeout=connect_timeout)
        tls = TlsSocketStream(sock, client_connection(contexts.client(bundle), sock, expected))
        with trio.move_on_after(connect_timeout) as scope:
            await tls.do_handshake()
        if scope.cancelled_caught:
            raise TlsError(f"TLS handshake with {format_host_port(*dst)} timed out "
                           f"after {connect_timeout:g}s")
        peer = check_established(tls.ssl)
        local = sock.getsockname()
    except BaseException:
        sock.close()
        raise
    return HboneConnection(tls, ClientCore(), peer_identity=peer, local_addr=(str(local[0]), int(local[1])),
                           peer_addr=dst, ping_interval=ping_interval, ping_timeout=ping_timeout)


@asynccontextmanager
async def open_hbone_connection(dst: Addr, *, bundle: CertBundle, expected: Collection[SpiffeId],
                                contexts: TlsContextCache, make_socket: SocketFactory = plain_socket,
                                connect_timeout: float = CONNECT_TIMEOUT,
                                ping_interval: float | None = PING_INTERVAL,
                                ping_timeout: float = PING_TIMEOUT) -> AsyncIterator[HboneConnection]:
    """One running, unpooled HBONE client connection; closed (GOAWAY) on exit. See `connect_hbone`."""
    conn = await connect_hbone(dst, bundle=bundle, expected=expected, contexts=contexts,
                               make_socket=make_socket, connect_timeout=connect_timeout,
                               ping_interval=ping_interval, ping_timeout=ping_timeout)
    with _single_errors():
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)
            try:
                yield conn
            finally:
                conn.close()
                with trio.move_on_after(1):
                    await conn.wait_closed()
                nursery.cancel_scope.cancel()


@contextmanager
def _single_errors() -> Iterator[None]:
    """Re-raise the body's own exception, not the group the internal nursery wraps it in.

    The nursery's background tasks (connections) never raise for network failures, so a group holding one
    exception is the caller's; it gets it back as is, like from any other context manager.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


class PoolKey(NamedTuple):
    """Upstream's pool key. `src_ip` keeps pods sharing an identity apart (in-pod pools are per pod)."""

    src_identity: SpiffeId
    dst_identities: frozenset[SpiffeId]
    dst: Addr
    src_ip: str | None = None


class _Entry:
    __slots__ = ("conn", "reserved")

    def __init__(self, conn: HboneConnection) -> None:
        self.conn = conn
        self.reserved = 0  # streams being opened: counted before open_stream adopts them

    def room(self, max_streams: int) -> bool:
        conn = self.conn
        if conn.dead or conn.core.closed:
            return False
        limit = min(max_streams, conn.core.peer_max_concurrent_streams)
        return conn.active_streams + self.reserved < limit


class HbonePool:
    """A pool of HBONE client connections; make it with `open_hbone_pool`.

    Args:
        nursery: runs the connections (the pool's owner cancels it to close them all).
        certs: source of the client certificate for each source identity.
        contexts: TLS context cache (shared with the server side is fine).
        make_socket: socket factory, e.g. the pod's `SocketFactory.upstream` bound to its netns.
        max_streams: concurrent streams per connection (upstream POOL_MAX_STREAMS_PER_CONNECTION).
        idle_timeout: seconds a connection may sit without streams (upstream POOL_UNUSED_RELEASE_TIMEOUT).
    """

    def __init__(self, nursery: trio.Nursery, *, certs: CertSource, contexts: TlsContextCache,
                 make_socket: SocketFactory = plain_socket, max_streams: int = MAX_STREAMS_PER_CONNECTION,
                 idle_timeout: float = IDLE_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT,
                 ping_interval: float | None = PING_INTERVAL, ping_timeout: float = PING_TIMEOUT) -> None:
        self._nursery = nursery
        self.certs = certs
        self.contexts = contexts
        self.make_socket = make_socket
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._entries: dict[PoolKey, list[_Entry]] = {}
        self._locks: dict[PoolKey, trio.Lock] = {}
        self.connections_opened = 0

    def dump(self) -> list[dict[str, Any]]:
        """The pool's keys and their live connections, for the admin `/config_dump`."""
        out: list[dict[str, Any]] = []
        for key, entries in sorted(self._entries.items(), key=lambda item: repr(item[0])):
            out.append({
                "src_identity": key.src_identity.uri,
                "dst_identities": sorted(i.uri for i in key.dst_identities),
                "dst": format_host_port(*key.dst),
                "src_ip": key.src_ip,
                "connections": [{"local": format_host_port(*e.conn.local_addr),
                                 "streams": e.conn.active_streams, "dead": e.conn.dead} for e in entries],
            })
        return out

    def connections(self, key: PoolKey | None = None) -> list[HboneConnection]:
        """Live pooled connections (of one key, or all)."""
        keys = [key] if key is not None else list(self._entries)
        return [e.conn for k in keys for e in self._entries.get(k, []) if not e.conn.dead]

    async def connect(self, key: PoolKey, target: Addr, *, forwarded_for: Addr,
                      baggage: str | None = None, host: str | None = None,
                      traceparent: str | None = None) -> HboneStream:
        """Open a CONNECT stream to `target` through a pooled connection to `key.dst`.

        Args:
            key: who connects (source identity, source IP) to which peer (address and allowed identities).
            target: the `:authority`, the real destination ip:port (a pod IP, or the VIP through a waypoint).
            forwarded_for: the original client ip:port.
            baggage, host, traceparent: see `ClientCore.open_stream`.

        Raises:
            ConnectError, TlsError, PeerIdentityError: no connection could be made.
            HttpStatusError: the server refused the CONNECT (400, 401, 503).
            ConnectionClosedError: the connection died before the answer.
        """
        entry = await self._reserve(key)
        try:
            return await entry.conn.open_stream(target, forwarded_for=forwarded_for, traceparent=traceparent,
                                                baggage=baggage, host=host)
        finally:
            entry.reserved -= 1

    async def _reserve(self, key: PoolKey) -> _Entry:
        lock = self._locks.setdefault(key, trio.Lock())
        if not lock.locked():
            # A pooled connection with room, and nobody opening one: reserved at once. The lock only orders
            # callers that may open a connection; taking it here would cost every new stream a scheduler
            # turn, and the caller parks in `open_stream` for the answer straight after anyway.
            for entry in self._entries.get(key, ()):
                if entry.room(self.max_streams):
                    entry.reserved += 1
                    return entry
        async with lock:
            for entry in self._entries.get(key, []):
                if entry.room(self.max_streams):
                    entry.reserved += 1
                    return entry
            entry = _Entry(await self._new_connection(key))
            entry.reserved += 1
            self._entries.setdefault(key, []).append(entry)
            return entry

    async def _new_connection(self, key: PoolKey) -> HboneConnection:
        bundle = await self.certs.fetch_certificate(key.src_identity)
        conn = await connect_hbone(key.dst, bundle=bundle, expected=key.dst_identities,
                                   contexts=self.contexts,
                                   make_socket=self.make_socket, connect_timeout=self.connect_timeout,
                                   ping_interval=self.ping_interval, ping_timeout=self.ping_timeout)
        await self._nursery.start(self._run, key, conn)
        self.connections_opened += 1
        return conn

    async def _run(self, key: PoolKey, conn: HboneConnection,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(conn.run)
                nursery.start_soon(self._release_when_idle, key, conn)
                task_status.started()
                await conn.wait_closed()
                nursery.cancel_scope.cancel()
        finally:
            self._drop(key, conn)

    async def _release_when_idle(self, key: PoolKey, conn: HboneConnection) -> None:
        # Wakes once per `idle_timeout` at most (not at every stream opened or closed): a connection is idle
        # when it has had no stream, and none reserved, since `idle_timeout` seconds.
        while not conn.dead:
            await trio.sleep_until(conn.last_activity + self.idle_timeout)
            if conn.active_streams or self._reserved(key, conn):
                await trio.sleep(self.idle_timeout)  # busy: look again a full timeout later
                continue
            if trio.current_time() >= conn.last_activity + self.idle_timeout and not conn.dead:
                self._drop(key, conn)  # first, so that no stream picks it while the GOAWAY goes out
                conn.close()
                return

    def _reserved(self, key: PoolKey, conn: HboneConnection) -> int:
        return sum(e.reserved for e in self._entries.get(key, []) if e.conn is conn)

    def _drop(self, key: PoolKey, conn: HboneConnection) -> None:
        entries = self._entries.get(key)
        if entries is None:
            return
        entries[:] = [e for e in entries if e.conn is not conn]
        if not entries:
            del self._entries[key]
            lock = self._locks.get(key)
            if lock is not None and not lock.locked() and not lock.statistics().tasks_waiting:
                del self._locks[key]


@asynccontextmanager
async def open_hbone_pool(*, certs: CertSource, contexts: TlsContextCache,
                          make_socket: SocketFactory = plain_socket,
                          max_streams: int = MAX_STREAMS_PER_CONNECTION, idle_timeout: float = IDLE_TIMEOUT,
                          connect_timeout: float = CONNECT_TIMEOUT,
                          ping_interval: float | None = PING_INTERVAL,
                          ping_timeout: float = PING_TIMEOUT) -> AsyncIterator[HbonePool]:
    """A connection pool whose connections live as long as the `async with` block (per pod)."""
    with _single_errors():
        async with trio.open_nursery() as nursery:
            pool = HbonePool(nursery, certs=certs, contexts=contexts, make_socket=make_socket,
                             max_streams=max_streams, idle_timeout=idle_timeout,
                             connect_timeout=connect_timeout, ping_interval=ping_interval,
                             ping_timeout=ping_timeout)
            try:
                yield pool
            finally:
                conns = pool.connections()
                for conn in conns:
                    conn.close()  # GOAWAY
                with trio.move_on_after(1):
                    for conn in conns:
                        await conn.wait_closed()
                nursery.cancel_scope.cancel()

