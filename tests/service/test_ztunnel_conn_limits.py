"""The per-pod and per-process connection caps (proxy/limits.py) hit through real pod proxy sets: loopback
sockets, no root. Over a cap a connection is reset, counted and logged (at most once a second per pod),
and the pod serves again as soon as a connection ends."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import trio

from services.istiod.ca import CertificateAuthority
from services.ztunnel.inpod.handler import InPodWorkloadHandler
from services.ztunnel.proxy.limits import REFUSAL_LOG_INTERVAL
from shared.zds.types import PodUid
from tests.access_logs import LogCapture, ParsedLine, capture_access_log, parse_plain
from tests.service.test_ztunnel_inpod import (
    INFO,
    FakeSockets,
    echo_server,
    pipe_fd,
    read_to_eof,
    tcp_connect,
    ztunnel,
)
from tests.service.test_ztunnel_mesh import CLIENT_IP, SERVER_IP, Mesh2, two_pods


class RefusalLog(LogCapture):
    def parsed(self, message: str) -> list[ParsedLine]:
        return [p for p in map(parse_plain, self.lines) if p.message == message]


@contextmanager
def refusal_log() -> Iterator[LogCapture]:
    """The `ztunnel.proxy` logger's lines (where refusals are written)."""
    capture = RefusalLog()
    logger = logging.getLogger("ztunnel.proxy")
    logger.addHandler(capture)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)


async def wait_until(check: Callable[[], bool]) -> None:
    while not check():
        await trio.sleep(0.01)


def refused(handler: InPodWorkloadHandler, reason: str) -> float:
    return handler.telemetry.metrics.connections_refused.labels(reason=reason).value


async def is_reset(port: int) -> bool:
    """A connection to `port` is accepted (by the kernel) and then reset by ztunnel without a byte."""
    try:
        stream = await tcp_connect(port)
    except OSError:  # reset before the connect returned
        return True
    async with stream:
        try:
            await stream.send_all(b"anyone?")
            return await stream.receive_some() == b""
        except trio.BrokenResourceError:
            return True


async def echoes(stream: trio.SocketStream, payload: bytes) -> bool:
    await stream.send_all(payload)
    await stream.send_eof()
    return await read_to_eof(stream) == payload


async def test_a_pod_over_its_cap_resets_new_connections_and_serves_again_below_it() -> None:
    fake = FakeSockets()
    clock = [0.0]
    with pipe_fd() as fd, refusal_log() as log, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            fake.original = ("127.0.0.1", await nursery.start(echo_server))
            async with ztunnel(fake) as zt:
                zt.limits.max_per_pod = 4  # a passthrough connection holds two: the app's and the upstream
                zt.limits.clock = lambda: clock[0]
                await zt.start_workload(PodUid("a"), INFO, fd)
                pod = zt.pods[PodUid("a")].context.connections
                held = [await tcp_connect(fake.ports["outbound"]) for _ in range(2)]
                for stream in held:
                    await stream.send_all(b"hold")
                await wait_until(lambda: pod.open == 4)
                made = fake.upstreams

                for _ in range(3):  # three refusals within one second: one line
                    assert await is_reset(fake.ports["outbound"])
                assert fake.upstreams == made  # refused before any upstream socket was made
                assert refused(zt, "pod_limit") == 3
                [line] = log.parsed("connection refused")
                assert line.level == "warn"
                assert "ZTUNNEL_MAX_CONNECTIONS_PER_POD" in str(line.fields["error"])
                assert line.fields["pod"] == "a" and line.fields["suppressed"] == 0

                clock[0] += REFUSAL_LOG_INTERVAL
                assert await is_reset(fake.ports["outbound"])
                assert [p.fields["suppressed"] for p in log.parsed("connection refused")] == [0, 2]

                async with held.pop():  # one ends: room for exactly one more
                    pass
                await wait_until(lambda: pod.open == 2)
                async with await tcp_connect(fake.ports["outbound"]) as again:
                    assert await echoes(again, b"room again")
                for stream in held:
                    await stream.aclose()
                await wait_until(lambda: pod.open == 0 and zt.limits.open == 0)
            nursery.cancel_scope.cancel()


