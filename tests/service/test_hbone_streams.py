"""HBONE streams and the TLS socket stream over an in-process socketpair (real TLS, real h2)."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from services.istiod.ca import CertificateAuthority
from services.ztunnel.hbone.connection import HboneConnection
from services.ztunnel.hbone.core import ClientCore, ConnectRequested, ServerCore
from services.ztunnel.hbone.errors import ConnectionClosedError
from services.ztunnel.hbone.relay import relay
from services.ztunnel.hbone.stream import HboneStream
from services.ztunnel.hbone.tls import (
    TlsContextCache,
    check_established,
    client_connection,
    server_connection,
)
from services.ztunnel.hbone.tlsstream import TlsSocketStream
from tests.service.test_hbone_helpers import FakeCerts, push_until_stalled, spiffe

CLIENT = spiffe("sleep")
SERVER = spiffe("httpbin")


async def tls_pair(certs: FakeCerts, ca: CertificateAuthority) -> tuple[TlsSocketStream, TlsSocketStream]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    contexts = TlsContextCache([ca.root_pem])
    client = TlsSocketStream(a, client_connection(contexts.client(await certs.fetch_certificate(CLIENT)), a,
                                                  [SERVER]))
    server = TlsSocketStream(b, server_connection(contexts.server(await certs.fetch_certificate(SERVER)), b))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    assert check_established(client.ssl) == SERVER
    assert check_established(server.ssl) == CLIENT
    return client, server


async def hbone_pair(nursery: trio.Nursery, certs: FakeCerts, ca: CertificateAuthority, *,
                     ping_interval: float | None = None, ping_timeout: float = 20
                     ) -> tuple[HboneStream, HboneStream]:
    """A client HBONE stream and the server-side stream it is tunnelled to (answered 200)."""
    client_tls, server_tls = await tls_pair(certs, ca)
    addr = ("127.0.0.1", 15008)
    client = HboneConnection(client_tls, ClientCore(), peer_identity=SERVER, local_addr=("127.0.0.1", 1),
                             peer_addr=addr, ping_interval=ping_interval, ping_timeout=ping_timeout)
    server = HboneConnection(server_tls, ServerCore(["127.0.0.1"]), peer_identity=CLIENT, local_addr=addr,
                             peer_addr=("127.0.0.1", 1), ping_interval=ping_interval,
                             ping_timeout=ping_timeout)
    send, receive = trio.open_memory_channel[HboneStream](1)

    def on_request(stream: HboneStream, event: ConnectRequested) -> None:
        server.respond(stream, 200)
        send.send_nowait(stream)

    server.on_request = on_request
    await nursery.start(server.run)
    await nursery.start(client.run)
    client_stream = await client.open_stream(("127.0.0.1", 8080), forwarded_for=("127.0.0.1", 1))
    return client_stream, await receive.receive()


async def test_hbone_stream_passes_trio_generic_half_closeable_checks(
        nursery: trio.Nursery, certs: FakeCerts, ca: CertificateAuthority) -> None:
    async def maker() -> tuple[HboneStream, HboneStream]:
        return await hbone_pair(nursery, certs, ca)

    with trio.fail_after(60):
        await trio.testing.check_half_closeable_stream(maker, None)


async def test_tls_stream_passes_trio_generic_two_way_checks(certs: FakeCerts, ca: CertificateAuthority
                                                             ) -> None:
    async def maker() -> tuple[TlsSocketStream, TlsSocketStream]:
        return await tls_pair(certs, ca)

    with trio.fail_after(60):
        await trio.testing.check_two_way_stream(maker, None)


async def test_tls_write_cancelled_half_way_marks_the_stream_broken(certs: FakeCerts,
                                                                    ca: CertificateAuthority) -> None:
    client, server = await tls_pair(certs, ca)
    with trio.fail_after(10):
        with trio.move_on_after(0.5) as scope:  # the peer never reads: the write blocks part-way
            await client.send_all(b"x" * (64 * 1024 * 1024))
        assert scope.cancelled_caught
        with pytest.raises(trio.BrokenResourceError, match="interrupted"):
            await client.send_all(b"more")
    await client.aclose()
    await server.aclose()


async def test_tls_batched_reads_return_many_records_at_once(certs: FakeCerts, ca: CertificateAuthority
                                                            ) -> None:
    client, server = await tls_pair(certs, ca)
    with trio.fail_after(10):
        await client.send_all(b"r" * (100 * 1024))  # 7 TLS records, well within the socket buffer
        await trio.testing.wait_all_tasks_blocked()
        got = 0
        while got < 100 * 1024:
            view = await server.receive_view()
            assert len(view) > 16 * 1024 or got + len(view) == 100 * 1024
            got += len(view)
        await client.aclose()
        assert len(await server.receive_view()) == 0  # close_notify is EOF
    await server.aclose()


async def test_client_that_stops_reading_holds_back_the_server(nursery: trio.Nursery, certs: FakeCerts,
                                                               ca: CertificateAuthority) -> None:
    client, server = await hbone_pair(nursery, certs, ca)
    with trio.fail_after(30):
        await push_until_stalled(server, limit=64 * 1024 * 1024)
    assert server.conn.core.send_window(server.stream_id) == 0
    assert server.bytes_sent <= 4 * 1024 * 1024  # exactly one stream window, nothing queued beyond it
    # Reading on the client side opens the window again.
    with trio.fail_after(10):
        received = 0
        while received < 3 * 1024 * 1024:
            received += len(await client.receive_some())
        await server.send_all(b"more")


async def test_relay_delivers_in_order_to_a_slow_application(nursery: trio.Nursery, certs: FakeCerts,
                                                              ca: CertificateAuthority) -> None:
    """The reader writes into the app socket itself until its buffer is full; the rest queues and the relay
    task writes it later: the application still gets every byte, in order."""
    client, server = await hbone_pair(nursery, certs, ca)
    app, captured = socket.socketpair()
    captured.setblocking(False)
    captured.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = os.urandom(3 * 1024 * 1024)
    nursery.start_soon(relay, server, captured)

    async def send() -> None:
        for i in range(0, len(payload), 1000):  # many small chunks, so some go inline and some queue
            await client.send_all(payload[i:i + 1000])
        await client.send_eof()

    nursery.start_soon(send)
    app_t = trio.socket.from_stdlib_socket(app)
    await trio.sleep(0.2)  # let the app's socket buffer fill up first
    got = bytearray()
    with trio.fail_after(30):
        while chunk := await app_t.recv(4096):  # a little at a time, racing the reader's inline writes
            got += chunk
            await trio.lowlevel.checkpoint()
    assert got == payload
    assert server.bytes_received == len(payload)
    app.close()


class _Spawns(trio.abc.Instrument):
    def __init__(self) -> None:
        self.names: list[str] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.name)


async def test_a_short_exchange_is_relayed_without_a_second_task(nursery: trio.Nursery, certs: FakeCerts,
                                                                 ca: CertificateAuthority) -> None:
    """Request, response, half-close both ways: the reader delivers the bytes and the END_STREAM into the
    app socket itself, so the relay never spawns its downstream task."""
    client, server = await hbone_pair(nursery, certs, ca)
    app, captured = socket.socketpair()
    captured.setblocking(False)
    app_t = trio.socket.from_stdlib_socket(app)
    spawns = _Spawns()
    trio.lowlevel.add_instrument(spawns)
    try:
        async with trio.open_nursery() as inner:
            inner.start_soon(relay, server, captured)
            await trio.testing.wait_all_tasks_blocked()  # the relay is in place before the bytes come
            await client.send_all(b"ping")
            await client.send_eof()
            assert await app_t.recv(100) == b"ping"
            assert await app_t.recv(100) == b""  # END_STREAM arrived as a half-close
            await app_t.send(b"pong")
            app.shutdown(socket.SHUT_WR)
            assert await client.receive_some() == b"pong"
            assert await client.receive_some() == b""
    finally:
        trio.lowlevel.remove_instrument(spawns)
    assert [name for name in spawns.names if "one_way" in name] == []
    app.close()
    captured.close()


async def test_an_answer_sent_with_its_fin_arrives_whole_then_ends(nursery: trio.Nursery, certs: FakeCerts,
                                                                   ca: CertificateAuthority) -> None:
    """An app that answers and closes before the relay reads (write-then-close servers): its bytes and the
    END_STREAM go out together, and the peer reads the whole answer, then a clean end."""
    client, server = await hbone_pair(nursery, certs, ca)
    app, captured = socket.socketpair()
    captured.setblocking(False)
    app.sendall(b"pong")
    app.shutdown(socket.SHUT_WR)
    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(relay, server, captured)
            got = b""
            while chunk := await client.receive_some():
                got += chunk
            assert got == b"pong"
            assert server.bytes_sent == 4
            await client.send_all(b"ping")
            await client.send_eof()
    app.setblocking(True)
    assert app.recv(100) == b"ping"
    assert app.recv(100) == b""
    app.close()
    captured.close()


async def test_bytes_queued_for_a_full_sink_are_not_overtaken(nursery: trio.Nursery, certs: FakeCerts,
                                                               ca: CertificateAuthority) -> None:
    """Once part of a chunk is queued (the sink socket was full), later chunks queue behind it even if the
    socket has room again: inline writes never overtake queued bytes."""
    _, server = await hbone_pair(nursery, certs, ca)
    app, captured = socket.socketpair()
    captured.setblocking(False)
    server.set_sink(captured)
    first = b"a" * (1024 * 1024)  # far more than the socket buffers take
    server._on_data(first, len(first))
    written = server.bytes_received
    assert 0 < written < len(first)
    app.setblocking(False)
    drained = b""
    while True:  # the application reads everything the socket holds: there is room again
        try:
            drained += app.recv(65536)
        except BlockingIOError:
            break
    server._on_data(b"b" * 100, 100)
    assert server.bytes_received == written  # queued, not written inline
    queued = b""
    while (chunk := server.receive_nowait()) is not None and chunk:
        queued += chunk
        if len(queued) >= len(first) - written + 100:
            break
    assert drained + queued == first + b"b" * 100
    app.close()
    captured.close()


async def test_relay_raises_when_the_application_socket_fails(nursery: trio.Nursery, certs: FakeCerts,
                                                              ca: CertificateAuthority) -> None:
    """The app closed its socket: the reader's write fails, and the relay raises that error."""
    client, server = await hbone_pair(nursery, certs, ca)
    app, captured = socket.socketpair()
    captured.setblocking(False)
    app.close()
    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(client.send_all, b"to nobody")
            with pytest.raises(OSError):
                await relay(server, captured)
    captured.close()


