# ruff: noqa: E501  (the rule text is upstream's ztunnel-redirect-inpod.sh, verbatim)
"""ztunnel's in-pod listener sets in real namespaces, with the upstream redirect rules applied by the test.

Topology per test: one "server" netns; per pod a netns joined to the server ns by a veth pair created from
inside those namespaces (pod i = 10.250.i.1/24, server side 10.250.i.2/24). The pod gets upstream's in-pod
mangle+nat rules and the table-100 policy route. ztunnel runs in this test process and binds into the pod
through the netns fd, exactly as it does with a ZDS-delivered fd.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress

import pytest
import trio

from services.ztunnel.inpod.handler import InPodWorkloadHandler
from services.ztunnel.inpod.sockets import SO_MARK
from services.ztunnel.proxy.context import ProxyConfig
from services.ztunnel.telemetry.access_log import Telemetry
from shared.netns import entered, open_netns
from shared.zds.types import PodUid, WorkloadInfo
from tests.access_logs import LogCapture, capture_access_log
from tests.netns.conftest import run

INPOD_RULES = """\
*mangle
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
COMMIT
*nat
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
COMMIT
"""

SERVER_PORT = 8080
APP_PORT = 9080


def add_pod(make_netns: Callable[[str], str], server_ns: str, index: int) -> tuple[str, str, str]:
    """A pod netns wired to `server_ns`, with the in-pod rules. Returns (pod_ns, pod_ip, server_ip)."""
    pod = make_netns(f"pod{index}")
    pod_ip, server_ip = f"10.250.{index}.1", f"10.250.{index}.2"
    veth_pod, veth_srv = f"vp{index}", f"vs{index}"
    run("ip", "link", "add", veth_pod, "type", "veth", "peer", "name", veth_srv, "netns", server_ns, netns=pod)
    run("ip", "addr", "add", f"{pod_ip}/24", "dev", veth_pod, netns=pod)
    run("ip", "link", "set", veth_pod, "up", netns=pod)
    run("ip", "addr", "add", f"{server_ip}/24", "dev", veth_srv, netns=server_ns)
    run("ip", "link", "set", veth_srv, "up", netns=server_ns)
    subprocess.run(["ip", "netns", "exec", pod, "iptables-restore", "--noflush"], input=INPOD_RULES,
                   check=True, capture_output=True, text=True, timeout=30)
    run("ip", "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100", netns=pod)
    run("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100", netns=pod)
    return pod, pod_ip, server_ip


@contextmanager
def netns_fd(name: str) -> Iterator[int]:
    fd = open_netns(name)
    try:
        yield fd
    finally:
        os.close(fd)


def listen_in(fd: int, port: int, host: str = "0.0.0.0") -> trio.socket.SocketType:
    with entered(fd):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


async def bound_listener(fd: int, port: int) -> trio.socket.SocketType:
    sock = listen_in(fd, port)
    await sock.bind(("0.0.0.0", port))
    sock.listen(16)
    return sock


async def connect_from(fd: int, addr: tuple[str, int]) -> trio.socket.SocketType:
    with entered(fd):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.connect(addr)
    return sock


async def recv_all(sock: trio.socket.SocketType) -> bytes:
    chunks = []
    while chunk := await sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view):]


async def echo_server(listener: trio.socket.SocketType, peers: list[tuple[str, int]]) -> None:
    """Accept forever; each connection: read to EOF, echo it back, close. Records each peer address.
    A connection ztunnel resets (a drained pod's relay ends with RST) ends only that connection."""

    async def one(conn: trio.socket.SocketType) -> None:
        with conn, suppress(ConnectionResetError, BrokenPipeError):
            data = await recv_all(conn)
            await send_all(conn, data)

    async with trio.open_nursery() as nursery:
        while True:
            conn, peer = await listener.accept()
            peers.append(peer)
            nursery.start_soon(one, conn)


@pytest.fixture
def access_log() -> Iterator[LogCapture]:
    with capture_access_log(deadline=10) as capture:
        yield capture


@asynccontextmanager
async def ztunnel(*, splice: bool = True) -> AsyncIterator[InPodWorkloadHandler]:
    async with trio.open_nursery() as pods:
        handler = InPodWorkloadHandler(pods, config=ProxyConfig(splice=splice), telemetry=Telemetry())
        try:
            yield handler
        finally:
            pods.cancel_scope.cancel()


INFO = WorkloadInfo(name="client", namespace="default", service_account="client-sa")


def listening_ports(ns: str | None) -> str:
    return run("ss", "-ltne", netns=ns).stdout


async def test_listeners_bound_in_pod_with_mark_and_none_in_own_netns(make_netns: Callable[[str], str]) -> None:
    server_ns = make_netns("srv")
    pod, _, _ = add_pod(make_netns, server_ns, 1)
    with netns_fd(pod) as fd:
        async with ztunnel() as zt:
            own_before = listening_ports(None)
            await zt.start_workload(PodUid("uid-1"), INFO, fd)
            table = listening_ports(pod)
            own_after = listening_ports(None)
            for port in (15001, 15006, 15008):
                lines = [line for line in table.splitlines() if f":{port} " in line]
                assert lines, table
                assert "fwmark:0x539" in lines[0], lines[0]
                assert f":{port} " not in own_after or f":{port} " in own_before
            handle = zt.pods[PodUid("uid-1")]
            assert {li.port for li in handle.listeners} == {15001, 15006, 15008}
            assert all(li.mark == 1337 for li in handle.listeners)
            # The caller's fd stays usable (we dup'd ours).
            os.fstat(fd)
            await zt.stop_workload(PodUid("uid-1"))
            table = listening_ports(pod)
            assert ":15001 " not in table and ":15006 " not in table and ":15008 " not in table


async def test_listener_socket_options(make_netns: Callable[[str], str]) -> None:
    server_ns = make_netns("srv")
    pod, _, _ = add_pod(make_netns, server_ns, 1)
    from services.ztunnel.inpod.sockets import (
        IP_TRANSPARENT,
        SO_REUSEPORT,
        SOL_IP,
        bind_pod_listeners,
        create_upstream_socket,
    )

    with netns_fd(pod) as fd:
        listeners = bind_pod_listeners(fd)
        try:
            for listener in listeners:
                assert listener.sock.getsockopt(socket.SOL_SOCKET, SO_MARK) == 1337
                assert listener.sock.getsockopt(socket.SOL_SOCKET, SO_REUSEPORT) == 1
                assert listener.sock.family == socket.AF_INET6  # dual-stack wildcard
                assert listener.sock.getsockname()[0] == "::"
                assert listener.sock.getsockopt(SOL_IP, IP_TRANSPARENT) == 1  # root: best effort succeeds
        finally:
            listeners.close()
        upstream = create_upstream_socket(fd, socket.AF_INET)
        with upstream:
            assert upstream.getsockopt(socket.SOL_SOCKET, SO_MARK) == 1337  # never captured again
            assert upstream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "shared-buffer"])
