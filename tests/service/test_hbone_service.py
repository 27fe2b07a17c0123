"""HBONE over real TLS on loopback with certificates from the istiod stub's CA."""

from __future__ import annotations

import functools
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
import trio
import trio.testing

from services.istiod.ca import CertificateAuthority
from services.ztunnel.authz import Decision, authorize_from_state
from services.ztunnel.hbone.connection import HboneConnection
from services.ztunnel.hbone.core import STREAM_WINDOW
from services.ztunnel.hbone.errors import ConnectionClosedError, HttpStatusError, PeerIdentityError, TlsError
from services.ztunnel.hbone.pool import (
    PoolKey,
    connect_hbone,
    open_hbone_connection,
    open_hbone_pool,
)
from services.ztunnel.hbone.server import InboundInfo, serve_hbone_connection
from services.ztunnel.hbone.stream import HboneStream
from services.ztunnel.hbone.tls import TlsContextCache
from services.ztunnel.net import connect
from services.ztunnel.proxy.inbound import authz_request
from services.ztunnel.proxy.outbound import tunnel
from services.ztunnel.proxy.resolve import HboneRoute
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import (
    Action,
    Authorization,
    Clause,
    Match,
    Rule,
    Scope,
    StringMatch,
    Workload,
    WorkloadUid,
)
from services.ztunnel.telemetry.access_log import ConnectionOutcome, Telemetry, format_addr
from shared.identity import CertBundle
from shared.logs import Display
from tests.service.test_hbone_helpers import (
    FakeCerts,
    Server,
    connect_upstream,
    push_until_stalled,
    running_server,
    serve_hbone,
    spiffe,
    start_echo,
)

CLIENT = spiffe("sleep")
SERVER = spiffe("httpbin")


@pytest.fixture
async def echo_port(nursery: trio.Nursery) -> int:
    return await start_echo(nursery)


@pytest.fixture
async def server(certs: FakeCerts, ca: CertificateAuthority) -> AsyncIterator[Server]:
    async with running_server(certs, SERVER, roots=[ca.root_pem]) as srv:
        yield srv


def contexts(ca: CertificateAuthority) -> TlsContextCache:
    return TlsContextCache([ca.root_pem])


async def echo_round_trip(stream: HboneStream, payload: bytes) -> bytes:
    async def send() -> None:
        await stream.send_all(payload)
        await stream.send_eof()

    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while data := await stream.receive_some():
            received += data
    return bytes(received)


async def test_connect_200_echo_with_half_close(server: Server, certs: FakeCerts, ca: CertificateAuthority,
                                                echo_port: int) -> None:
    payload = bytes(range(256)) * 20_000  # 5 MB: more than a stream window, so windows must turn over
    with trio.fail_after(30):
        async with open_hbone_connection(server.addr, bundle=await certs.fetch_certificate(CLIENT),
                                         expected=[SERVER], contexts=contexts(ca)) as conn:
            assert conn.peer_identity == SERVER
            stream = await conn.open_stream(("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", 40000),
                                            baggage="k8s.namespace.name=default")
            assert stream.status == 200
            assert await echo_round_trip(stream, payload) == payload
            assert stream.finished
            await stream.aclose()
            [record] = await server.wait_records(1)
    assert record.status == 200 and record.error is None
    assert record.src.identity == CLIENT.uri
    assert record.bytes_recv == len(payload) and record.bytes_sent == len(payload)
    [info] = server.infos
    assert info.target == ("127.0.0.1", echo_port)
    assert info.forwarded == 'for="10.0.0.1:40000"'
    assert info.baggage == "k8s.namespace.name=default"
    assert info.traceparent is not None and len(info.traceparent) == 55


async def test_server_identity_mismatch_is_refused(server: Server, certs: FakeCerts,
                                                   ca: CertificateAuthority) -> None:
    with trio.fail_after(10), pytest.raises(PeerIdentityError, match="httpbin"):
        await connect_hbone(server.addr, bundle=await certs.fetch_certificate(CLIENT),
                            expected=[spiffe("reviews")], contexts=contexts(ca))


