"""The per-pod supervisor and the ZDS handler with a loopback socket factory (no root, no netns).

Pipe fds stand in for netns fds (they have an identity, and the fake factory never enters them); listeners
bind 127.0.0.1 on ephemeral ports; the fake "original destination" is whatever the test points it at.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, cast

import pytest
import trio
import trio.testing

from services.ztunnel.errors import ProxyStartError
from services.ztunnel.inpod.handler import InPodWorkloadHandler
from services.ztunnel.inpod.proxies import PodHandle, run_pod_proxies
from services.ztunnel.inpod.sockets import PORTS, PodListener, PodListeners
from services.ztunnel.inpod.statemanager import WorkloadHandler, WorkloadManager
from services.ztunnel.net import accept_forever
from services.ztunnel.proxy.context import PodContext, ProxyConfig
from services.ztunnel.telemetry.access_log import Telemetry
from shared.addr import Addr
from shared.zds.types import AddWorkload, DelWorkload, PodUid, SnapshotSent, WorkloadInfo
from tests.access_logs import LogCapture, capture_access_log

INFO = WorkloadInfo(name="app", namespace="ns", service_account="sa")


class FakeSockets:
    """Loopback stand-in for the in-pod socket factory."""

    def __init__(self) -> None:
        self.bind_calls: list[int] = []
        self.fail_with: str | None = None
        self.listen = True  # False: listeners are bound but not listening, so their accept loops die
        self.original: Addr | None = None
        self.ports: dict[str, int] = {}
        self.upstreams = 0  # sockets made for upstream connections

    def bind_listeners(self, netns_fd: int) -> PodListeners:
        self.bind_calls.append(netns_fd)
        if self.fail_with is not None:
            raise ProxyStartError(self.fail_with)
        made = []
        for role, _ in PORTS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            sock.bind(("127.0.0.1", 0))
            if self.listen:
                sock.listen(16)
            self.ports[role] = sock.getsockname()[1]
            made.append(PodListener(role=role, port=sock.getsockname()[1], sock=sock))
        return PodListeners(listeners=tuple(made), ipv6=False, transparent=False)

    def upstream(self, netns_fd: int, family: socket.AddressFamily, *,
                 bind_source: str | None = None) -> socket.socket:
        self.upstreams += 1
        return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)

    def original_dst(self, sock: socket.socket) -> Addr | None:
        return self.original


@contextmanager
def pipe_fd() -> Iterator[int]:
    r, w = os.pipe()
    try:
        yield r
    finally:
        os.close(r)
        os.close(w)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def access_log() -> Iterator[LogCapture]:
    with capture_access_log() as capture:
        yield capture


@asynccontextmanager
async def ztunnel(fake: FakeSockets, *, splice: bool = True) -> AsyncIterator[InPodWorkloadHandler]:
    async with trio.open_nursery() as pods:
        handler = InPodWorkloadHandler(pods, config=ProxyConfig(connect_timeout=5, splice=splice),
                                       telemetry=Telemetry(), sockets=fake)
        try:
            yield handler
        finally:
            pods.cancel_scope.cancel()


async def tcp_connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some():
        out += chunk
    return bytes(out)


async def echo_server(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            with suppress(trio.BrokenResourceError):  # ztunnel resets it when the client's side failed
                data = await read_to_eof(stream)
                await stream.send_all(data)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(echo, listeners)


def test_handler_implements_the_zds_seam() -> None:
    def check(handler: WorkloadHandler) -> None:
        assert handler is not None

    async def _unused() -> None:
        async with trio.open_nursery() as nursery:
            check(InPodWorkloadHandler(nursery))

    assert _unused is not None


async def test_start_returns_with_all_listeners_accepting() -> None:
    fake = FakeSockets()
    with pipe_fd() as fd:
        async with ztunnel(fake) as zt:
            await zt.start_workload(PodUid("a"), INFO, fd)
            assert set(fake.ports) == {"outbound", "inbound_plaintext", "inbound_hbone"}
            with trio.fail_after(10):
                hbone = await tcp_connect(fake.ports["inbound_hbone"])
                assert await read_to_eof(hbone) == b""  # no xDS, so no identities: closed with a log line
            dump = zt.dump()
            assert dump[0]["uid"] == "a" and dump[0]["workload"]["name"] == "app"
            assert {li["role"] for li in dump[0]["listeners"]} == {"outbound", "inbound_plaintext",
                                                                   "inbound_hbone"}


async def test_bind_failure_raises_and_leaves_nothing_running() -> None:
    fake = FakeSockets()
    fake.fail_with = "port 15001 is already in use inside the pod"
    with pipe_fd() as fd:
        before = open_fds()
        async with ztunnel(fake) as zt:
            with pytest.raises(ProxyStartError, match="already in use"):
                await zt.start_workload(PodUid("a"), INFO, fd)
            assert not zt.pods
            assert open_fds() == before  # our dup of the fd was closed
            os.fstat(fd)  # the caller's fd is untouched


async def test_same_netns_is_a_no_op_and_a_new_netns_rebinds() -> None:
    fake = FakeSockets()
    with pipe_fd() as fd1, pipe_fd() as fd2:
        async with ztunnel(fake) as zt:
            manager = WorkloadManager(zt)
            manager.connection_started()
            assert await manager.handle(SnapshotSent()) == ""
            assert await manager.handle(AddWorkload(uid=PodUid("a"), workload_info=INFO,
                                                    netns_fd=os.dup(fd1))) == ""
            first = zt.pods[PodUid("a")]
            assert await manager.handle(AddWorkload(uid=PodUid("a"), workload_info=INFO,
                                                    netns_fd=os.dup(fd1))) == ""
            assert len(fake.bind_calls) == 1 and zt.pods[PodUid("a")] is first
            assert await manager.handle(AddWorkload(uid=PodUid("a"), workload_info=INFO,
                                                    netns_fd=os.dup(fd2))) == ""
            assert len(fake.bind_calls) == 2 and zt.pods[PodUid("a")] is not first
            assert first.done.is_set()


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "shared-buffer"])
async def test_outbound_copies_both_ways_with_half_close_and_logs_bytes(access_log: LogCapture,
                                                                        splice: bool) -> None:
    fake = FakeSockets()
    payload = b"x" * 700_000
    with pipe_fd() as fd, trio.fail_after(30):
        async with ztunnel(fake, splice=splice) as zt, trio.open_nursery() as nursery:
            server_port = await nursery.start(echo_server)
            fake.original = ("127.0.0.1", server_port)
            await zt.start_workload(PodUid("a"), INFO, fd)
            client = await tcp_connect(fake.ports["outbound"])
            async with client, trio.open_nursery() as io:
                async def write() -> None:
                    await client.send_all(payload)
                    await client.send_eof()
                io.start_soon(write)
                assert await read_to_eof(client) == payload
            (line,) = await access_log.wait_for("connection complete")
            nursery.cancel_scope.cancel()
    assert line.level == "info"
    assert line.fields["bytes_sent"] == len(payload) and line.fields["bytes_recv"] == len(payload)
    assert line.fields["direction"] == "outbound" and line.fields["src.workload"] == "app"
    assert line.fields["dst.addr"] == f"127.0.0.1:{server_port}"


async def test_refused_upstream_logs_error_and_resets_client(access_log: LogCapture) -> None:
    fake = FakeSockets()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        fake.original = ("127.0.0.1", probe.getsockname()[1])  # bound, not listening: refused
        with pipe_fd() as fd, trio.fail_after(30):
            async with ztunnel(fake) as zt:
                await zt.start_workload(PodUid("a"), INFO, fd)
                client = await tcp_connect(fake.ports["outbound"])
                async with client:  # the app sees the refusal, as a direct connect would: not a clean end
                    with pytest.raises(trio.BrokenResourceError) as caught:
                        await read_to_eof(client)
                    assert isinstance(caught.value.__cause__, ConnectionResetError)
                (line,) = await access_log.wait_for("connection complete")
    assert line.level == "error"
    assert line.fields["error"] == "io error: Connection refused (os error 111)"
    assert line.fields["bytes_sent"] == 0


async def test_no_original_destination_is_a_connection_failed_line(access_log: LogCapture) -> None:
    fake = FakeSockets()
    with pipe_fd() as fd, trio.fail_after(30):
        async with ztunnel(fake) as zt:
            await zt.start_workload(PodUid("a"), INFO, fd)
            client = await tcp_connect(fake.ports["outbound"])
            async with client:
                assert await read_to_eof(client) == b""
            (line,) = await access_log.wait_for("connection failed")
    assert line.level == "warn" and line.fields["direction"] == "outbound"


async def test_inbound_self_call_is_denied(access_log: LogCapture) -> None:
    fake = FakeSockets()
    fake.original = ("127.0.0.1", 15008)
    with pipe_fd() as fd, trio.fail_after(30):
        async with ztunnel(fake) as zt:
            await zt.start_workload(PodUid("a"), INFO, fd)
            client = await tcp_connect(fake.ports["inbound_plaintext"])
            async with client:
                assert await read_to_eof(client) == b""
            (line,) = await access_log.wait_for("connection failed")
    assert line.fields["error"] == "attempted recursive call to ourselves"
    assert line.fields["dst.addr"] == "127.0.0.1:15008"


@pytest.mark.parametrize("port", [15001, 15006, 15008, 15053])
async def test_outbound_to_ztunnels_own_listener_is_refused_as_a_self_call(access_log: LogCapture,
                                                                          port: int) -> None:
    # The loop's trigger: an app in the pod dials one of ztunnel's own ports (tests/netns/
    # test_ztunnel_inpod.py dials the pod's own IP, which the pod's rules leave alone; here, loopback).
    fake = FakeSockets()
    with pipe_fd() as fd, trio.fail_after(30):
        async with ztunnel(fake) as zt:
            await zt.start_workload(PodUid("a"), INFO, fd)
            fake.original = ("127.0.0.1", port)
            client = await tcp_connect(fake.ports["outbound"])
            async with client:
                assert await read_to_eof(client) == b""
            (line,) = await access_log.wait_for("connection failed")
            failed = zt.telemetry.metrics.failed
    assert line.fields["error"] == "attempted recursive call to ourselves"
    assert line.fields["direction"] == "outbound"
    assert line.fields["dst.addr"] == "{}:{}".format(*fake.original)
    assert fake.upstreams == 0  # nothing was dialled
    assert sum(child.value for child in failed.children.values()) == 1


async def test_stop_closes_open_connections_and_spares_other_pods(access_log: LogCapture) -> None:
    fake_a, fake_b = FakeSockets(), FakeSockets()
    with pipe_fd() as fd_a, pipe_fd() as fd_b, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server_port = await nursery.start(echo_server)
            fake_a.original = fake_b.original = ("127.0.0.1", server_port)
            async with ztunnel(fake_a) as zt_a, ztunnel(fake_b) as zt_b:
                await zt_a.start_workload(PodUid("a"), INFO, fd_a)
                await zt_b.start_workload(PodUid("b"), INFO, fd_b)
                held_a = await tcp_connect(fake_a.ports["outbound"])
                held_b = await tcp_connect(fake_b.ports["outbound"])
                await held_a.send_all(b"1")
                await held_b.send_all(b"2")
                await access_log.wait_for("connection opened", 2)
                await zt_a.stop_workload(PodUid("a"))
                assert PodUid("a") not in zt_a.pods
                with suppress(trio.BrokenResourceError):  # reset instead of FIN: also "closed"
                    assert await read_to_eof(held_a) == b""
                with pytest.raises(OSError):
                    await tcp_connect(fake_a.ports["outbound"])
                await held_b.send_eof()
                assert await read_to_eof(held_b) == b"2"
            nursery.cancel_scope.cancel()


async def test_graceful_drain_stops_accepting_then_force_closes_after_grace(access_log: LogCapture) -> None:
    fake = FakeSockets()
    with pipe_fd() as fd, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server_port = await nursery.start(echo_server)
            fake.original = ("127.0.0.1", server_port)
            async with ztunnel(fake) as zt:
                await zt.start_workload(PodUid("a"), INFO, fd)
                held = await tcp_connect(fake.ports["outbound"])
                await access_log.wait_for("connection opened")
                await zt.drain_all(grace=0.2)
                assert not zt.pods
                with pytest.raises(OSError):
                    await tcp_connect(fake.ports["outbound"])
                with suppress(trio.BrokenResourceError):
                    assert await read_to_eof(held) == b""
            nursery.cancel_scope.cancel()


async def test_accept_retries_after_a_capacity_error_and_hands_over_nodelay_connections() -> None:
    class Exhausted:
        """A listener whose first accept fails with EMFILE (the process is out of fds)."""

        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock
            self.failed = False

        def fileno(self) -> int:
            return self.sock.fileno()

        def accept(self) -> tuple[socket.socket, Any]:
            if not self.failed:
                self.failed = True
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return self.sock.accept()

    errors: list[OSError] = []
    accepted: list[tuple[socket.socket, Addr]] = []
    with socket.socket() as sock, trio.fail_after(10):
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        sock.setblocking(False)
        listener = cast(socket.socket, Exhausted(sock))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(accept_forever, listener,
                                                 lambda conn, peer: accepted.append((conn, peer)),
                                                 on_capacity_error=errors.append))
            client = await tcp_connect(sock.getsockname()[1])
            async with client:
                while not accepted:
                    await trio.sleep(0.01)
                conn, peer = accepted[0]
                with conn:
                    assert [e.errno for e in errors] == [errno.EMFILE]
                    assert peer == client.socket.getsockname()
                    assert not conn.getblocking()
                    assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            nursery.cancel_scope.cancel()


async def test_a_failing_connection_handler_does_not_stop_the_pod() -> None:
    fake = FakeSockets()
    calls = 0

    async def broken(ctx: PodContext, conn: socket.socket, peer: Addr) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug in a handler")

    handlers = {"outbound": broken, "inbound_plaintext": broken, "inbound_hbone": broken}
    with pipe_fd() as fd, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ctx = PodContext(uid=PodUid("a"), info=INFO, netns_fd=os.dup(fd), config=ProxyConfig(),
                             telemetry=Telemetry(), sockets=fake)
            handle: PodHandle = await nursery.start(
                lambda **kw: run_pod_proxies(ctx, handlers=handlers, **kw))
            for _ in range(2):
                client = await tcp_connect(fake.ports["outbound"])
                async with client:
                    assert await read_to_eof(client) == b""
            assert calls == 2 and not handle.done.is_set()
            await handle.drain_immediately()


async def test_workload_manager_acks_and_nacks_through_the_handler() -> None:
    fake = FakeSockets()
    with pipe_fd() as fd:
        async with ztunnel(fake) as zt:
            manager = WorkloadManager(zt)
            manager.connection_started()
            assert await manager.handle(AddWorkload(uid=PodUid("a"), workload_info=INFO,
                                                    netns_fd=os.dup(fd))) == ""
            fake.fail_with = "port 15006 is already in use inside the pod"
            nack = await manager.handle(AddWorkload(uid=PodUid("b"), workload_info=INFO, netns_fd=os.dup(fd)))
            assert nack == "failure to start proxy : port 15006 is already in use inside the pod"
            assert await manager.handle(SnapshotSent()) == ""
            assert not manager.ready  # b is pending
            fake.fail_with = None
            await manager.retry_pending()
            assert manager.ready and set(zt.pods) == {"a", "b"}
            assert await manager.handle(DelWorkload(uid=PodUid("a"))) == ""
            assert set(zt.pods) == {"b"}


async def test_a_pod_whose_accept_loop_dies_is_reported_once_and_stops_listing_as_running() -> None:
    fake = FakeSockets()
    with pipe_fd() as fd, trio.fail_after(30):
        async with trio.open_nursery() as pods:
            exited: list[PodUid] = []

            class Manager(WorkloadManager):
                def workload_exited(self, uid: PodUid) -> None:
                    exited.append(uid)
                    super().workload_exited(uid)

            zt = InPodWorkloadHandler(pods, sockets=fake)
            manager = Manager(zt)
            manager.connection_started()
            assert await manager.handle(SnapshotSent()) == ""
            assert await manager.handle(AddWorkload(uid=PodUid("a"), workload_info=INFO,
                                                    netns_fd=os.dup(fd))) == ""
            fake.listen = False
            assert await manager.handle(AddWorkload(uid=PodUid("b"), workload_info=INFO,
                                                    netns_fd=os.dup(fd))) == ""
            await trio.testing.wait_all_tasks_blocked()
            assert exited == ["b"]
            assert set(zt.pods) == {"a"} and set(manager.running) == {"a"}
            assert await manager.handle(DelWorkload(uid=PodUid("a"))) == ""  # a requested stop: not reported
            assert exited == ["b"] and not zt.pods and not manager.running
            pods.cancel_scope.cancel()


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "shared-buffer"])
async def test_client_reset_mid_transfer_is_logged_and_the_pod_keeps_serving(access_log: LogCapture,
                                                                             splice: bool) -> None:
    import struct

    fake = FakeSockets()
    with pipe_fd() as fd, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server_port = await nursery.start(echo_server)
            fake.original = ("127.0.0.1", server_port)
            async with ztunnel(fake, splice=splice) as zt:
                await zt.start_workload(PodUid("a"), INFO, fd)
                rude = trio.socket.socket()
                await rude.connect(("127.0.0.1", fake.ports["outbound"]))
                await rude.send(b"partial request")
                await access_log.wait_for("connection opened")
                rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                rude.close()  # RST
                (line,) = await access_log.wait_for("connection complete")
                assert line.level == "error"
                assert line.fields["error"] == "io error: Connection reset by peer (os error 104)"
                polite = await tcp_connect(fake.ports["outbound"])
                async with polite:
                    await polite.send_all(b"ok")
                    await polite.send_eof()
                    assert await read_to_eof(polite) == b"ok"
            nursery.cancel_scope.cancel()


async def _resetting_server(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Sends 64 KiB to each client, then resets the connection (SO_LINGER 0 and close)."""
    import struct

    async def serve(stream: trio.SocketStream) -> None:
        await stream.send_all(b"d" * 65536)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(serve, listeners)


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "shared-buffer"])
async def test_an_upstream_reset_mid_transfer_resets_the_apps_socket(access_log: LogCapture,
                                                                     splice: bool) -> None:
    # Plain passthrough: the upstream resets half-way through a download. The app must see ECONNRESET,
    # not a clean EOF that passes the truncated download off as complete.
    fake = FakeSockets()
    with pipe_fd() as fd, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server_port = await nursery.start(_resetting_server)
            fake.original = ("127.0.0.1", server_port)
            async with ztunnel(fake, splice=splice) as zt:
                await zt.start_workload(PodUid("a"), INFO, fd)
                client = await tcp_connect(fake.ports["outbound"])
                async with client:
                    (line,) = await access_log.wait_for("connection complete")
                    with pytest.raises(trio.BrokenResourceError) as broken:
                        await read_to_eof(client)
            nursery.cancel_scope.cancel()
    assert isinstance(broken.value.__cause__, ConnectionResetError)
    assert line.level == "error"
    assert line.fields["error"] == "io error: Connection reset by peer (os error 104)"


