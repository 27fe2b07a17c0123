"""Two pods' proxy sets wired to the mesh, without root: HBONE out of one pod's 15001 into the other's 15008.

Each fake pod has its own loopback address (127.0.77.2 = client, 127.0.77.3 = server): its listeners bind
there (15008 on its real port, the others on ephemeral ones) and its upstream sockets leave from there, so
the server side sees the client pod's address as the TCP source, as in a pod netns. Certificates come from
the istiod stub's CA; the xDS state is written straight into a StateStore.
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio
from google.protobuf import any_pb2
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from services.istiod.ca import CertificateAuthority
from services.istiod.derive import ADDRESS_TYPE_URL, Resources
from services.istiod.world import World, load_world
from services.ztunnel.admin import Admin, Readiness, ZtunnelParts
from services.ztunnel.config import ZtunnelConfig
from services.ztunnel.hbone.errors import HttpStatusError
from services.ztunnel.hbone.pool import PoolKey
from services.ztunnel.hbone.tls import TlsContextCache
from services.ztunnel.inpod.handler import InPodWorkloadHandler
from services.ztunnel.inpod.sockets import PORTS, PodListener, PodListeners
from services.ztunnel.inpod.statemanager import WorkloadManager
from services.ztunnel.net import INBOUND_HBONE_PORT
from services.ztunnel.peers import StatePeers
from services.ztunnel.proxy.context import Mesh, ProxyConfig
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import (
    Action,
    Authorization,
    Clause,
    Match,
    NetworkAddress,
    PolicyKey,
    Port,
    Rule,
    Scope,
    Service,
    ServiceKey,
    StringMatch,
    TunnelProtocol,
    Workload,
    WorkloadUid,
)
from services.ztunnel.telemetry.access_log import Telemetry
from services.ztunnel.xds.convert import address_from_any
from shared.addr import Addr
from shared.httpd import Request, serve_http_tcp
from shared.identity import SpiffeId
from shared.netns import NetnsId, netns_id
from shared.zds.types import PodUid, WorkloadInfo
from tests.access_logs import LogCapture, ParsedLine, capture_access_log
from tests.service.test_hbone_helpers import FakeCerts
from tests.service.test_ztunnel_inpod import pipe_fd, read_to_eof

CLIENT_IP = "127.0.77.2"
SERVER_IP = "127.0.77.3"
VIP = "10.96.77.1"
NODE = "node-a"
CLIENT_INFO = WorkloadInfo(name="client", namespace="mesh", service_account="client")
SERVER_INFO = WorkloadInfo(name="web", namespace="mesh", service_account="web")
WEB_SERVICE = Service(name="web", namespace="mesh", hostname="web.mesh.svc.cluster.local",
                      addresses=(NetworkAddress(address=VIP),), ports=(Port(service_port=80, target_port=0),))

# upstream ztunnel's access-log field order; a line carries a subset of these, in this order
FIELD_ORDER = ["src.addr", "src.workload", "src.namespace", "src.identity", "src.cluster", "dst.addr",
               "dst.hbone_addr", "dst.service", "dst.workload", "dst.namespace", "dst.identity",
               "dst.cluster", "direction", "bytes_sent", "bytes_recv", "duration", "error"]


MTLS_LABELS = {
    "source_workload": "client", "source_principal": "spiffe://cluster.local/ns/mesh/sa/client",
    "destination_workload": "web", "destination_principal": "spiffe://cluster.local/ns/mesh/sa/web",
    "destination_service": "web.mesh.svc.cluster.local", "connection_security_policy": "mutual_tls",
}


def sample_sum(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(sample.value for metric in registry.collect() for sample in metric.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def in_field_order(line: ParsedLine) -> bool:
    keys = list(line.fields)
    return keys == [k for k in FIELD_ORDER if k in keys]


class MeshCerts(FakeCerts):
    """FakeCerts plus the certificate manager's admin side."""

    def __init__(self, ca: CertificateAuthority) -> None:
        super().__init__(ca)
        self.forgotten: list[SpiffeId] = []

    def forget(self, identity: SpiffeId) -> None:
        self.forgotten.append(identity)
        self.bundles.pop(identity, None)

    def dump(self) -> list[dict[str, Any]]:
        return [{"identity": i.uri} for i in sorted(self.bundles)]