async def test_client_from_another_trust_domain_is_refused(server: Server, certs: FakeCerts,
                                                           ca: CertificateAuthority, echo_port: int) -> None:
    stranger = spiffe("sleep", td="other.example")
    with trio.fail_after(10):
        with pytest.raises((TlsError, ConnectionClosedError)):
            # TLS 1.3: the client finishes first; the server's verdict arrives as an alert on first read.
            async with open_hbone_connection(server.addr, bundle=await certs.fetch_certificate(stranger),
                                             expected=[SERVER], contexts=contexts(ca)) as conn:
                await conn.open_stream(("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", 1))
        [record] = await server.wait_records(1)
    assert record.status is None and record.error is not None and "trust domain" in record.error


async def test_client_with_untrusted_root_is_refused(server: Server, ca: CertificateAuthority,
                                                     echo_port: int) -> None:
    rogue = FakeCerts(CertificateAuthority.create())
    with trio.fail_after(10):
        with pytest.raises((TlsError, ConnectionClosedError)):
            async with open_hbone_connection(server.addr, bundle=await rogue.fetch_certificate(CLIENT),
                                             expected=[SERVER], contexts=contexts(ca)) as conn:
                await conn.open_stream(("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", 1))
        [record] = await server.wait_records(1)
    assert record.error is not None and "certificate" in record.error


async def test_server_with_untrusted_root_is_refused(certs: FakeCerts, ca: CertificateAuthority) -> None:
    rogue = FakeCerts(CertificateAuthority.create())
    async with running_server(rogue, SERVER, roots=[ca.root_pem]) as server:
        with trio.fail_after(10), pytest.raises(TlsError, match="certificate verify failed"):
            await connect_hbone(server.addr, bundle=await certs.fetch_certificate(CLIENT), expected=[SERVER],
                                contexts=contexts(ca))


async def test_plaintext_client_is_refused(server: Server) -> None:
    sock = socket.socket()
    sock.setblocking(False)
    with trio.fail_after(10):
        await connect(sock, server.addr, connect_timeout=5)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        reply = b""
        try:
            while data := await stream.receive_some():
                reply += data
        except trio.BrokenResourceError:
            pass
        await stream.aclose()
        [record] = await server.wait_records(1)
    assert b"HTTP/2" not in reply and not reply.startswith(b"\x00\x00")
    assert record.error is not None and "TLS" in record.error


async def raw_request(conn: HboneConnection, headers: list[tuple[bytes, bytes]]) -> int | None:
    """Send an arbitrary request header block on a running client connection; returns the status."""
    h2conn = conn.core._h2
    sid = h2conn.get_next_available_stream_id()
    h2conn.send_headers(sid, headers)
    stream = HboneStream(conn, sid, ("0.0.0.0", 0))
    conn._adopt(stream)
    conn.wake_writer()
    while stream.status is None:
        await stream._readable.park()
    return stream.status


async def test_non_connect_is_400(server: Server, certs: FakeCerts, ca: CertificateAuthority) -> None:
    with trio.fail_after(10):
        async with open_hbone_connection(server.addr, bundle=await certs.fetch_certificate(CLIENT),
                                         expected=[SERVER], contexts=contexts(ca)) as conn:
            status = await raw_request(conn, [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                                              (b":authority", b"127.0.0.1:80")])
            [record] = await server.wait_records(1)
    assert status == 400
    assert record.status == 400 and record.error is not None and "CONNECT" in record.error


async def test_target_not_this_pod_is_400(server: Server, certs: FakeCerts, ca: CertificateAuthority,
                                          echo_port: int) -> None:
    with trio.fail_after(10):
        async with open_hbone_connection(server.addr, bundle=await certs.fetch_certificate(CLIENT),
                                         expected=[SERVER], contexts=contexts(ca)) as conn:
            with pytest.raises(HttpStatusError) as info:
                await conn.open_stream(("127.0.0.2", echo_port), forwarded_for=("10.0.0.1", 1))
            # The connection is still good for a valid stream.
            stream = await conn.open_stream(("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", 1))
            assert await echo_round_trip(stream, b"still fine") == b"still fine"
    assert info.value.status == 400


