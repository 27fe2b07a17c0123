"""The ztunnel process: config, start-up checks, one root nursery, signal handling (the endpoints: admin.py).

Theory of operation
-------------------
    certificate manager    (XDS_ADDRESS set) workload certificates from the CA (CA_ADDRESS), per identity
    servers nursery        admin 127.0.0.1:15000, stats :15020, readiness :15021 (h11 on Trio);
                           the xDS client (XDS_ADDRESS set) filling the StateStore
      pods nursery         one child per pod (InPodWorkloadHandler -> run_pod_proxies, each with its pool)
        ZDS client         run_zds_client(INPOD_UDS, WorkloadManager(handler)) under its own cancel scope

The parts are made in dependency order (store, handler, state manager, admin) and nothing calls back up:
the state manager writes ZTUNNEL_ZDS_STATE_FILE itself and readiness polls it.

With XDS_ADDRESS the pods share one `Mesh` (the store, the certificate manager, one TLS context cache):
outbound connections are resolved from xDS and tunnelled with HBONE where the destination speaks it, and
15008 serves HBONE. Without it every connection is plain passthrough and 15008 closes what it accepts.

Readiness (`/healthz/ready`) is the conjunction of named checks: the ZDS manager's `ready` (connected,
snapshot applied, nothing pending), plus "xDS synced" when XDS_ADDRESS is set. SIGTERM/SIGINT: stop the ZDS
client (no new pods), every pod stops accepting, open connections get the drain deadline to finish, then
everything is closed.

Memory: the process (`main`) also returns free heap pages to the kernel every few seconds (host.py);
/metrics imports prometheus_client only when first scraped. The endpoints' routes are in admin.py.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from functools import partial

import trio

from services.ztunnel.admin import Admin, Readiness, ZtunnelParts
from services.ztunnel.config import ZtunnelConfig, check_listen_addresses, load_config
from services.ztunnel.errors import ConfigError, StartupCheckError
from services.ztunnel.host import trim_malloc_periodically, use_libc_malloc, verify_syscalls
from services.ztunnel.inpod.handler import InPodWorkloadHandler
from services.ztunnel.inpod.statemanager import WorkloadManager
from services.ztunnel.inpod.zds_client import run_zds_client
from services.ztunnel.peers import StatePeers
from services.ztunnel.proxy.context import Mesh, SocketFactory
from services.ztunnel.state.store import StateStore
from services.ztunnel.telemetry.access_log import Telemetry
from services.ztunnel.telemetry.metrics import Metrics
from shared.addr import format_host_port
from shared.errors import run_process
from shared.httpd import bound_addresses, serve_http_tcp
from shared.limits import raise_open_files_limit
from shared.logs import setup_logging
from shared.signals import set_on_stop_signal
from shared.version import version_text

log = logging.getLogger("ztunnel.app")


async def run_ztunnel(config: ZtunnelConfig, *, shutdown: trio.Event | None = None,
                      sockets: SocketFactory | None = None,
                      task_status: trio.TaskStatus[ZtunnelParts] = trio.TASK_STATUS_IGNORED) -> None:
    """Run until `shutdown` is set (never, if None and not cancelled), then drain and return.

    Args:
        sockets: the in-pod socket factory (tests pass a loopback fake); default the real one.
    """
    shutdown = shutdown if shutdown is not None else trio.Event()
    telemetry = Telemetry(Metrics())
    readiness = Readiness()
    store = StateStore()
    async with contextlib.AsyncExitStack() as stack:
        mesh: Mesh | None = None
        if config.xds_target is not None:
            # Only with a control plane: grpclib, trio-asyncio and asyncio (~4 MiB resident), the CA client.
            from services.ztunnel.hbone.tls import TlsContextCache
            from services.ztunnel.identity.ca_client import GrpcCaClient
            from services.ztunnel.identity.manager import open_certificate_manager
            from shared.aio import open_aio_loop

            await stack.enter_async_context(open_aio_loop())  # grpclib runs on asyncio via trio-asyncio
            ca = GrpcCaClient(config.ca_target or config.xds_target)  # upstream: the CA is istiod by default
            certs = await stack.enter_async_context(open_certificate_manager(ca))
            mesh = Mesh(store=store, certs=certs, contexts=TlsContextCache(), node=config.node_name)
        await _serve(config, shutdown, sockets, telemetry, readiness, store, mesh, task_status)
    log.info("ztunnel stopped")


async def _serve(config: ZtunnelConfig, shutdown: trio.Event, sockets: SocketFactory | None,
                 telemetry: Telemetry, readiness: Readiness, store: StateStore, mesh: Mesh | None,
                 task_status: trio.TaskStatus[ZtunnelParts]) -> None:
    async with trio.open_nursery() as servers:
        async with trio.open_nursery() as pods:
            handler = InPodWorkloadHandler(pods, config=config.proxy, telemetry=telemetry, sockets=sockets,
                                           peers=StatePeers(store), mesh=mesh)
            manager = WorkloadManager(handler, state_file=config.zds_state_file or None)
            readiness.add("inpod snapshot from the node agent", lambda: manager.ready)
            parts = ZtunnelParts(config=config, handler=handler, manager=manager, telemetry=telemetry,
                                 readiness=readiness, store=store, mesh=mesh)

            # --- xDS client (only when XDS_ADDRESS is set): workloads/services/policies into `store` -----
            if config.xds_target is not None:
                from services.ztunnel.xds.client import XdsClient, XdsClientConfig

                xds = XdsClient(config.xds_target, store, XdsClientConfig.for_ztunnel(config))
                parts.xds = xds
                readiness.add("xDS sync with the control plane", xds.is_synced)
                await servers.start(xds.run)
            admin = Admin(parts)
            for name, endpoint, (host, port) in (("admin", admin.admin, config.admin_addr),
                                                 ("stats", admin.stats, config.stats_addr),
                                                 ("readiness", admin.ready, config.readiness_addr)):
                listeners = await servers.start(partial(serve_http_tcp, endpoint, port, host,
                                                        server="ztunnel"))
                parts.addresses[name] = bound_addresses(listeners)

            # --- ZDS client: the node agent hands us pods over INPOD_UDS --------------------------------
            zds_scope = trio.CancelScope()

            async def zds_client() -> None:
                with zds_scope:
                    await run_zds_client(config.inpod_uds, manager)

            pods.start_soon(zds_client)
            # -------------------------------------------------------------------------------------------
            log.info("ztunnel started", extra={"fields": [
                ("inpod_uds", config.inpod_uds), ("node", config.node_name or None),
                ("admin", format_host_port(*config.admin_addr))]})
            task_status.started(parts)

            await shutdown.wait()
            log.info("shutting down: draining pods",
                     extra={"fields": [("deadline", f"{config.drain_deadline}s")]})
            zds_scope.cancel()
            await handler.drain_all(grace=config.drain_deadline)
            pods.cancel_scope.cancel()
        servers.cancel_scope.cancel()


async def _main(config: ZtunnelConfig) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_on_stop_signal, shutdown, log)
        nursery.start_soon(trim_malloc_periodically)
        await run_ztunnel(config, shutdown=shutdown)
        nursery.cancel_scope.cancel()


ENV_HELP = """settings (environment variables, named as upstream ztunnel's):
  INPOD_UDS                  ZDS socket of the node agent (default /var/run/ztunnel/ztunnel.sock)
  NODE_NAME, POD_NAME, POD_NAMESPACE, INSTANCE_IP, CLUSTER_ID
  XDS_ADDRESS, XDS_ROOT_CERT, XDS_TOKEN_FILE, XDS_HEADER_*   control plane (xDS); unset: passthrough only
  CA_ADDRESS, CA_ROOT_CERT, CA_TOKEN_FILE, CA_HEADER_*        certificate authority (default: the xDS ones)
  XDS_ROOT_CA, CA_ROOT_CA, AUTH_TOKEN                       upstream's names for the same files (aliases)
  LOG_FORMAT=plain|json, RUST_LOG=info|debug|... (LOG_LEVEL when RUST_LOG is unset)
  IPV6_ENABLED, ENABLE_ORIG_SRC, CONNECT_TIMEOUT
  CONNECTION_TERMINATION_DEADLINE (else TERMINATION_GRACE_PERIOD_SECONDS - 5s, else 5s): drain on SIGTERM
  ZTUNNEL_SPLICE             copy bytes with splice(2) where it can (default true)
  ISTIO_META_DNS_CAPTURE     serve the DNS proxy on 15053 in every pod (default true)
  DNS_RESOLV_CONF            where forwarded DNS queries go (default /etc/resolv.conf: its nameservers)
  DNS_FORWARD_TIMEOUT (5s), DNS_MAX_INFLIGHT (64)   per forwarded query; forwards in flight per pod
  ZTUNNEL_MAX_CONNECTIONS    TCP connections held for all pods at once; more are refused (default 0: the
                             open-files limit less a tenth; an accepted connection counts one, a connection
                             ztunnel opens to an app or passthrough destination one more)
  ZTUNNEL_MAX_CONNECTIONS_PER_POD   the same for one pod (default 0: three quarters of the process cap)
  ADMIN_ADDR (127.0.0.1:15000), STATS_ADDR (:15020), READINESS_ADDR (:15021); checked at start
  ZTUNNEL_ZDS_STATE_FILE     write the in-pod state as JSON after every change (conformance kit)
Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to enter pod namespaces."""


def main(argv: list[str] | None = None) -> int:
    """Console script `ztunnel`; settings come from the environment (INPOD_UDS, NODE_NAME, LOG_FORMAT...).

    Run as the process (`argv` None), it first re-executes itself with PYTHONMALLOC=malloc unless that is
    set (host.py says why); called with `argv` (tests), it never does."""
    if argv is None:
        use_libc_malloc()
    args = sys.argv[1:] if argv is None else argv
    if args:  # only --help (or a mistake) needs the parser: argparse costs ~0.3 MiB resident for nothing
        import argparse

        parser = argparse.ArgumentParser(
            prog="ztunnel",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description="The node's ztunnel: per-pod listeners inside each pod's netns, HBONE, L4 policy.",
            epilog=ENV_HELP,
        )
        parser.add_argument("--version", action="version", version=version_text("ztunnel"))
        parser.parse_args(args)
    try:
        config = load_config()
        check_listen_addresses(config)
    except ConfigError as exc:
        print(f"ztunnel: {exc}", file=sys.stderr)
        return 2
    setup_logging(json_format=config.log_format == "json", level=config.log_level)
    raise_open_files_limit("ztunnel")
    try:
        verify_syscalls(config.proxy.packet_mark)
    except StartupCheckError as exc:
        log.error("start-up check failed", extra={"fields": [("error", str(exc))]})
        print(f"ztunnel: {exc}", file=sys.stderr)
        return 1
    return run_process("ztunnel", _main, config)


if __name__ == "__main__":
    sys.exit(main())