async def test_sending_after_goaway_is_a_broken_stream(nursery: trio.Nursery, certs: FakeCerts,
                                                       ca: CertificateAuthority) -> None:
    """h2 refuses every send once a GOAWAY went out: the stream reports that as a broken stream, not as
    h2's ProtocolError (which the relay would not expect)."""
    _, server = await hbone_pair(nursery, certs, ca)
    server.conn.core.close()  # GOAWAY queued; the stream itself was never reset
    with pytest.raises(trio.BrokenResourceError) as info:
        await server.send_all(b"too late")
    assert isinstance(info.value.__cause__, ConnectionClosedError)
    with pytest.raises(trio.BrokenResourceError):
        await server.send_eof()
    await server.aclose()  # a graceful close is still quiet


async def test_half_close_each_way(nursery: trio.Nursery, certs: FakeCerts, ca: CertificateAuthority) -> None:
    client, server = await hbone_pair(nursery, certs, ca)
    with trio.fail_after(10):
        await client.send_all(b"request")
        await client.send_eof()
        assert await server.receive_some() == b"request"
        assert await server.receive_some() == b""
        await server.send_all(b"response after the client's EOF")
        await server.send_eof()
        assert await client.receive_some() == b"response after the client's EOF"
        assert await client.receive_some() == b""
    assert client.finished and server.finished