async def test_policy_deny_is_401(server: Server, certs: FakeCerts, ca: CertificateAuthority,
                                  echo_port: int) -> None:
    server.decision = Decision(allowed=False, reason="explicitly denied by: default/deny-sleep")
    with trio.fail_after(10):
        async with open_hbone_connection(server.addr, bundle=await certs.fetch_certificate(CLIENT),
                                         expected=[SERVER], contexts=contexts(ca)) as conn:
            with pytest.raises(HttpStatusError) as info:
                await conn.open_stream(("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", 1))
            [record] = await server.wait_records(1)
    assert info.value.status == 401
    assert record.status == 401 and record.error is not None and "deny-sleep" in record.error
    assert server.infos[0].src_identity == CLIENT


async def test_upstream_refused_is_503(server: Server, certs: FakeCerts, ca: CertificateAuthority) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with trio.fail_after(10):
        async with open_hbone_connection(server.addr, bundle=await certs.fetch_certificate(CLIENT),
                                         expected=[SERVER], contexts=contexts(ca)) as conn:
            with pytest.raises(HttpStatusError) as info:
                await conn.open_stream(("127.0.0.1", port), forwarded_for=("10.0.0.1", 1))
            [record] = await server.wait_records(1)
    assert info.value.status == 503
    assert record.error is not None and "refused" in record.error


async def test_pool_opens_a_second_connection_at_stream_101(server: Server, certs: FakeCerts,
                                                            ca: CertificateAuthority, echo_port: int) -> None:
    key = PoolKey(src_identity=CLIENT, dst_identities=frozenset([SERVER]), dst=server.addr,
                  src_ip="127.0.0.1")
    with trio.fail_after(60):
        async with open_hbone_pool(certs=certs, contexts=contexts(ca)) as pool:
            streams = [await pool.connect(key, ("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", i))
                       for i in range(100)]
            assert len(pool.connections(key)) == 1
            streams.append(await pool.connect(key, ("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", 100)))
            first, second = pool.connections(key)
            assert (first.active_streams, second.active_streams) == (100, 1)
            # Every stream works, on either connection.
            assert await echo_round_trip(streams[0], b"a") == b"a"
            assert await echo_round_trip(streams[100], b"b") == b"b"
            # A freed slot on the first connection is reused before anything new is opened.
            await streams[0].aclose()
            again = await pool.connect(key, ("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", 101))
            assert again.conn is first and pool.connections_opened == 2
            # Another key (another source IP) never shares a connection.
            other = key._replace(src_ip="127.0.0.9")
            await pool.connect(other, ("127.0.0.1", echo_port), forwarded_for=("10.0.0.9", 1))
            assert len(pool.connections(other)) == 1 and pool.connections_opened == 3
            for stream in [*streams, again]:
                await stream.aclose()


