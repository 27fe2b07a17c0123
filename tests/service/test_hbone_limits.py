"""HBONE server bounds over real TLS on loopback: rapid reset, the handshake + first-CONNECT deadline, and the
idle timeout. Each test drives a misbehaving (or merely idle) peer with its own raw h2 client."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import pytest
import trio

from services.istiod.ca import CertificateAuthority
from services.ztunnel.hbone.connection import REMOTE_RESET_STREAM_MAX
from services.ztunnel.hbone.core import (
    ERROR_CANCEL,
    ERROR_ENHANCE_YOUR_CALM,
    ERROR_NO_ERROR,
    SERVER_MAX_HEADER_LIST_SIZE,
)
from services.ztunnel.hbone.pool import connect_hbone, open_hbone_connection
from services.ztunnel.hbone.server import EARLY_RESET, InboundInfo
from services.ztunnel.hbone.tls import TlsContextCache
from services.ztunnel.hbone.tlsstream import TlsSocketStream
from services.ztunnel.net import connect
from services.ztunnel.telemetry.access_log import MAX_FIELD_LENGTH, ConnectionOutcome, Telemetry
from tests.access_logs import capture_access_log
from tests.service.test_hbone_helpers import (
    FakeCerts,
    Server,
    loopback_listener,
    running_server,
    spiffe,
)

CLIENT = spiffe("sleep")
SERVER = spiffe("httpbin")


class CountingApp:
    """A loopback listener that only counts the connections it accepts (and holds them open)."""

    def __init__(self) -> None:
        self.listener = loopback_listener()
        self.port = int(self.listener.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self.arrived = trio.Event()

    async def run(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self.listener)
                try:
                    sock, _ = self.listener.accept()
                except BlockingIOError:
                    continue
                self.accepted.append(sock)
                self.arrived.set()
        finally:
            for sock in self.accepted:
                sock.close()
            self.listener.close()


@asynccontextmanager
async def counting_app() -> AsyncIterator[CountingApp]:
    app = CountingApp()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.run)
        yield app
        nursery.cancel_scope.cancel()


class RawPeer:
    """An authenticated HBONE client that speaks h2 by hand (plain h2, not our cores) over our TLS."""

    def __init__(self, tls: TlsSocketStream) -> None:
        self.tls = tls
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.initiate_connection()
        self.statuses: dict[int, int] = {}
        self.goaway: int | None = None
        self.eof = False

    async def flush(self) -> None:
        await self.tls.send_all(self.h2.data_to_send())

    def connect(self, target: tuple[str, int] | bytes) -> int:
        """Open a CONNECT stream to `target` (ip, port), or with `target` as the `:authority` verbatim."""
        sid = self.h2.get_next_available_stream_id()
        authority = target if isinstance(target, bytes) else f"{target[0]}:{target[1]}".encode()
        self.h2.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", authority)])
        return sid

    async def read_once(self) -> None:
        try:
            data = await self.tls.receive_some()
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.eof = True
            return
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id is not None:
                self.statuses[event.stream_id] = int(dict(event.headers or [])[b":status"])
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = int(event.error_code or 0)
        if not self.eof and self.goaway is None:
            await self.flush()  # SETTINGS and PING acknowledgements

    async def until_status(self, sid: int) -> int:
        while sid not in self.statuses:
            await self.read_once()
            assert not self.eof, "the connection ended before the answer"
        return self.statuses[sid]

    async def until_closed(self) -> None:
        while not self.eof:
            await self.read_once()


@asynccontextmanager
async def raw_peer(server: Server, certs: FakeCerts, ca: CertificateAuthority) -> AsyncIterator[RawPeer]:
    conn = await connect_hbone(server.addr, bundle=await certs.fetch_certificate(CLIENT), expected=[SERVER],
                               contexts=TlsContextCache([ca.root_pem]))
    peer = RawPeer(conn.tls)
    try:
        await peer.flush()
        yield peer
    finally:
        conn.tls.close_nowait()


async def test_rapid_reset_gets_goaway_enhance_your_calm(certs: FakeCerts, ca: CertificateAuthority) -> None:
    with trio.fail_after(20):
        async with counting_app() as app, running_server(certs, SERVER, roots=[ca.root_pem]) as server, \
                raw_peer(server, certs, ca) as peer:
            for _ in range(10 * REMOTE_RESET_STREAM_MAX):
                sid = peer.connect(("127.0.0.1", app.port))
                peer.h2.reset_stream(sid, ERROR_CANCEL)
            await peer.flush()
            await peer.until_closed()
    assert peer.goaway == ERROR_ENHANCE_YOUR_CALM
    assert app.accepted == []


async def test_streams_reset_at_once_never_reach_the_app(certs: FakeCerts, ca: CertificateAuthority) -> None:
    pairs = REMOTE_RESET_STREAM_MAX // 2  # under the cap: the connection stays
    with trio.fail_after(20):
        async with counting_app() as app, running_server(certs, SERVER, roots=[ca.root_pem]) as server, \
                raw_peer(server, certs, ca) as peer:
            for _ in range(pairs):
                sid = peer.connect(("127.0.0.1", app.port))
                peer.h2.reset_stream(sid, ERROR_CANCEL)
            await peer.flush()
            records = await server.wait_records(pairs)
            legit = peer.connect(("127.0.0.1", app.port))
            await peer.flush()
            status = await peer.until_status(legit)
            await app.arrived.wait()
    assert [(r.status, r.error) for r in records[:pairs]] == [(None, EARLY_RESET)] * pairs
    assert status == 200
    assert len(app.accepted) == 1  # the legitimate stream's; none for the streams reset at once
    assert peer.goaway is None


async def test_a_reset_abandons_a_connect_under_way(certs: FakeCerts, ca: CertificateAuthority) -> None:
    dialing = trio.Event()

    async def hanging_upstream(info: InboundInfo) -> socket.socket:
        dialing.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    with trio.fail_after(20):
        async with running_server(certs, SERVER, roots=[ca.root_pem],
                                  open_upstream=hanging_upstream) as server, \
                raw_peer(server, certs, ca) as peer:
            sid = peer.connect(("127.0.0.1", 9))
            await peer.flush()
            await dialing.wait()
            peer.h2.reset_stream(sid, ERROR_CANCEL)
            await peer.flush()
            [record] = await server.wait_records(1)
    assert (record.status, record.error) == (None, EARLY_RESET)


# --- the handshake + first-CONNECT deadline, and the idle timeout ---

DEADLINE = 0.5


async def _raw_tcp(addr: tuple[str, int]) -> trio.SocketStream:
    sock = socket.socket()
    sock.setblocking(False)
    await connect(sock, addr, connect_timeout=5)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def _until_eof(stream: trio.SocketStream) -> None:
    try:
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        pass


def _client_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    with suppress(ssl.SSLWantReadError):
        tls.do_handshake()  # wants the server's answer: the ClientHello is written
    return outgoing.read()


@pytest.mark.parametrize("sent", ["nothing", "half a ClientHello"])
async def test_a_client_stuck_before_tls_is_closed_at_the_deadline(certs: FakeCerts, ca: CertificateAuthority,
                                                                   sent: str) -> None:
    hello = _client_hello()
    with trio.fail_after(20):
        async with running_server(certs, SERVER, roots=[ca.root_pem], handshake_timeout=DEADLINE) as server:
            stream = await _raw_tcp(server.addr)
            if sent != "nothing":
                await stream.send_all(hello[:len(hello) // 2])
            await _until_eof(stream)
            await stream.aclose()
            [record] = await server.wait_records(1)
    assert record.error is not None and "timed out" in record.error


async def test_tls_without_a_connect_gets_goaway_at_the_deadline(certs: FakeCerts,
                                                                 ca: CertificateAuthority) -> None:
    with trio.fail_after(20):
        async with running_server(certs, SERVER, roots=[ca.root_pem], handshake_timeout=DEADLINE) as server, \
                raw_peer(server, certs, ca) as peer:
            await peer.until_closed()  # preface and SETTINGS sent, never a CONNECT
    assert peer.goaway == ERROR_NO_ERROR


async def test_a_connection_with_no_stream_left_is_idled_out(certs: FakeCerts,
                                                             ca: CertificateAuthority) -> None:
    bundle = await certs.fetch_certificate(CLIENT)
    with trio.fail_after(20):
        async with counting_app() as app, \
                running_server(certs, SERVER, roots=[ca.root_pem], idle_timeout=DEADLINE) as server, \
                open_hbone_connection(server.addr, bundle=bundle, expected=[SERVER],
                                      contexts=TlsContextCache([ca.root_pem])) as conn:
            stream = await conn.open_stream(("127.0.0.1", app.port), forwarded_for=("127.0.0.1", 1))
            # Held open past the idle timeout: a connection carrying a stream is never idle.
            await trio.sleep(3 * DEADLINE)
            assert not conn.dead and not conn.core.goaway_received
            stream.reset()  # the app end stays open: the tunnel ends only by a reset
            stream.close_nowait()
            await conn.wait_closed()
    assert conn.core.goaway_received
    assert len(app.accepted) == 1


# --- what a peer's oversized header costs in the access log ---

@dataclass
class LoggingServer(Server):
    """The test server, writing its refusals to the real access log as ztunnel's inbound side does."""

    telemetry: Telemetry = field(default_factory=Telemetry)

    def refused(self, outcome: ConnectionOutcome) -> None:
        super().refused(outcome)
        self.telemetry.connection_failed(src_addr=outcome.src_addr, dst_addr=outcome.dst_addr,
                                         direction="inbound", error=outcome.error or "refused")