async def test_graceful_drain_lets_open_connections_finish(access_log: LogCapture) -> None:
    fake = FakeSockets()
    with pipe_fd() as fd, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server_port = await nursery.start(echo_server)
            fake.original = ("127.0.0.1", server_port)
            async with ztunnel(fake) as zt:
                await zt.start_workload(PodUid("a"), INFO, fd)
                held = await tcp_connect(fake.ports["outbound"])
                await access_log.wait_for("connection opened")
                drained = trio.Event()

                async def drain() -> None:
                    await zt.drain_all(grace=60)  # far longer than the test: it must end because we finish
                    drained.set()

                nursery.start_soon(drain)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(OSError):  # no longer accepting...
                    await tcp_connect(fake.ports["outbound"])
                async with held:  # ...but the open connection still works to the end
                    await held.send_all(b"finishing")
                    await held.send_eof()
                    assert await read_to_eof(held) == b"finishing"
                await drained.wait()
                (line,) = await access_log.wait_for("connection complete")
                assert line.level == "info" and line.fields["bytes_recv"] == len(b"finishing")
            nursery.cancel_scope.cancel()


async def test_remote_ends_are_named_from_the_peer_lookup(access_log: LogCapture) -> None:
    from services.ztunnel.telemetry.access_log import Peer

    class Peers:
        def by_address(self, ip: str) -> Peer | None:
            return Peer(workload="server", namespace="other", service="server.other.svc.cluster.local")

    fake = FakeSockets()
    with pipe_fd() as fd, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server_port = await nursery.start(echo_server)
            fake.original = ("127.0.0.1", server_port)
            async with trio.open_nursery() as pods:
                zt = InPodWorkloadHandler(pods, sockets=fake, peers=Peers())
                await zt.start_workload(PodUid("a"), INFO, fd)
                client = await tcp_connect(fake.ports["outbound"])
                async with client:
                    await client.send_eof()
                    assert await read_to_eof(client) == b""
                (line,) = await access_log.wait_for("connection complete")
                pods.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    assert line.fields["dst.workload"] == "server" and line.fields["dst.namespace"] == "other"
    assert line.fields["dst.service"] == "server.other.svc.cluster.local"
    assert list(line.fields).index("dst.service") < list(line.fields).index("dst.workload")