async def test_pool_releases_idle_connections(certs: FakeCerts, ca: CertificateAuthority,
                                              mock_clock: trio.testing.MockClock) -> None:
    # Virtual time jumps only once everything has been idle for 100 ms of real time, so the TLS handshake on
    # real sockets is not mistaken for idleness.
    mock_clock.autojump_threshold = 0.1
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        async with running_server(certs, SERVER, roots=[ca.root_pem], ping_interval=None) as server:
            key = PoolKey(src_identity=CLIENT, dst_identities=frozenset([SERVER]), dst=server.addr)
            async with open_hbone_pool(certs=certs, contexts=contexts(ca), ping_interval=None) as pool:
                assert pool.idle_timeout == 300
                stream = await pool.connect(key, ("127.0.0.1", echo), forwarded_for=("10.0.0.1", 1))
                [conn] = pool.connections(key)
                await trio.sleep(600)  # busy connections are never released
                assert pool.connections(key) == [conn]
                assert await echo_round_trip(stream, b"x") == b"x"
                await stream.aclose()
                await trio.sleep(299)
                assert pool.connections(key) == [conn]
                await trio.sleep(2)
                assert pool.connections(key) == []
                await conn.wait_closed()
                # The next stream gets a fresh connection.
                stream = await pool.connect(key, ("127.0.0.1", echo), forwarded_for=("10.0.0.1", 1))
                assert stream.conn is not conn and pool.connections_opened == 2
                await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_ping_keeps_a_live_connection(certs: FakeCerts, ca: CertificateAuthority, echo_port: int,
                                            mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.1
    bundle = await certs.fetch_certificate(CLIENT)
    async with (running_server(certs, SERVER, roots=[ca.root_pem]) as server,
                open_hbone_connection(server.addr, bundle=bundle, expected=[SERVER],
                                      contexts=contexts(ca)) as conn):
        # A quiet tunnel (a connection without one is closed after the first-CONNECT deadline).
        stream = await conn.open_stream(("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", 1))
        await trio.sleep(100)  # ten PINGs each way, all answered
        assert not conn.dead and conn._pings >= 9
        await stream.aclose()


async def test_peer_that_stops_reading_gets_back_pressure(certs: FakeCerts, ca: CertificateAuthority) -> None:
    """The app behind the server never reads: the client's sends stall after bounded buffering."""
    held: list[socket.socket] = []
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen(1)
    app_port = app.getsockname()[1]

    async def never_reading_upstream(info: InboundInfo) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.setblocking(False)
        await connect(sock, info.target, connect_timeout=5)
        held.append(sock)
        return sock

    attempted = 64 * 1024 * 1024
    bundle = await certs.fetch_certificate(CLIENT)
    async with (running_server(certs, SERVER, roots=[ca.root_pem], open_upstream=never_reading_upstream
                               ) as server,
                open_hbone_connection(server.addr, bundle=bundle, expected=[SERVER],
                                      contexts=contexts(ca)) as conn):
        stream = await conn.open_stream(("127.0.0.1", app_port), forwarded_for=("10.0.0.1", 1))
        with trio.fail_after(30):
            await push_until_stalled(stream, limit=attempted)
        assert conn.core.send_window(stream.stream_id) == 0  # flow control, not TCP, stopped it
        # Bounded: one stream window in flight plus what the kernel buffers hold, far from 64 MiB.
        assert stream.bytes_sent < STREAM_WINDOW + 16 * 1024 * 1024
        await stream.aclose()
    app.close()
    for sock in held:
        sock.close()


async def test_concurrent_burst_shares_connections(server: Server, certs: FakeCerts, ca: CertificateAuthority,
                                                   echo_port: int) -> None:
    key = PoolKey(src_identity=CLIENT, dst_identities=frozenset([SERVER]), dst=server.addr)
    streams: list[HboneStream] = []

    async def one(i: int) -> None:
        stream = await pool.connect(key, ("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", i))
        streams.append(stream)

    with trio.fail_after(60):
        async with open_hbone_pool(certs=certs, contexts=contexts(ca)) as pool:
            async with trio.open_nursery() as nursery:
                for i in range(150):
                    nursery.start_soon(one, i)
            # One connection made while the others waited for it, then exactly one more at stream 101.
            assert pool.connections_opened == 2
            assert sorted(c.active_streams for c in pool.connections(key)) == [50, 100]
            for stream in streams:
                await stream.aclose()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_authority_end_to_end(certs: FakeCerts, ca: CertificateAuthority) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(data)
        await stream.send_eof()

    async def upstream(info: InboundInfo) -> socket.socket:
        sock = socket.socket(socket.AF_INET6)
        sock.setblocking(False)
        await connect(sock, info.target, connect_timeout=5)
        return sock

    listener = socket.socket(socket.AF_INET6)
    listener.bind(("::1", 0))
    listener.listen(8)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            [app] = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="::1"))
            app_port = app.socket.getsockname()[1]
            policy = Server(addr=listener.getsockname()[:2], identity=SERVER, upstream=upstream)
            nursery.start_soon(functools.partial(serve_hbone, listener, policy, identity=SERVER, certs=certs,
                                                 contexts=contexts(ca)))
            addr = policy.addr
            async with open_hbone_connection(addr, bundle=await certs.fetch_certificate(CLIENT),
                                             expected=[SERVER], contexts=contexts(ca)) as conn:
                stream = await conn.open_stream(("::1", app_port), forwarded_for=("fd00::1", 80))
                assert await echo_round_trip(stream, b"v6") == b"v6"
                await stream.aclose()
            [record] = await policy.wait_records(1)
            assert record.dst_hbone_addr == f"[::1]:{app_port}" and record.status == 200
            assert [o.dst_hbone_addr for o in policy.tunnels] == [f"[::1]:{app_port}"]
            nursery.cancel_scope.cancel()