async def test_the_process_cap_spans_pods() -> None:
    fake = FakeSockets()
    with pipe_fd() as fd_a, pipe_fd() as fd_b, refusal_log() as log, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            fake.original = ("127.0.0.1", await nursery.start(echo_server))
            async with ztunnel(fake) as zt:
                zt.limits.max_connections = 2
                await zt.start_workload(PodUid("a"), INFO, fd_a)
                ports_a = dict(fake.ports)
                await zt.start_workload(PodUid("b"), INFO, fd_b)
                ports_b = dict(fake.ports)
                async with await tcp_connect(ports_a["outbound"]) as held:
                    await held.send_all(b"hold")
                    await wait_until(lambda: zt.limits.open == 2)
                    assert await is_reset(ports_b["inbound_plaintext"])
                    assert refused(zt, "process_limit") == 1
                    [line] = log.parsed("connection refused")
                    assert line.fields["pod"] == "b"
                    assert "its limit is 2 (ZTUNNEL_MAX_CONNECTIONS)" in str(line.fields["error"])
                await wait_until(lambda: zt.limits.open == 0)
                async with await tcp_connect(ports_b["inbound_plaintext"]) as now:
                    assert await echoes(now, b"served")
            nursery.cancel_scope.cancel()


async def test_the_upstream_of_a_passthrough_counts_and_is_refused_alone() -> None:
    # Room for one accepted connection but not for its upstream: the app's connection is reset, nothing
    # is left counted, and no upstream socket was made.
    fake = FakeSockets()
    with pipe_fd() as fd, refusal_log() as log, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            fake.original = ("127.0.0.1", await nursery.start(echo_server))
            async with ztunnel(fake) as zt:
                zt.limits.max_per_pod = 3
                await zt.start_workload(PodUid("a"), INFO, fd)
                pod = zt.pods[PodUid("a")].context.connections
                async with await tcp_connect(fake.ports["outbound"]) as held:
                    await held.send_all(b"hold")
                    await wait_until(lambda: pod.open == 2)
                    made = fake.upstreams
                    assert await is_reset(fake.ports["outbound"])
                    await wait_until(lambda: pod.open == 2)
                    assert fake.upstreams == made
                    [line] = log.parsed("connection refused")
                    assert line.fields["direction"] == "outbound"
            nursery.cancel_scope.cancel()


async def hold_call(world: Mesh2, original: tuple[str, int]) -> trio.SocketStream:
    """The client app's connection to `original` through its 15001, left open after the first echo."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((CLIENT_IP, 0))
    world.sockets.original[sock.getsockname()[1]] = original
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    await stream.socket.connect((CLIENT_IP, world.sockets.ports[CLIENT_IP]["outbound"]))
    return stream


async def test_each_hbone_stream_that_opens_an_app_connection_counts(ca: CertificateAuthority) -> None:
    with capture_access_log() as access, trio.fail_after(30):
        async with two_pods(ca) as world:
            handler = world.handler
            handler.limits.max_per_pod = 2  # the server pod: its 15008 connection and one stream's app socket
            server = handler.pods[PodUid("web-uid")].context.connections
            first = await hold_call(world, (SERVER_IP, world.app_port))
            async with first:
                await first.send_all(b"one")
                assert (await first.receive_some()).startswith(CLIENT_IP.encode())
                assert server.open == 2
                echo, seen = await world.call((SERVER_IP, world.app_port), b"two")  # same pooled connection
                assert (echo, seen) == (b"", "")
                assert refused(handler, "pod_limit") == 1
                inbound = [p for p in await access.wait_for("connection complete")
                           if p.fields["direction"] == "inbound"]
                [line] = inbound
                assert "ZTUNNEL_MAX_CONNECTIONS_PER_POD" in str(line.fields["error"])
                await first.send_eof()
                assert (await read_to_eof(first)).endswith(b"one")
            await wait_until(lambda: server.open == 1)  # the pooled 15008 connection stays
            echo, _ = await world.call((SERVER_IP, world.app_port), b"three")
            assert echo == b"three"


@pytest.mark.parametrize(("value", "expected"), [("", None), ("0", None), ("5000", 5000)])
def test_settings_read_the_caps(value: str, expected: int | None) -> None:
    from services.ztunnel.config import load_config

    env = {"ZTUNNEL_MAX_CONNECTIONS": value, "ZTUNNEL_MAX_CONNECTIONS_PER_POD": value}
    proxy = load_config(env).proxy
    assert proxy.max_connections == expected and proxy.max_connections_per_pod == expected


def test_a_negative_cap_is_refused_with_the_settings_name() -> None:
    from services.ztunnel.config import load_config
    from services.ztunnel.errors import ConfigError

    with pytest.raises(ConfigError, match="ZTUNNEL_MAX_CONNECTIONS_PER_POD=-1"):
        load_config({"ZTUNNEL_MAX_CONNECTIONS_PER_POD": "-1"})


def test_defaults_follow_the_open_files_limit() -> None:
    import resource

    from services.ztunnel.proxy.limits import ConnectionLimits, default_max_connections

    assert default_max_connections(20_000) == 18_000  # room for 10,000 HBONE tunnels through one pod
    assert default_max_connections(1_024) == 768
    limits = ConnectionLimits()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert limits.max_connections == default_max_connections(soft) < soft
    assert limits.max_per_pod == int(limits.max_connections * 0.75)
