"""The waypoint process: one per waypoint pod, inside that pod's netns (the pod itself is not captured).

Theory of operation
-------------------
    certificate manager   the waypoint's own SPIFFE identity (TRUST_DOMAIN, POD_NAMESPACE, SERVICE_ACCOUNT)
                          from the CA, like any workload's, renewed at half-life
    xDS client            Address and Authorization into a StateStore, WaypointConfig (its L7 policies and
                          routes, docs/waypoint.md) into WaypointConfigs; node id router~IP~POD.NS~...
    HBONE pool            the waypoint's connections to the endpoints' 15008
    servers nursery       15008 (HBONE, `serve_hbone_tunnels` -> WaypointProxy.handle),
                          :15020 /metrics, :15021 /healthz/ready (synced with xDS)

Settings are ztunnel's where the meaning is the same (XDS_ADDRESS, CA_ADDRESS, their ROOT_CERT and
TOKEN_FILE, INSTANCE_IP, POD_NAME, POD_NAMESPACE, CLUSTER_ID, STATS_ADDR, READINESS_ADDR, LOG_FORMAT,
RUST_LOG, CONNECT_TIMEOUT), plus SERVICE_ACCOUNT and TRUST_DOMAIN (the identity, as Istio's pilot-agent
takes them) and WAYPOINT_HBONE_ADDR (default every address, port 15008). SIGTERM/SIGINT: accept no
more, GOAWAY each connection once it carries no tunnel, then stop after CONNECTION_TERMINATION_DEADLINE
(ztunnel's setting, default 5 s) at the latest.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import random
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping

import msgspec
import trio

from services.waypoint.config import EMPTY_CONFIG, WaypointConfig
from services.waypoint.convert import WAYPOINT_CONFIG_TYPE_URL, WaypointConfigs
from services.waypoint.errors import WaypointConfigError
from services.waypoint.http import HttpProxy
from services.waypoint.proxy import WaypointProxy
from services.waypoint.telemetry import WaypointTelemetry
from services.waypoint.upstream import Upstreams
from services.ztunnel.config import ZtunnelConfig, load_config
from services.ztunnel.errors import ConfigError
from services.ztunnel.hbone.connection import HboneConnection
from services.ztunnel.hbone.pool import CertSource, open_hbone_pool
from services.ztunnel.hbone.server import serve_hbone_tunnels
from services.ztunnel.hbone.tls import TlsContextCache
from services.ztunnel.net import INBOUND_HBONE_PORT, accept_forever
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import Workload
from shared.addr import format_host_port
from shared.errors import run_process
from shared.httpd import Request, Response, bound_addresses, serve_http_tcp
from shared.identity import SpiffeId
from shared.logs import setup_logging
from shared.settings import EnvSettings
from shared.signals import set_on_stop_signal
from shared.version import version_text

log = logging.getLogger("waypoint.app")


class WaypointSettings(msgspec.Struct, frozen=True, kw_only=True):
    base: ZtunnelConfig
    """The settings a waypoint shares with ztunnel (control plane, CA, pod, logs, stats)."""
    identity: SpiffeId
    hbone_addr: tuple[str | None, int] = (None, INBOUND_HBONE_PORT)


def load_settings(env: Mapping[str, str] | None = None) -> WaypointSettings:
    """Raises WaypointConfigError naming the variable."""
    env = os.environ if env is None else env
    try:
        base = load_config(env)
        hbone_addr = EnvSettings(env, error=ConfigError).host_port("WAYPOINT_HBONE_ADDR",
                                                                   (None, INBOUND_HBONE_PORT))
    except ConfigError as exc:
        raise WaypointConfigError(str(exc)) from None
    if base.xds_target is None:
        raise WaypointConfigError("XDS_ADDRESS is not set: a waypoint needs the control plane for its "
                                  "services, endpoints and policies")
    namespace = env.get("POD_NAMESPACE", "")
    if not namespace:
        raise WaypointConfigError("POD_NAMESPACE is not set: it names the waypoint's identity "
                                  "(spiffe://TRUST_DOMAIN/ns/POD_NAMESPACE/sa/SERVICE_ACCOUNT)")
    if not base.instance_ip:
        raise WaypointConfigError("INSTANCE_IP is not set: the waypoint finds its own workload in xDS by it")
    identity = SpiffeId(trust_domain=env.get("TRUST_DOMAIN", "cluster.local"), namespace=namespace,
                        service_account=env.get("SERVICE_ACCOUNT", "waypoint"))
    return WaypointSettings(base=base, identity=identity, hbone_addr=hbone_addr)


@contextlib.asynccontextmanager
async def open_waypoint(*, store: StateStore, certs: CertSource, contexts: TlsContextCache,
                        identity: SpiffeId, config: Callable[[], WaypointConfig] = lambda: EMPTY_CONFIG,
                        telemetry: WaypointTelemetry | None = None, me: Workload | None = None,
                        instance_ip: str = "", cluster: str | None = None, rng: random.Random | None = None,
                        connect_timeout: float = 10.0) -> AsyncIterator[WaypointProxy]:
    """The waypoint's proxy with its HBONE pool, for `serve_waypoint` (the pool closes on exit)."""
    telemetry = telemetry if telemetry is not None else WaypointTelemetry()
    async with open_hbone_pool(certs=certs, contexts=contexts, connect_timeout=connect_timeout) as pool:
        upstreams = Upstreams(store, pool, identity, rng=rng, connect_timeout=connect_timeout)
        http = HttpProxy(config=config, upstreams=upstreams, telemetry=telemetry, cluster=cluster)
        yield WaypointProxy(store=store, me=me, identity=identity, http=http, upstreams=upstreams,
                            telemetry=telemetry, cluster=cluster, instance_ip=instance_ip)