async def test_a_failing_callback_fails_only_its_stream(certs: FakeCerts, ca: CertificateAuthority,
                                                       echo_port: int) -> None:
    calls = 0

    async def flaky_upstream(info: InboundInfo) -> socket.socket:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug in the upstream connector")
        return await connect_upstream(info)

    bundle = await certs.fetch_certificate(CLIENT)
    with trio.fail_after(10):
        async with (running_server(certs, SERVER, roots=[ca.root_pem], open_upstream=flaky_upstream) as srv,
                    open_hbone_connection(srv.addr, bundle=bundle, expected=[SERVER],
                                          contexts=contexts(ca)) as conn):
            with pytest.raises(HttpStatusError) as info:
                await conn.open_stream(("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", 1))
            assert info.value.status == 503
            stream = await conn.open_stream(("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", 2))
            assert await echo_round_trip(stream, b"ok") == b"ok"
            records = await srv.wait_records(1)
    assert records[0].error is not None and "bug in the upstream connector" in records[0].error


async def test_policies_from_the_state_store_apply_to_the_next_stream(
        certs: FakeCerts, ca: CertificateAuthority, echo_port: int) -> None:
    store = StateStore()
    store.apply_addresses([Workload(uid=WorkloadUid("Kubernetes//Pod/default/httpbin"), name="httpbin",
                                    namespace="default", addresses=("127.0.0.1",))], [])

    def authorize(info: InboundInfo) -> Decision:
        return authorize_from_state(store, authz_request(info))

    bundle = await certs.fetch_certificate(CLIENT)
    with trio.fail_after(10):
        async with running_server(certs, SERVER, roots=[ca.root_pem]) as srv:
            srv.authorizer = authorize
            async with open_hbone_connection(srv.addr, bundle=bundle, expected=[SERVER],
                                             contexts=contexts(ca)) as conn:
                stream = await conn.open_stream(("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", 1))
                await stream.aclose()
                store.apply_authorizations([Authorization(
                    name="deny-sleep", namespace="default", scope=Scope.NAMESPACE, action=Action.DENY,
                    rules=(Rule(clauses=(Clause(matches=(Match(principals=(
                        StringMatch(kind="exact", value="cluster.local/ns/default/sa/sleep"),)),)),)),))], [])
                with pytest.raises(HttpStatusError) as info:
                    await conn.open_stream(("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", 2))
    assert info.value.status == 401
    [denied] = [r for r in srv.records if r.status == 401]
    assert denied.error is not None and "deny-sleep" in denied.error
    assert [r.error for r in srv.records if r.status == 200] == [None]