class PodSockets:
    """Loopback sockets per fake pod: the netns fd (its identity: ztunnel dups it) names the pod's address."""

    def __init__(self) -> None:
        self.ip_of: dict[NetnsId, str] = {}
        self.original: dict[int, Addr] = {}  # client port -> original destination
        self.ports: dict[str, dict[str, int]] = {}
        self.upstreams = 0  # sockets made for upstream connections (HBONE or plain)

    def bind_listeners(self, netns_fd: int) -> PodListeners:
        ip = self.ip_of[netns_id(netns_fd)]
        made = []
        for role, port in PORTS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, port if port == INBOUND_HBONE_PORT else 0))
            sock.listen(64)
            self.ports.setdefault(ip, {})[role] = sock.getsockname()[1]
            made.append(PodListener(role=role, port=sock.getsockname()[1], sock=sock))
        return PodListeners(listeners=tuple(made), ipv6=False, transparent=False)

    def upstream(self, netns_fd: int, family: socket.AddressFamily, *,
                 bind_source: str | None = None) -> socket.socket:
        self.upstreams += 1
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the in-pod factory's
        sock.bind((bind_source or self.ip_of[netns_id(netns_fd)], 0))  # every 127/8 address is local
        return sock

    def original_dst(self, sock: socket.socket) -> Addr | None:
        return self.original.get(sock.getpeername()[1])


def workload(name: str, ip: str, *, services: Mapping[ServiceKey, tuple[Port, ...]] | None = None,
             policies: tuple[str, ...] = (), hbone: bool = True) -> Workload:
    return Workload(uid=WorkloadUid(f"Kubernetes//Pod/mesh/{name}"), name=name, namespace="mesh",
                    addresses=(ip,), service_account=name, node=NODE, cluster_id="Kubernetes",
                    tunnel_protocol=TunnelProtocol.HBONE if hbone else TunnelProtocol.NONE,
                    services=dict(services or {}),
                    authorization_policies=tuple(PolicyKey(p) for p in policies))