async def test_reset_reaches_the_other_side(nursery: trio.Nursery, certs: FakeCerts,
                                            ca: CertificateAuthority) -> None:
    client, server = await hbone_pair(nursery, certs, ca)
    client.reset(8)
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError, match="reset"):
        await server.receive_some()


async def test_unanswered_ping_ends_the_connection(nursery: trio.Nursery, certs: FakeCerts,
                                                   ca: CertificateAuthority,
                                                   mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.1
    client_tls, server_tls = await tls_pair(certs, ca)  # the "server" never reads: no PING is acknowledged
    client = HboneConnection(client_tls, ClientCore(), peer_identity=SERVER, local_addr=("127.0.0.1", 1),
                             peer_addr=("127.0.0.1", 15008))
    await nursery.start(client.run)
    await trio.sleep(29)
    assert not client.dead  # first PING at 10 s, its 20 s deadline not yet passed
    await client.wait_closed()
    assert isinstance(client.error, ConnectionClosedError) and "PING" in str(client.error)
    assert trio.current_time() >= 30
    with pytest.raises(ConnectionClosedError):
        await client.open_stream(("127.0.0.1", 1), forwarded_for=("127.0.0.1", 1))
    await server_tls.aclose()


async def test_aclose_of_a_connection_never_run_closes_its_socket(certs: FakeCerts,
                                                                  ca: CertificateAuthority) -> None:
    client_tls, server_tls = await tls_pair(certs, ca)
    conn = HboneConnection(client_tls, ClientCore(), peer_identity=SERVER, local_addr=("127.0.0.1", 1),
                           peer_addr=("127.0.0.1", 15008))
    with trio.fail_after(5):
        await conn.aclose()
        assert conn.dead and client_tls.socket.fileno() == -1
        assert await server_tls.receive_some() == b""  # close_notify reached the peer
    await server_tls.aclose()