async def serve_waypoint(listener: socket.socket, proxy: WaypointProxy, *, certs: CertSource,
                         contexts: TlsContextCache, draining: trio.Event | None = None,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept HBONE on the non-blocking `listener`, one task per connection, until cancelled, or until
    `draining` is set: then accept no more, close each connection (GOAWAY) once it carries no tunnel, and
    return when all have ended."""
    async with trio.open_nursery() as nursery:
        def spawn(sock: socket.socket, peer: tuple[str, int]) -> None:
            nursery.start_soon(functools.partial(serve_hbone_tunnels, sock, peer, identity=proxy.identity,
                                                 certs=certs, contexts=contexts, policy=proxy,
                                                 handler=proxy.handle))

        def capacity_error(exc: OSError) -> None:
            log.warning("accept failed: out of resources; retrying", extra={"fields": [("error", str(exc))]})

        task_status.started()
        async with trio.open_nursery() as acceptor:
            acceptor.start_soon(functools.partial(accept_forever, listener, spawn,
                                                  on_capacity_error=capacity_error))
            draining = draining if draining is not None else trio.Event()  # None: never
            await draining.wait()
            acceptor.cancel_scope.cancel()
        for conn in list(proxy.connections):
            nursery.start_soon(_close_when_idle, conn)


async def _close_when_idle(conn: HboneConnection) -> None:
    """GOAWAY once the connection carries no tunnel: a client's pool keeps an idle one for minutes."""
    while conn.active_streams and not conn.dead:
        await conn.wait_activity()
    conn.close()


def hbone_listener(addr: tuple[str | None, int]) -> socket.socket:
    """The listening socket for `addr`; no host: every address, v6 and v4 (v4 alone where the netns has no
    IPv6)."""
    host, port = addr
    if host is None:
        try:
            return _listen(socket.AF_INET6, "::", port)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            return _listen(socket.AF_INET, "0.0.0.0", port)
    return _listen(socket.AF_INET6 if ":" in host else socket.AF_INET, host, port)


def _listen(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def run_waypoint(settings: WaypointSettings, *, shutdown: trio.Event | None = None,
                       task_status: trio.TaskStatus[dict[str, list[tuple[str, int]]]] =
                       trio.TASK_STATUS_IGNORED) -> None:
    """Run until `shutdown` is set (or cancelled); started() with the bound addresses by name."""
    from prometheus_client import generate_latest

    from services.ztunnel.identity.ca_client import GrpcCaClient
    from services.ztunnel.identity.manager import open_certificate_manager
    from services.ztunnel.xds.client import XdsClient, XdsClientConfig
    from services.ztunnel.xds.convert import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
    from shared.aio import open_aio_loop

    base = settings.base
    assert base.xds_target is not None
    shutdown = shutdown if shutdown is not None else trio.Event()
    store = StateStore()
    telemetry = WaypointTelemetry()
    contexts = TlsContextCache()
    ip = base.instance_ip
    node_id = f"router~{ip}~{base.pod_name}.{base.pod_namespace}~{base.pod_namespace}.svc.cluster.local"
    configs = WaypointConfigs()
    xds = XdsClient(base.xds_target, store, XdsClientConfig(
        node_id=node_id, node_metadata={"NAME": base.pod_name, "NAMESPACE": base.pod_namespace,
                                        "INSTANCE_IPS": ip, "NODE_NAME": base.node_name},
        type_urls=(ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, WAYPOINT_CONFIG_TYPE_URL)),
        sinks={WAYPOINT_CONFIG_TYPE_URL: configs})

    async def stats(request: Request) -> Response:
        if request.path in ("/metrics", "/stats/prometheus"):
            return Response(body=generate_latest(telemetry.metrics.registry),
                            content_type="text/plain; version=0.0.4; charset=utf-8")
        return Response(status=404, body=b"not found; try /metrics or /stats/prometheus\n")

    async def ready(request: Request) -> Response:
        if request.path != "/healthz/ready":
            return Response(status=404, body=b"not found; try /healthz/ready\n")
        if not xds.is_synced():
            return Response(status=503, body=b"not ready: xDS not synced with the control plane\n")
        if store.workload_by_ip(ip) is None:
            return Response(status=503, body=f"not ready: no workload at {ip} in xDS\n".encode())
        return Response(body=b"ready\n")

    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(open_aio_loop())
        ca = GrpcCaClient(base.ca_target or base.xds_target)
        certs = await stack.enter_async_context(open_certificate_manager(ca))
        proxy = await stack.enter_async_context(open_waypoint(
            store=store, certs=certs, contexts=contexts, identity=settings.identity, telemetry=telemetry,
            config=configs.current,
            instance_ip=ip, cluster=base.cluster_id, connect_timeout=base.proxy.connect_timeout))
        listener = stack.enter_context(hbone_listener(settings.hbone_addr))
        async with trio.open_nursery() as servers:
            await servers.start(xds.run)
            addresses: dict[str, list[tuple[str, int]]] = {}
            for name, endpoint, (host, port) in (("stats", stats, base.stats_addr),
                                                 ("readiness", ready, base.readiness_addr)):
                listeners = await servers.start(functools.partial(serve_http_tcp, endpoint, port, host,
                                                                  server="waypoint"))
                addresses[name] = bound_addresses(listeners)
            draining, drained = trio.Event(), trio.Event()

            async def hbone(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                await serve_waypoint(listener, proxy, certs=certs, contexts=contexts, draining=draining,
                                     task_status=task_status)
                drained.set()

            await servers.start(hbone)
            name = listener.getsockname()
            addresses["hbone"] = [(str(name[0]), int(name[1]))]
            log.info("waypoint started", extra={"fields": [
                ("identity", settings.identity.uri), ("hbone", format_host_port(*addresses["hbone"][0])),
                ("instance_ip", ip)]})
            task_status.started(addresses)
            await shutdown.wait()
            log.info("shutting down: draining tunnels",
                     extra={"fields": [("deadline", f"{base.drain_deadline}s")]})
            draining.set()
            with trio.move_on_after(base.drain_deadline):
                await drained.wait()
            servers.cancel_scope.cancel()
    log.info("waypoint stopped")


async def _main(settings: WaypointSettings) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_on_stop_signal, shutdown, log)
        await run_waypoint(settings, shutdown=shutdown)
        nursery.cancel_scope.cancel()


ENV_HELP = """settings (environment variables):
  XDS_ADDRESS, XDS_ROOT_CERT, XDS_TOKEN_FILE   the control plane (required)
  CA_ADDRESS, CA_ROOT_CERT, CA_TOKEN_FILE      the CA (default: the xDS ones)
  INSTANCE_IP (required), POD_NAME, POD_NAMESPACE (required), NODE_NAME, CLUSTER_ID
  SERVICE_ACCOUNT (default waypoint), TRUST_DOMAIN (default cluster.local): the waypoint's identity
  WAYPOINT_HBONE_ADDR (:15008), STATS_ADDR (:15020), READINESS_ADDR (:15021)
  CONNECT_TIMEOUT (10s), LOG_FORMAT=plain|json, RUST_LOG=info|debug|..."""


def main(argv: list[str] | None = None) -> int:
    """Console script `waypoint`; settings come from the environment."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        import argparse

        parser = argparse.ArgumentParser(
            prog="waypoint", formatter_class=argparse.RawDescriptionHelpFormatter,
            description="A waypoint: the L7 proxy of a namespace or service, reached over HBONE.",
            epilog=ENV_HELP)
        parser.add_argument("--version", action="version", version=version_text("waypoint"))
        parser.parse_args(args)
    try:
        settings = load_settings()
    except WaypointConfigError as exc:
        print(f"waypoint: {exc}", file=sys.stderr)
        return 2
    setup_logging(json_format=settings.base.log_format == "json", level=settings.base.log_level)
    return run_process("waypoint", _main, settings)


if __name__ == "__main__":
    sys.exit(main())