async def test_a_huge_authority_is_400_and_cut_in_the_access_log(certs: FakeCerts,
                                                                 ca: CertificateAuthority) -> None:
    # As large as the advertised header list allows, the other header and HPACK's per-entry 32 octets
    # aside: the server must take the block, answer it, and not copy 60 KB into the log line.
    authority = b"a" * (SERVER_MAX_HEADER_LIST_SIZE - 4096)
    with trio.fail_after(20), capture_access_log(deadline=20) as log:
        async with counting_app() as app, running_server(certs, SERVER, roots=[ca.root_pem],
                                                         server_type=LoggingServer) as server, \
                raw_peer(server, certs, ca) as peer:
            huge = peer.connect(authority)
            await peer.flush()
            assert await peer.until_status(huge) == 400
            [line] = await log.wait_for("connection failed")
            legit = peer.connect(("127.0.0.1", app.port))  # the same connection still serves
            await peer.flush()
            assert await peer.until_status(legit) == 200
            await app.arrived.wait()
    error = str(line.fields["error"])
    full = f"authority {authority!r} is not ip:port"
    assert len(full) > MAX_FIELD_LENGTH
    assert error == f"{full[:MAX_FIELD_LENGTH]}...({len(full) - MAX_FIELD_LENGTH} more)"
    assert peer.goaway is None and len(app.accepted) == 1