async def test_outbound_passthrough_reaches_server(make_netns: Callable[[str], str],
                                                   access_log: LogCapture, splice: bool) -> None:
    server_ns = make_netns("srv")
    pod, pod_ip, server_ip = add_pod(make_netns, server_ns, 1)
    peers: list[tuple[str, int]] = []
    payload = os.urandom(3 * 1024 * 1024 + 17)
    with netns_fd(pod) as pfd, netns_fd(server_ns) as sfd:
        server = await bound_listener(sfd, SERVER_PORT)
        async with ztunnel(splice=splice) as zt, trio.open_nursery() as nursery:
            nursery.start_soon(echo_server, server, peers)
            await zt.start_workload(PodUid("uid-1"), INFO, pfd)
            with trio.fail_after(30):
                client = await connect_from(pfd, (server_ip, SERVER_PORT))
                with client:
                    # The client believes it talks to the server; the kernel says it was redirected.
                    async with trio.open_nursery() as io:
                        async def write() -> None:
                            await send_all(client, payload)
                            client.shutdown(socket.SHUT_WR)
                        io.start_soon(write)
                        echoed = await recv_all(client)
            assert echoed == payload
            assert peers and peers[0][0] == pod_ip
            (line,) = await access_log.wait_for("connection complete")
            nursery.cancel_scope.cancel()
    assert line.level == "info"
    assert line.fields["direction"] == "outbound"
    assert line.fields["bytes_sent"] == len(payload)
    assert line.fields["bytes_recv"] == len(payload)
    assert line.fields["dst.addr"] == f"{server_ip}:{SERVER_PORT}"
    assert str(line.fields["src.addr"]).startswith(f"{pod_ip}:")
    assert line.fields["src.workload"] == "client"
    assert line.fields["src.namespace"] == "default"
    assert str(line.fields["duration"]).endswith("ms")