def _stdlib_h2_client(addr: tuple[str, int], target: tuple[str, int], bundle: CertBundle, root_pem: str,
                      tmp: Path) -> tuple[str, int, bytes, str | None]:
    """A blocking client built on the stdlib ssl module and plain h2 (not our cores): interop check."""
    (tmp / "leaf.pem").write_text("".join(bundle.cert_chain))
    (tmp / "key.pem").write_bytes(bundle.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE identities are URI SANs; no SNI, like upstream
    ctx.load_verify_locations(cadata=root_pem)
    ctx.load_cert_chain(tmp / "leaf.pem", tmp / "key.pem")
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(addr, timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        version, alpn = tls.version() or "", tls.selected_alpn_protocol()
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        authority = f"{target[0]}:{target[1]}".encode()
        conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", authority)])
        conn.send_data(sid, b"interop", end_stream=True)
        tls.sendall(conn.data_to_send())
        status, body, done = 0, b"", False
        while not done:
            data = tls.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers or [])[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data or b""
                    conn.acknowledge_received_data(event.flow_controlled_length or 0, sid)
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
            tls.sendall(conn.data_to_send())
        return version, status, body, alpn


async def test_interop_with_a_stdlib_ssl_h2_client(server: Server, certs: FakeCerts, ca: CertificateAuthority,
                                                   echo_port: int, tmp_path: Path) -> None:
    bundle = await certs.fetch_certificate(CLIENT)
    with trio.fail_after(20):
        version, status, body, alpn = await trio.to_thread.run_sync(
            _stdlib_h2_client, server.addr, ("127.0.0.1", echo_port), bundle, ca.root_pem, tmp_path)
    assert (version, alpn, status, body) == ("TLSv1.3", "h2", 200, b"interop")
    assert server.infos[0].src_identity == CLIENT


async def test_tunnel_outbound_relays_an_app_socket(server: Server, certs: FakeCerts,
                                                   ca: CertificateAuthority, echo_port: int) -> None:
    workload = Workload(uid=WorkloadUid("Kubernetes//Pod/default/httpbin"), name="httpbin",
                        namespace="default", service_account="httpbin", addresses=("127.0.0.1",))
    route = HboneRoute(dst=server.addr, target=("127.0.0.1", echo_port), identities=frozenset([SERVER]),
                       workload=workload)
    app, proxied = socket.socketpair()
    proxied.setblocking(False)
    payload = b"GET / HTTP/1.0\r\n\r\n" * 1000
    result = ConnectionOutcome(direction="outbound", src_addr=Display("10.0.0.1:40000"),
                               dst_addr=format_addr(server.addr))
    denied = ConnectionOutcome(direction="outbound", src_addr=Display("10.0.0.1:40001"),
                               dst_addr=format_addr(server.addr))
    telemetry = Telemetry()

    def app_side() -> bytes:
        app.sendall(payload)
        app.shutdown(socket.SHUT_WR)
        received = b""
        while data := app.recv(65536):
            received += data
        return received

    with trio.fail_after(20):
        async with open_hbone_pool(certs=certs, contexts=contexts(ca)) as pool:
            async with trio.open_nursery() as nursery:
                got: list[bytes] = []

                async def run_app() -> None:
                    got.append(await trio.to_thread.run_sync(app_side))

                nursery.start_soon(run_app)
                await tunnel(pool, route, proxied, result, src_identity=CLIENT, src_addr=("10.0.0.1", 40000),
                             telemetry=telemetry)
            # A denied destination comes back as upstream's error text, not an exception.
            server.decision = Decision(allowed=False, reason="no")
            await tunnel(pool, route, proxied, denied, src_identity=CLIENT, src_addr=("10.0.0.1", 40001),
                         telemetry=telemetry)
    app.close()
    proxied.close()
    assert got == [payload] and result.opened and not denied.opened
    assert (result.status, result.error, result.bytes_sent, result.bytes_recv) == (200, None, len(payload),
                                                                                  len(payload))
    assert (denied.status, denied.error) == (401, "http status: 401 Unauthorized")


async def test_serve_hbone_connection_for_an_external_accept_loop(certs: FakeCerts, ca: CertificateAuthority,
                                                                  echo_port: int) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    policy = Server(addr=listener.getsockname(), identity=SERVER)

    async def accept_one() -> None:
        await trio.lowlevel.wait_readable(listener)
        sock, raw = listener.accept()
        await serve_hbone_connection(sock, raw, identity=SERVER, certs=certs, contexts=contexts(ca),
                                     policy=policy)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_one)
            bundle = await certs.fetch_certificate(CLIENT)
            async with open_hbone_connection(listener.getsockname(), bundle=bundle, expected=[SERVER],
                                             contexts=contexts(ca)) as conn:
                stream = await conn.open_stream(("127.0.0.1", echo_port), forwarded_for=("10.0.0.1", 1))
                assert await echo_round_trip(stream, b"own loop") == b"own loop"
                await stream.aclose()
    listener.close()
    assert [r.status for r in policy.records] == [200]