class Mesh2:
    def __init__(self, store: StateStore, sockets: PodSockets, handler: InPodWorkloadHandler, app_port: int,
                 certs: MeshCerts) -> None:
        self.store = store
        self.sockets = sockets
        self.handler = handler
        self.app_port = app_port
        self.certs = certs

    def set_world(self, *, server_hbone: bool = True, policies: tuple[Authorization, ...] = (),
                  endpoints: bool = True) -> None:
        web_ports = {WEB_SERVICE.key: (Port(service_port=80, target_port=self.app_port),)}
        self.store.apply_addresses(
            [workload("client", CLIENT_IP), WEB_SERVICE,
             workload("web", SERVER_IP, services=web_ports if endpoints else {}, hbone=server_hbone,
                      policies=tuple(p.key for p in policies))], [])
        keep = {p.key for p in policies}
        self.store.apply_authorizations(policies, [key for key in self.store.policies if key not in keep])

    def apply_world(self, world: World) -> None:
        """Replace the state with what the istiod stub derives from `world`, through ztunnel's conversion
        of the serialized resources (what the xDS client does with them)."""
        derived = Resources(world).by_type[ADDRESS_TYPE_URL]
        addresses = [address_from_any(name, _packed(ADDRESS_TYPE_URL, msg))
                     for name, (_, msg) in derived.items()]
        self.store.apply_addresses(addresses, [name for name in [*self.store.workloads, *self.store.services]
                                               if name not in derived])
        self.store.apply_authorizations([], list(self.store.policies))

    async def call(self, original: Addr, payload: bytes) -> tuple[bytes, str]:
        """Connect as the client app (from the client pod's address) to `original`; returns the echo and
        the address the app saw."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((CLIENT_IP, 0))
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self.sockets.original[sock.getsockname()[1]] = original
        await stream.socket.connect((CLIENT_IP, self.sockets.ports[CLIENT_IP]["outbound"]))
        async with stream:
            try:
                await stream.send_all(payload)
                await stream.send_eof()
                data = await read_to_eof(stream)
            except trio.BrokenResourceError:  # refused: closed (reset, as it had unread bytes) unanswered
                data = b""
        seen, _, echo = data.partition(b"\n")
        return echo, seen.decode()


def _packed(type_url: str, msg: Message) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=msg.SerializeToString())


async def echo_app(host: str = SERVER_IP, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """On `host` (the server pod's address): answers `<peer ip>\\n` and then echoes until EOF."""
    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(f"{stream.socket.getpeername()[0]}\n".encode())
            async for data in stream:
                await stream.send_all(data)
            await stream.send_eof()

    listeners = await trio.open_tcp_listeners(0, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(serve, listeners)


@pytest.fixture
def log() -> Iterator[LogCapture]:
    """The `access` logger's lines (debug and up), in upstream's plain format."""
    with capture_access_log() as capture:
        yield capture


def skip_if_server_hbone_port_taken() -> None:
    """The server pod's 15008 must be free on this host (its address is loopback: 127/8 is shared)."""
    probe = socket.socket()
    try:
        probe.bind((SERVER_IP, INBOUND_HBONE_PORT))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            pytest.skip(f"{SERVER_IP}:{INBOUND_HBONE_PORT} is in use on this host")
        raise
    finally:
        probe.close()


@asynccontextmanager
async def two_pods(ca: CertificateAuthority, *, client: WorkloadInfo = CLIENT_INFO,
                   server: WorkloadInfo = SERVER_INFO) -> AsyncIterator[Mesh2]:
    skip_if_server_hbone_port_taken()
    store = StateStore()
    sockets = PodSockets()
    certs = MeshCerts(ca)
    mesh = Mesh(store=store, certs=certs, contexts=TlsContextCache([ca.root_pem]), node=NODE, workload_wait=1)
    with pipe_fd() as client_fd, pipe_fd() as server_fd:
        sockets.ip_of.update({netns_id(client_fd): CLIENT_IP, netns_id(server_fd): SERVER_IP})
        async with trio.open_nursery() as nursery:
            app_port = await nursery.start(echo_app)
            handler = InPodWorkloadHandler(nursery, config=ProxyConfig(connect_timeout=5),
                                           telemetry=Telemetry(), sockets=sockets, peers=StatePeers(store),
                                           mesh=mesh)
            world = Mesh2(store, sockets, handler, app_port, certs)
            world.set_world()
            await handler.start_workload(PodUid("client-uid"), client, client_fd)
            await handler.start_workload(PodUid("web-uid"), server, server_fd)
            try:
                yield world
            finally:
                nursery.cancel_scope.cancel()


def lines(log: LogCapture, direction: str, message: str = "connection complete") -> list[ParsedLine]:
    return [p for p in log.parsed(message) if p.fields.get("direction") == direction]


async def test_service_vip_goes_through_hbone_and_both_sides_log_identities(
        ca: CertificateAuthority, log: LogCapture) -> None:
    payload = b"hello through the mesh " * 10_000
    with trio.fail_after(30):
        async with two_pods(ca) as world:
            echo, seen = await world.call((VIP, 80), payload)
            assert echo == payload
            assert seen == CLIENT_IP  # the app sees the client pod's address
            await log.wait_for("connection complete", count=2)
            dump = world.handler.dump()
            registry = world.handler.telemetry.metrics.registry
    for reporter in ("source", "destination"):
        assert sample_sum(registry, "istio_tcp_connections_closed_total",
                          {**MTLS_LABELS, "reporter": reporter}) == 1
        assert sample_sum(registry, "istio_tcp_sent_bytes_total", {**MTLS_LABELS, "reporter": reporter}) > 0
    [out] = lines(log, "outbound")
    [inb] = lines(log, "inbound")
    for line in (out, inb):
        assert line.level == "info" and in_field_order(line), line
        assert line.fields["src.identity"] == "spiffe://cluster.local/ns/mesh/sa/client"
        assert line.fields["dst.identity"] == "spiffe://cluster.local/ns/mesh/sa/web"
        assert line.fields["dst.addr"] == f"{SERVER_IP}:15008"
        assert line.fields["dst.hbone_addr"] == f"{SERVER_IP}:{world.app_port}"
        assert line.fields["dst.service"] == "web.mesh.svc.cluster.local"
        assert line.fields["src.workload"] == "client" and line.fields["dst.workload"] == "web"
        assert line.fields["bytes_sent"] == len(payload)
        assert line.fields["bytes_recv"] == len(payload) + len(f"{CLIENT_IP}\n")
    assert str(out.fields["src.addr"]).startswith(f"{CLIENT_IP}:")
    assert str(inb.fields["src.addr"]).startswith(f"{CLIENT_IP}:")
    [client_pod] = [p for p in dump if p["uid"] == "client-uid"]
    assert client_pod["identity"] == "spiffe://cluster.local/ns/mesh/sa/client"
    [key] = client_pod["pool"]
    assert key["dst"] == f"{SERVER_IP}:15008" and len(key["connections"]) == 1


async def test_pooled_connection_is_reused_and_closed_with_the_pod(ca: CertificateAuthority,
                                                                    log: LogCapture) -> None:
    with trio.fail_after(30):
        async with two_pods(ca) as world:
            for i in range(3):
                echo, _ = await world.call((SERVER_IP, world.app_port), f"call {i}".encode())
                assert echo == f"call {i}".encode()
            pod = world.handler.pods[PodUid("client-uid")]
            pool = pod.pool
            assert pool is not None and pool.connections_opened == 1
            await world.handler.stop_workload(PodUid("client-uid"))
            assert pod.pool is None
            assert SpiffeId.parse("spiffe://cluster.local/ns/mesh/sa/client") in world.certs.forgotten
    outbound = lines(log, "outbound")
    assert len(outbound) == 3 and all(line.fields["dst.addr"] == f"{SERVER_IP}:15008" for line in outbound)


@pytest.mark.parametrize("original", [(CLIENT_IP, 15001), (CLIENT_IP, 15008), (SERVER_IP, 15006),
                                      (CLIENT_IP, 15053)])
async def test_outbound_to_a_node_pods_ztunnel_port_is_refused_before_any_upstream(
        ca: CertificateAuthority, log: LogCapture, original: Addr) -> None:
    # The trigger of the self-call loop: the app dials its own pod IP's 15001 (or any pod of this node's
    # ztunnel ports). Resolved, it would tunnel to its own 15008 and back into 15001 without end.
    with trio.fail_after(30):
        async with two_pods(ca) as world:
            made = world.sockets.upstreams
            echo, seen = await world.call(original, b"again and again")
            assert (echo, seen) == (b"", "")
            [line] = await log.wait_for("connection failed")
            assert world.sockets.upstreams == made  # no HBONE connection, no plain socket
            pool = world.handler.pods[PodUid("client-uid")].pool
            assert pool is not None and pool.connections_opened == 0
            registry = world.handler.telemetry.metrics.registry
    assert line.fields["error"] == "attempted recursive call to ourselves"
    assert line.fields["direction"] == "outbound" and line.fields["dst.addr"] == "{}:{}".format(*original)
    assert sample_sum(registry, "istio_tcp_connections_failed_total", {"reporter": "source"}) == 1
    assert not log.parsed("connection complete")


@pytest.mark.parametrize("port", [15001, 15006, 15008, 15053])
async def test_connect_to_a_ztunnel_port_is_answered_400(ca: CertificateAuthority, log: LogCapture,
                                                         port: int) -> None:
    # From a pod of another node the loop would start with this CONNECT: the server must not connect.
    with trio.fail_after(30):
        async with two_pods(ca) as world:
            pool = world.handler.pods[PodUid("client-uid")].pool
            assert pool is not None
            key = PoolKey(src_identity=SpiffeId.parse("spiffe://cluster.local/ns/mesh/sa/client"),
                          dst_identities=frozenset({SpiffeId.parse("spiffe://cluster.local/ns/mesh/sa/web")}),
                          dst=(SERVER_IP, INBOUND_HBONE_PORT), src_ip=CLIENT_IP)
            made = world.sockets.upstreams
            with pytest.raises(HttpStatusError) as refused:
                await pool.connect(key, (SERVER_IP, port), forwarded_for=(CLIENT_IP, 40000))
            [line] = await log.wait_for("connection complete")
            assert world.sockets.upstreams == made + 1  # the HBONE connection only, nothing to the target
            registry = world.handler.telemetry.metrics.registry
    assert refused.value.status == 400
    assert line.fields["direction"] == "inbound" and line.fields["dst.hbone_addr"] == f"{SERVER_IP}:{port}"
    assert line.fields["error"] == "attempted recursive call to ourselves"
    assert sample_sum(registry, "istio_tcp_connections_failed_total", {"reporter": "destination"}) == 1


async def _download_app(ended: list[BaseException | None], done: trio.Event,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """On the server pod's address: sends 64 KiB chunks until its client goes away; `ended` gets how."""
    async def serve(stream: trio.SocketStream) -> None:
        try:
            while True:
                await stream.send_all(b"d" * 65536)
        except trio.BrokenResourceError as exc:
            ended.append(exc.__cause__)
            done.set()
        finally:
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host=SERVER_IP)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(serve, listeners)


async def test_a_tunnel_torn_down_mid_transfer_resets_the_apps_sockets(ca: CertificateAuthority,
                                                                       log: LogCapture) -> None:
    # The HBONE connection is lost during a download (the server's ztunnel killed, the path gone): the app
    # must see ECONNRESET, not an EOF that passes the truncated download off as complete.
    ended: list[BaseException | None] = []
    done = trio.Event()
    with trio.fail_after(30):
        async with two_pods(ca) as world, trio.open_nursery() as nursery:
            world.app_port = await nursery.start(_download_app, ended, done)
            world.set_world()
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            raw.bind((CLIENT_IP, 0))
            world.sockets.original[raw.getsockname()[1]] = (VIP, 80)
            app = trio.socket.from_stdlib_socket(raw)
            with app:
                await app.connect((CLIENT_IP, world.sockets.ports[CLIENT_IP]["outbound"]))
                received = 0
                while received < 1 << 20:
                    chunk = await app.recv(65536)
                    assert chunk, "EOF before the connection was torn down"
                    received += len(chunk)
                pool = world.handler.pods[PodUid("client-uid")].pool
                assert pool is not None
                [conn] = pool.connections()
                conn.tls.socket.shutdown(socket.SHUT_RDWR)  # both ztunnels see the connection end
                with pytest.raises(ConnectionResetError):
                    while await app.recv(65536):
                        pass
            [out, inb] = sorted(await log.wait_for("connection complete", count=2),
                                key=lambda line: str(line.fields["direction"]) != "outbound")
            await done.wait()
            nursery.cancel_scope.cancel()
    assert out.fields["direction"] == "outbound" and out.level == "error"
    assert inb.fields["direction"] == "inbound" and inb.level == "error"
    assert isinstance(ended[0], (ConnectionResetError, BrokenPipeError))  # the server app was reset too


async def test_a_clean_half_close_still_ends_in_a_fin(ca: CertificateAuthority, log: LogCapture) -> None:
    with trio.fail_after(30):
        async with two_pods(ca) as world:
            echo, _ = await world.call((VIP, 80), b"all of it")  # read to EOF: a FIN, no reset
            assert echo == b"all of it"
            [out, inb] = await log.wait_for("connection complete", count=2)
    assert out.level == inb.level == "info"


async def app_sees(world: Mesh2, original: Addr) -> str:
    """Connect as the client app to `original` and read without sending: "reset" (ECONNRESET), "eof" (a FIN)
    or "data". Nothing is sent, so a close of ours with unread bytes cannot turn a FIN into a RST."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.bind((CLIENT_IP, 0))
    world.sockets.original[raw.getsockname()[1]] = original
    app = trio.socket.from_stdlib_socket(raw)
    with app:
        await app.connect((CLIENT_IP, world.sockets.ports[CLIENT_IP]["outbound"]))
        try:
            data = await app.recv(1024)
        except ConnectionResetError:
            return "reset"
    return "data" if data else "eof"


async def _accept_and_close(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A peer on the server pod's 15008 that takes the TCP connection and closes it before TLS."""
    listener = trio.socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await listener.bind((SERVER_IP, INBOUND_HBONE_PORT))
    listener.listen(8)
    task_status.started()
    with listener:
        while True:
            conn, _ = await listener.accept()
            conn.close()


@pytest.mark.parametrize("peer", ["gone", "closes"])
async def test_a_tunnel_that_cannot_be_opened_resets_the_app(ca: CertificateAuthority, log: LogCapture,
                                                             peer: str) -> None:
    # The bench's kill -9 row: during the server-side ztunnel's outage the client's ztunnel still accepts
    # new connections, then the HBONE connect fails (refused, or the peer closes before TLS). The app's
    # connect had succeeded, so a FIN would read as the server's clean, empty answer: it must be a reset.
    with trio.fail_after(30):
        async with two_pods(ca) as world, trio.open_nursery() as nursery:
            await world.handler.stop_workload(PodUid("web-uid"))  # its 15008 is closed
            if peer == "closes":
                await nursery.start(_accept_and_close)
            assert await app_sees(world, (VIP, 80)) == "reset"
            [line] = await log.wait_for("connection complete")
            nursery.cancel_scope.cancel()
    assert line.fields["direction"] == "outbound" and line.level == "error"


async def test_a_passthrough_whose_destination_refuses_resets_the_app(ca: CertificateAuthority,
                                                                      log: LogCapture) -> None:
    closed = socket.socket()
    closed.bind((SERVER_IP, 0))  # bound, never listening: connects to it are refused
    with closed, trio.fail_after(30):
        async with two_pods(ca) as world:
            world.set_world(server_hbone=False)
            assert await app_sees(world, (SERVER_IP, closed.getsockname()[1])) == "reset"
            [line] = await log.wait_for("connection complete")
    assert "Connection refused" in str(line.fields["error"])


def deny(name: str, match: Match) -> Authorization:
    return Authorization(name=name, namespace="mesh", scope=Scope.WORKLOAD_SELECTOR, action=Action.DENY,
                         rules=(Rule(clauses=(Clause(matches=(match,)),)),))


async def test_deny_policy_answers_401_and_both_sides_say_why(ca: CertificateAuthority,
                                                              log: LogCapture) -> None:
    policy = deny("no-client", Match(principals=(StringMatch(kind="exact",
                                                             value="cluster.local/ns/mesh/sa/client"),)))
    with trio.fail_after(30):
        async with two_pods(ca) as world:
            world.set_world(policies=(policy,))
            echo, seen = await world.call((VIP, 80), b"let me in")
            assert (echo, seen) == (b"", "")  # the app's connection is closed without an answer
            await log.wait_for("connection complete", count=2)
            world.set_world()  # the policy is gone: the next connection gets through at once
            echo, _ = await world.call((VIP, 80), b"now?")
            assert echo == b"now?"
    [out, _] = lines(log, "outbound")
    [inb, _] = lines(log, "inbound")
    assert out.level == "error" and out.fields["error"] == "http status: 401 Unauthorized"
    assert inb.level == "error" and in_field_order(inb)
    assert inb.fields["error"] == ("connection closed due to policy rejection: explicitly denied by: "
                                   "mesh/no-client")
    assert inb.fields["src.identity"] == "spiffe://cluster.local/ns/mesh/sa/client"


async def test_plaintext_inbound_is_authorized_without_identity(ca: CertificateAuthority,
                                                                log: LogCapture) -> None:
    policy = deny("no-plain", Match(source_ips=(f"{CLIENT_IP}/32",)))
    with trio.fail_after(30):
        async with two_pods(ca) as world:
            world.set_world(policies=(policy,))
            port = world.sockets.ports[SERVER_IP]["inbound_plaintext"]
            sock = socket.socket()
            sock.bind((CLIENT_IP, 0))
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            await stream.socket.connect((SERVER_IP, port))
            async with stream:
                assert await read_to_eof(stream) == b""
            await log.wait_for("connection complete")
    [inb] = lines(log, "inbound")
    assert inb.level == "error" and "src.identity" not in inb.fields
    assert inb.fields["error"] == ("connection closed due to policy rejection: explicitly denied by: "
                                   "mesh/no-plain")


async def test_routes_without_hbone(ca: CertificateAuthority, log: LogCapture) -> None:
    with trio.fail_after(30):
        async with two_pods(ca) as world:
            # a workload outside the mesh: plain TCP to the endpoint (the VIP's port mapped)
            world.set_world(server_hbone=False)
            echo, seen = await world.call((VIP, 80), b"plain")
            assert (echo, seen) == (b"plain", CLIENT_IP)
            # a service without endpoints: refused, and said so
            world.set_world(endpoints=False)
            assert await world.call((VIP, 80), b"nowhere") == (b"", "")
            await log.wait_for("connection failed")
    [plain] = lines(log, "outbound")
    assert plain.fields["dst.addr"] == f"{SERVER_IP}:{world.app_port}"
    assert "dst.hbone_addr" not in plain.fields and "src.identity" not in plain.fields
    [failed] = lines(log, "outbound", "connection failed")
    assert failed.level == "warn"
    assert failed.fields["error"] == ("no healthy upstream for service mesh/web.mesh.svc.cluster.local "
                                      "(port 80)")


async def test_graceful_drain_sends_goaway_on_idle_inbound_connections(ca: CertificateAuthority,
                                                                       log: LogCapture) -> None:
    with trio.fail_after(30):
        async with two_pods(ca) as world:
            assert (await world.call((VIP, 80), b"before"))[0] == b"before"
            client_pool = world.handler.pods[PodUid("client-uid")].pool
            assert client_pool is not None
            [conn] = client_pool.connections()  # kept by the client's pool, idle
            server = world.handler.pods[PodUid("web-uid")]
            server.stop_accepting()  # graceful: the server pod ends once its connections do
            await server.done.wait()  # without a GOAWAY it would wait for the client pool's idle release
            await conn.wait_closed()
            assert not client_pool.connections()


# Pods whose names differ from their workload names (Deployment-owned), labelled as Kubernetes apps are.
NAMED_CLIENT = WorkloadInfo(name="client-5d4c3b", namespace="mesh", service_account="client")
NAMED_SERVER = WorkloadInfo(name="web-v1-7f8e9d", namespace="mesh", service_account="web")


def named_world(app_port: int, *, server_meshed: bool = True) -> World:
    """The two pods as the istiod stub's world: client `client-5d4c3b` of workload `client` labelled with
    the app.kubernetes.io labels, server `web-v1-7f8e9d` of workload `web-v1` labelled app=web, version=v1,
    behind Service web (VIP:80 -> the echo app's port)."""
    server_labels = {"app": "web", "version": "v1"}
    if not server_meshed:
        server_labels["istio.io/dataplane-mode"] = "none"
    doc = {
        "nodes": [{"name": NODE}],
        "namespaces": [{"name": "mesh", "labels": {"istio.io/dataplane-mode": "ambient"}}],
        "pods": [
            {"name": NAMED_CLIENT.name, "namespace": "mesh", "node": NODE, "ips": [CLIENT_IP],
             "workload": "client", "serviceAccount": "client",
             "labels": {"app.kubernetes.io/name": "client-app", "app.kubernetes.io/version": "2.1"}},
            {"name": NAMED_SERVER.name, "namespace": "mesh", "node": NODE, "ips": [SERVER_IP],
             "workload": "web-v1", "serviceAccount": "web", "labels": server_labels},
        ],
        "services": [{"name": "web", "namespace": "mesh", "vips": [VIP], "selector": {"app": "web"},
                      "ports": [{"port": 80, "targetPort": app_port}]}],
    }
    return load_world(json.dumps(doc).encode(), "named world")


def standard_labels(reporter: str) -> dict[str, str]:
    """Every label upstream puts on a TCP series of the named world's HBONE call."""
    return {
        "reporter": reporter,
        "source_workload": "client", "source_canonical_service": "client-app",
        "source_canonical_revision": "2.1", "source_workload_namespace": "mesh",
        "source_principal": "spiffe://cluster.local/ns/mesh/sa/client", "source_app": "client-app",
        "source_version": "2.1", "source_cluster": "Kubernetes",
        "destination_service": "web.mesh.svc.cluster.local", "destination_service_namespace": "mesh",
        "destination_service_name": "web", "destination_workload": "web-v1",
        "destination_canonical_service": "web", "destination_canonical_revision": "v1",
        "destination_workload_namespace": "mesh", "destination_principal": "spiffe://cluster.local/ns/mesh/sa/web",
        "destination_app": "web", "destination_version": "v1", "destination_cluster": "Kubernetes",
        "request_protocol": "tcp", "response_flags": "-", "connection_security_policy": "mutual_tls",
    }


def admin_of(world: Mesh2) -> Admin:
    """ztunnel's admin, stats and readiness handlers over these pods."""
    handler = world.handler
    return Admin(ZtunnelParts(config=ZtunnelConfig(), handler=handler, manager=WorkloadManager(handler),
                              telemetry=handler.telemetry, readiness=Readiness(), store=world.store))


async def serve_admin(world: Mesh2, nursery: trio.Nursery) -> tuple[str, int]:
    """The admin handler served on 127.0.0.1 until `nursery` ends; its address."""
    [listener] = await nursery.start(serve_http_tcp, admin_of(world).admin, 0, "127.0.0.1")
    host, port = listener.socket.getsockname()
    return host, port


async def scrape(world: Mesh2) -> str:
    """GET /metrics on the stats endpoint's handler over these pods' telemetry."""
    response = await admin_of(world).stats(Request(method="GET", target="/metrics"))
    assert response.status == 200
    return response.body.decode()


async def test_metrics_carry_every_standard_label_as_upstream(ca: CertificateAuthority,
                                                              log: LogCapture) -> None:
    with trio.fail_after(30):
        async with two_pods(ca, client=NAMED_CLIENT, server=NAMED_SERVER) as world:
            world.apply_world(named_world(world.app_port))
            echo, _ = await world.call((VIP, 80), b"labelled")
            assert echo == b"labelled"
            await log.wait_for("connection complete", count=2)
            text = await scrape(world)
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    for reporter in ("source", "destination"):
        [closed] = [x for x in samples if x.name == "istio_tcp_connections_closed_total"
                    and x.labels["reporter"] == reporter]
        assert closed.labels == standard_labels(reporter) and closed.value == 1
    assert "_created" not in text
    [build] = [x for x in samples if x.name == "istio_build"]
    assert build.labels["component"] == "ztunnel" and build.labels["tag"] and build.value == 1


async def test_every_path_logs_pod_names_and_labels_metrics_with_xds_workload_names(
        ca: CertificateAuthority, log: LogCapture) -> None:
    # As upstream ztunnel (seen side by side in the mixed lab): its access log's src/dst.workload is the
    # workload's own name, the pod; its metrics' source/destination_workload is the xDS workload name.
    names = {"src.workload": NAMED_CLIENT.name, "dst.workload": NAMED_SERVER.name}
    with trio.fail_after(30):
        async with two_pods(ca, client=NAMED_CLIENT, server=NAMED_SERVER) as world:
            world.apply_world(named_world(world.app_port))
            assert (await world.call((VIP, 80), b"hbone"))[0] == b"hbone"
            await log.wait_for("connection complete", count=2)
            # plaintext into the server pod's 15006, as redirected from the client pod's address
            sock = socket.socket()
            sock.bind((CLIENT_IP, 0))
            world.sockets.original[sock.getsockname()[1]] = (SERVER_IP, world.app_port)
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            await stream.socket.connect((SERVER_IP, world.sockets.ports[SERVER_IP]["inbound_plaintext"]))
            async with stream:
                await stream.send_all(b"plain")
                await stream.send_eof()
                assert (await read_to_eof(stream)).endswith(b"plain")
            await log.wait_for("connection complete", count=3)
            # the server outside the mesh: outbound passthrough to its endpoint
            world.apply_world(named_world(world.app_port, server_meshed=False))
            assert (await world.call((VIP, 80), b"passthrough"))[0] == b"passthrough"
            await log.wait_for("connection complete", count=4)
            labels = [sample.labels for family in text_string_to_metric_families(await scrape(world))
                      for sample in family.samples if sample.name == "istio_tcp_connections_closed_total"]
    hbone_out, hbone_in = lines(log, "outbound")[0], lines(log, "inbound")[0]
    [plain_in] = [line for line in lines(log, "inbound") if "dst.hbone_addr" not in line.fields]
    [passthrough] = [line for line in lines(log, "outbound") if "dst.hbone_addr" not in line.fields]
    for line in (hbone_out, hbone_in, plain_in, passthrough):
        assert {key: line.fields.get(key) for key in names} == names, line
        assert line.fields["dst.service"] == "web.mesh.svc.cluster.local", line
    assert "src.identity" not in plain_in.fields and "src.identity" not in passthrough.fields
    assert len(labels) == 4
    for series in labels:
        assert (series["source_workload"], series["destination_workload"]) == ("client", "web-v1"), series
        assert series["destination_canonical_service"] == "web" and series["destination_version"] == "v1"


class TraceReader:
    """A client of ztunnel's admin `/debug/connections`: the streamed JSON lines, one at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.buffer = b""
        self.status: int | None = None

    @classmethod
    async def open(cls, addr: tuple[str, int], query: str) -> TraceReader:
        reader = cls(await trio.open_tcp_stream(*addr))
        request = h11.Request(method="GET", target=f"/debug/connections?{query}", headers=[("host", "x")])
        await reader.stream.send_all(reader.conn.send(request) or b"")
        return reader

    async def next(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                self.status = event.status_code
            elif isinstance(event, h11.Data):
                self.buffer += event.data
            else:
                raise AssertionError(f"the trace ended: {event!r}")
        line, _, self.buffer = self.buffer.partition(b"\n")
        decoded: dict[str, Any] = json.loads(line)
        return decoded


async def test_live_trace_shows_each_connection_of_one_pod(ca: CertificateAuthority,
                                                           log: LogCapture) -> None:
    policy = deny("no-client", Match(principals=(StringMatch(kind="exact",
                                                             value="cluster.local/ns/mesh/sa/client"),)))
    with trio.fail_after(30):
        async with two_pods(ca) as world, trio.open_nursery() as nursery:
            addr = await serve_admin(world, nursery)
            client = await TraceReader.open(addr, "pod=mesh/client")
            server = await TraceReader.open(addr, "pod=web-uid")
            assert (await client.next()) == {"event": "tracing", "pod": "mesh/client",
                                             "running": [{"uid": "client-uid", "pod": "mesh/client"}]}
            assert (await server.next())["running"] == [{"uid": "web-uid", "pod": "mesh/web"}]
            assert client.status == 200
            assert (await world.call((VIP, 80), b"traced"))[0] == b"traced"
            out, inb = await client.next(), await server.next()
            world.set_world(policies=(policy,))
            assert (await world.call((VIP, 80), b"denied")) == (b"", "")
            denied_out, denied_in = await client.next(), await server.next()
            nursery.cancel_scope.cancel()
    target = f"{SERVER_IP}:{world.app_port}"
    assert out["listener"] == "outbound (15001)" and out["pod"] == "mesh/client"
    assert (out["original_dst"], out["route"]) == (f"{VIP}:80", f"HBONE to the ztunnel at {SERVER_IP}:15008")
    assert (out["hbone_target"], out["dst_service"], out["dst_workload"]) == (
        target, "web.mesh.svc.cluster.local", "web")
    assert out["policy"] is None and out["status"] == 200 and out["error"] is None
    assert out["bytes_sent"] == len(b"traced") and out["duration_ms"] >= 0
    assert (inb["listener"], inb["pod"], inb["uid"]) == ("inbound HBONE (15008)", "mesh/web", "web-uid")
    assert (inb["original_dst"], inb["src_identity"]) == (target, "spiffe://cluster.local/ns/mesh/sa/client")
    assert inb["policy"] == "allow (no policy applies)" and inb["route"] == "delivered to the app"
    assert denied_out["status"] == 401 and denied_out["error"] == "http status: 401 Unauthorized"
    assert denied_in["policy"] == "deny: explicitly denied by: mesh/no-client"
    assert denied_in["error"] == ("connection closed due to policy rejection: explicitly denied by: "
                                  "mesh/no-client")


async def test_ambient_trace_prints_each_connection_of_the_pod(ca: CertificateAuthority, log: LogCapture,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from ambient.cli import main

    with trio.fail_after(30):
        async with two_pods(ca) as world, trio.open_nursery() as nursery:
            host, port = await serve_admin(world, nursery)
            argv = ["trace", "web", "--admin", f"{host}:{port}", "--count", "2"]
            exits: list[object] = []

            def trace() -> None:
                with pytest.raises(SystemExit) as exited:
                    main(argv)
                exits.append(exited.value.code)

            nursery.start_soon(trio.to_thread.run_sync, trace)
            while not world.handler.telemetry.trace.subscribers:
                await trio.sleep(0.01)
            assert (await world.call((VIP, 80), b"one"))[0] == b"one"
            assert (await world.call((SERVER_IP, world.app_port), b"two"))[0] == b"two"
            while not exits:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert exits == [0]
    head, first, second = capsys.readouterr().out.splitlines()
    assert head == f"tracing mesh/web (uid web-uid) on ztunnel admin {host}:{port}; Ctrl-C stops"
    target = f"{SERVER_IP}:{world.app_port}"
    for line in (first, second):  # the server pod's view: both calls arrive at its 15008
        assert f" inbound HBONE (15008) {CLIENT_IP}:" in line, line
        assert (f" -> {target} (web.mesh.svc.cluster.local) | delivered to the app workload web from "
                "spiffe://cluster.local/ns/mesh/sa/client | policy: allow (no policy applies) | 200 | sent "
                "3 B, received 14 B, ") in line, line