async def test_inbound_plaintext_preserves_client_source_ip(make_netns: Callable[[str], str],
                                                            access_log: LogCapture) -> None:
    server_ns = make_netns("srv")
    pod, pod_ip, server_ip = add_pod(make_netns, server_ns, 1)
    app_peers: list[tuple[str, int]] = []
    with netns_fd(pod) as pfd, netns_fd(server_ns) as sfd:
        app = await bound_listener(pfd, APP_PORT)
        async with ztunnel() as zt, trio.open_nursery() as nursery:
            nursery.start_soon(echo_server, app, app_peers)
            await zt.start_workload(PodUid("uid-1"), INFO, pfd)
            with trio.fail_after(30):
                client = await connect_from(sfd, (pod_ip, APP_PORT))
                with client:
                    await send_all(client, b"hello inbound")
                    client.shutdown(socket.SHUT_WR)
                    assert await recv_all(client) == b"hello inbound"
            (line,) = await access_log.wait_for("connection complete")
            nursery.cancel_scope.cancel()
    assert app_peers[0][0] == server_ip  # the app saw the real client, not the pod's own address
    assert line.fields["direction"] == "inbound"
    assert line.fields["bytes_sent"] == len(b"hello inbound")
    assert line.fields["bytes_recv"] == len(b"hello inbound")
    assert line.fields["dst.addr"] == f"{pod_ip}:{APP_PORT}"
    assert line.fields["dst.workload"] == "client"
    assert str(line.fields["src.addr"]).startswith(f"{server_ip}:")


async def test_inbound_to_ztunnel_port_is_denied_as_self_call(make_netns: Callable[[str], str],
                                                              access_log: LogCapture) -> None:
    server_ns = make_netns("srv")
    pod, pod_ip, _ = add_pod(make_netns, server_ns, 1)
    with netns_fd(pod) as pfd, netns_fd(server_ns) as sfd:
        async with ztunnel() as zt:
            await zt.start_workload(PodUid("uid-1"), INFO, pfd)
            with trio.fail_after(30):
                # Redirected to 15006 with original destination :15001 -> SelfCall.
                client = await connect_from(sfd, (pod_ip, 15001))
                with client:
                    assert await recv_all(client) == b""
            (line,) = await access_log.wait_for("connection failed")
    assert line.level == "warn"
    assert line.fields["dst.addr"] == f"{pod_ip}:15001"
    assert line.fields["direction"] == "inbound"
    assert "recursive" in str(line.fields["error"])


@pytest.mark.parametrize("port", [15001, 15006])
async def test_app_dialling_its_own_pod_ip_ztunnel_port_is_refused_once(make_netns: Callable[[str], str],
                                                                        access_log: LogCapture,
                                                                        port: int) -> None:
    # The self-call loop's trigger: the app dials its own pod IP's ztunnel port. That goes out on `lo`, which
    # the rules leave alone, so it reaches ztunnel's listener itself; passed through, it came back in again
    # without end until ztunnel ran out of fds.
    server_ns = make_netns("srv")
    pod, pod_ip, _ = add_pod(make_netns, server_ns, 1)
    with netns_fd(pod) as pfd:
        async with ztunnel() as zt:
            await zt.start_workload(PodUid("uid-1"), INFO, pfd)
            with trio.fail_after(30):
                client = await connect_from(pfd, (pod_ip, port))
                with client:
                    assert await recv_all(client) == b""
            (line,) = await access_log.wait_for("connection failed")
    assert line.fields["dst.addr"] == f"{pod_ip}:{port}"
    assert line.fields["error"] == "attempted recursive call to ourselves"
    assert not access_log.parsed("connection complete") and len(access_log.parsed("connection failed")) == 1


async def test_stopping_one_pod_closes_its_connections_and_spares_the_other(
        make_netns: Callable[[str], str], access_log: LogCapture) -> None:
    server_ns = make_netns("srv")
    pod1, _, server_ip1 = add_pod(make_netns, server_ns, 1)
    pod2, _, server_ip2 = add_pod(make_netns, server_ns, 2)
    peers: list[tuple[str, int]] = []
    with netns_fd(pod1) as fd1, netns_fd(pod2) as fd2, netns_fd(server_ns) as sfd:
        server = await bound_listener(sfd, SERVER_PORT)
        async with ztunnel() as zt, trio.open_nursery() as nursery:
            nursery.start_soon(echo_server, server, peers)
            await zt.start_workload(PodUid("uid-1"), INFO, fd1)
            await zt.start_workload(PodUid("uid-2"), INFO, fd2)
            with trio.fail_after(30):
                held1 = await connect_from(fd1, (server_ip1, SERVER_PORT))
                held2 = await connect_from(fd2, (server_ip2, SERVER_PORT))
                with held1, held2:
                    await send_all(held1, b"a")
                    await send_all(held2, b"b")
                    await zt.stop_workload(PodUid("uid-1"))
                    # Pod 1's open connection is closed by ztunnel (EOF or reset), its listeners are gone.
                    with suppress(ConnectionResetError):
                        assert await recv_all(held1) == b""
                    assert ":15001 " not in listening_ports(pod1)
                    # Pod 2 is untouched: its held connection still works, and new ones too.
                    held2.shutdown(socket.SHUT_WR)
                    assert await recv_all(held2) == b"b"
                    fresh = await connect_from(fd2, (server_ip2, SERVER_PORT))
                    with fresh:
                        await send_all(fresh, b"still here")
                        fresh.shutdown(socket.SHUT_WR)
                        assert await recv_all(fresh) == b"still here"
            assert PodUid("uid-1") not in zt.pods and PodUid("uid-2") in zt.pods
            lines = await access_log.wait_for("connection complete", 3)
            nursery.cancel_scope.cancel()
    drained = [p for p in lines if p.level == "error"]
    assert len(drained) == 1 and drained[0].fields["error"] == "connection drained"


async def test_not_a_netns_fd_is_a_start_error_and_nothing_runs() -> None:
    from services.ztunnel.errors import ProxyStartError

    r, w = os.pipe()
    try:
        async with ztunnel() as zt:
            with pytest.raises(ProxyStartError, match="network namespace"):
                await zt.start_workload(PodUid("uid-x"), INFO, r)
            assert not zt.pods
        os.fstat(r)  # the caller's fd is still open
    finally:
        os.close(r)
        os.close(w)


def add_ipv6(pod: str, server_ns: str, index: int) -> tuple[str, str]:
    """Give pod `index` (from add_pod) IPv6 addresses and the ip6tables flavour of the rules."""
    pod_ip, server_ip = f"fd00:250:{index}::1", f"fd00:250:{index}::2"
    run("ip", "-6", "addr", "add", f"{pod_ip}/64", "dev", f"vp{index}", "nodad", netns=pod)
    run("ip", "-6", "addr", "add", f"{server_ip}/64", "dev", f"vs{index}", "nodad", netns=server_ns)
    rules = INPOD_RULES.replace("127.0.0.1/32", "::1/128").replace(
        "169.254.7.127/32", "fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128")
    subprocess.run(["ip", "netns", "exec", pod, "ip6tables-restore", "--noflush"], input=rules,
                   check=True, capture_output=True, text=True, timeout=30)
    run("ip", "-6", "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100", netns=pod)
    run("ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100", netns=pod)
    return pod_ip, server_ip


async def bound_listener6(fd: int, port: int) -> trio.socket.SocketType:
    with entered(fd):
        sock = trio.socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    await sock.bind(("::", port))
    sock.listen(16)
    return sock


async def connect6_from(fd: int, addr: tuple[str, int]) -> trio.socket.SocketType:
    with entered(fd):
        sock = trio.socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    await sock.connect(addr)
    return sock


async def test_ipv6_outbound_and_inbound_with_original_dst_and_source(make_netns: Callable[[str], str],
                                                                      access_log: LogCapture) -> None:
    server_ns = make_netns("srv")
    pod, _, _ = add_pod(make_netns, server_ns, 1)
    pod_ip, server_ip = add_ipv6(pod, server_ns, 1)
    server_peers: list[tuple[str, int]] = []
    app_peers: list[tuple[str, int]] = []
    with netns_fd(pod) as pfd, netns_fd(server_ns) as sfd:
        server = await bound_listener6(sfd, SERVER_PORT)
        app = await bound_listener6(pfd, APP_PORT)
        async with ztunnel() as zt, trio.open_nursery() as nursery:
            nursery.start_soon(echo_server, server, server_peers)
            nursery.start_soon(echo_server, app, app_peers)
            await zt.start_workload(PodUid("uid-1"), INFO, pfd)
            with trio.fail_after(30):
                out = await connect6_from(pfd, (server_ip, SERVER_PORT))  # via 15001 (IP6T_SO_ORIGINAL_DST)
                with out:
                    await send_all(out, b"v6 out")
                    out.shutdown(socket.SHUT_WR)
                    assert await recv_all(out) == b"v6 out"
                inbound = await connect6_from(sfd, (pod_ip, APP_PORT))  # via 15006, transparent to the app
                with inbound:
                    await send_all(inbound, b"v6 in!")
                    inbound.shutdown(socket.SHUT_WR)
                    assert await recv_all(inbound) == b"v6 in!"
            lines = await access_log.wait_for("connection complete", 2)
            nursery.cancel_scope.cancel()
    assert server_peers[0][0] == pod_ip
    assert app_peers[0][0] == server_ip
    by_direction = {line.fields["direction"]: line for line in lines}
    assert by_direction["outbound"].fields["dst.addr"] == f"[{server_ip}]:{SERVER_PORT}"
    assert by_direction["inbound"].fields["dst.addr"] == f"[{pod_ip}]:{APP_PORT}"
    assert by_direction["inbound"].fields["bytes_recv"] == 6


async def test_unreachable_destination_times_out_with_an_error_line(make_netns: Callable[[str], str],
                                                                   access_log: LogCapture) -> None:
    server_ns = make_netns("srv")
    pod, _, server_ip = add_pod(make_netns, server_ns, 1)
    run("iptables", "-A", "INPUT", "-p", "tcp", "--dport", "8081", "-j", "DROP", netns=server_ns)
    with netns_fd(pod) as pfd, trio.fail_after(30):
        async with trio.open_nursery() as pods:
            zt = InPodWorkloadHandler(pods, config=ProxyConfig(connect_timeout=0.3), telemetry=Telemetry())
            await zt.start_workload(PodUid("uid-1"), INFO, pfd)
            client = await connect_from(pfd, (server_ip, 8081))  # accepted by ztunnel's 15001 at once
            with client, pytest.raises(ConnectionResetError):  # then reset when the connect gives up
                await recv_all(client)
            (line,) = await access_log.wait_for("connection complete")
            pods.cancel_scope.cancel()
    assert line.level == "error"
    assert str(line.fields["error"]).startswith("connection timed out after 0.3s")


async def test_port_in_use_inside_the_pod_fails_the_start_and_binds_nothing(
        make_netns: Callable[[str], str]) -> None:
    from services.ztunnel.errors import ProxyStartError

    server_ns = make_netns("srv")
    pod, _, _ = add_pod(make_netns, server_ns, 1)
    with netns_fd(pod) as fd:
        squatter = await bound_listener(fd, 15006)  # an app on ztunnel's port, without SO_REUSEPORT
        with squatter:
            async with ztunnel() as zt:
                with pytest.raises(ProxyStartError, match="port 15006 is already in use inside the pod"):
                    await zt.start_workload(PodUid("uid-1"), INFO, fd)
                assert not zt.pods
                table = listening_ports(pod)
                assert ":15001 " not in table and ":15008 " not in table  # all or nothing
        async with ztunnel() as zt:  # once the port is free the same pod starts (the manager's retry)
            await zt.start_workload(PodUid("uid-1"), INFO, fd)
            assert ":15006 " in listening_ports(pod)
