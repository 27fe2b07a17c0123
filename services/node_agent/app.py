"""The `node-agent` process: config, start-up checks, one root nursery, signal handling.

Theory of operation
-------------------
    root nursery
      ZDS server          ZdsServer(--ztunnel-uds-address, snapshot=the netns cache): ztunnel connects here
      lifecycle           NodeAgent.run: retries pending pods with backoff
      CNI-event socket    POST /cmdadd on --cni-socket (h11), the `ambient-cni` plugin's target
      health              GET /healthz, /readyz on --health-addr
      pod source          the control plane's pod watch, when one is configured and available
      status writer       the pods' `ambient.istio.io/redirection` annotation, through the same control plane
                          (pod_status.py); without a control plane the status is only logged

Before the ZDS server accepts anything, pods the pod source reports as `enabled` (enrolled by an earlier
run) are put back in the netns cache and their rules reconciled, so a reconnecting ztunnel gets them in
its snapshot. On SIGTERM/SIGINT everything is cancelled and the rules of every
enrolled pod are left in place on purpose: their traffic keeps failing closed until an agent and a
ztunnel take them again.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import trio

from services.node_agent.apply import Backend, NetnsRuleApplier, RuleApplier, find_binary
from services.node_agent.cache import NetnsCache
from services.node_agent.cni_server import DEFAULT_CNI_SOCKET, CniEndpoint
from services.node_agent.errors import ConfigError, StartupCheckError
from services.node_agent.kube.status import KubeStatusReporter
from services.node_agent.lifecycle import (
    LogStatusReporter,
    NodeAgent,
    PathNetnsOpener,
    PodSource,
    StatusReporter,
)
from services.node_agent.model import STATUS_ENABLED, STATUS_PENDING
from services.node_agent.pod_status import ControlPlaneStatusReporter
from services.node_agent.rules import RuleSettings
from services.node_agent.zds_server import DEFAULT_SOCKET_PATH, ZdsServer
from shared.addr import AddressError, split_host_port
from shared.errors import AmbientError, start_failure
from shared.httpd import Request, Response, json_response, open_unix_listener, serve_http
from shared.limits import raise_open_files_limit
from shared.logs import LOG_FORMATS, Display, log_format_from, setup_logging
from shared.rundir import SocketFile, bound_socket_file, make_parents, remove_made, remove_own_socket
from shared.settings import EnvSettings, check_listen
from shared.version import version_text

log = logging.getLogger("node_agent.app")

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
DEFAULT_HEALTH_ADDR = "127.0.0.1:8000"
POD_SOURCE_CONTROL_PLANE = "control-plane"
POD_SOURCE_KUBERNETES = "kubernetes"
POD_SOURCES = (POD_SOURCE_CONTROL_PLANE, POD_SOURCE_KUBERNETES)


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True):
    node_name: str
    control_plane: str | None = None
    pod_source: str = POD_SOURCE_CONTROL_PLANE
    """Where pods come from: the control plane's pod watch, or the Kubernetes API (kube/)."""
    kubeconfig: str | None = None
    """The kubeconfig for pod source `kubernetes`; None: in-cluster, then $KUBECONFIG, ~/.kube/config."""
    zds_socket: str = DEFAULT_SOCKET_PATH
    cni_socket: str = DEFAULT_CNI_SOCKET
    backend: Backend = Backend.IPTABLES
    dns_capture: bool = True
    ipv6: bool = False
    health_addr: str | None = DEFAULT_HEALTH_ADDR
    host_prefix: str = ""
    zds_allowed_uids: frozenset[int] | None = None
    reconcile_on_start: bool = True
    watch_sync_timeout: float = 30.0
    log_level: str = "info"
    log_format: str = "plain"
    warnings: tuple[str, ...] = ()
    """Deprecated settings in use, logged once logging is set up."""

    @property
    def rule_settings(self) -> RuleSettings:
        return RuleSettings(dns_capture=self.dns_capture, ipv6=self.ipv6)


ENV_HELP = f"""settings (environment variables; a flag wins over its variable):
  NODE_NAME                  this node's name (required; or --node-name)
  CONTROL_PLANE_ADDRESS      istiod [https://]HOST:PORT (http:// for plaintext); unset: CNI events only
  CONTROL_PLANE_ROOT_CERT    CA certificate istiod is verified with
                             (default ./var/run/secrets/istio/root-cert.pem)
  CONTROL_PLANE_TOKEN_FILE   bearer token file (default ./var/run/secrets/tokens/istio-token; missing: none)
  CONTROL_PLANE_HEADER_<N>   extra request metadata <n> (underscores become dashes)
  POD_SOURCE                 control-plane (the pod watch, default) or kubernetes (list+watch the API
                             server's pods of this node and namespaces, annotate pods there, as istio-cni)
  KUBECONFIG                 kubeconfig for POD_SOURCE=kubernetes (unset: the in-cluster service account)
  ZTUNNEL_UDS_ADDRESS        ZDS socket path, upstream istio-cni's name (default {DEFAULT_SOCKET_PATH});
                             ZDS_SOCKET is still read, with a warning, when ZTUNNEL_UDS_ADDRESS is unset
  CNI_SOCKET                 CNI-event socket path (default {DEFAULT_CNI_SOCKET})
  RULE_BACKEND               iptables or nftables (default iptables)
  DNS_CAPTURE, IPV6          true/false (default false)
  HEALTH_ADDR                HOST:PORT of /healthz and /readyz (default {DEFAULT_HEALTH_ADDR}; empty: off)
  HOST_PREFIX                prefix for netns paths (default none)
  LOG_LEVEL                  debug, info, warning or error (default info)
Missing parent directories of the two sockets are created at start and removed again at exit.
Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and the iptables or nft binaries."""


def zds_socket_setting(flag: str | None, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """The ZDS socket path and any deprecation warnings: --ztunnel-uds-address/--zds-socket, then
    ZTUNNEL_UDS_ADDRESS (upstream istio-cni's name), then the old ZDS_SOCKET, then the default."""
    old = env.get("ZDS_SOCKET") or None
    new = env.get("ZTUNNEL_UDS_ADDRESS") or None
    warnings: list[str] = []
    if old is not None and new is None and flag is None:
        warnings.append(f"ZDS_SOCKET is deprecated; set ZTUNNEL_UDS_ADDRESS={old} instead")
    elif old is not None and old != (flag or new):
        warnings.append(f"ZDS_SOCKET={old} ignored: the socket is {flag or new} (ZDS_SOCKET is deprecated)")
    return flag or new or old or DEFAULT_SOCKET_PATH, warnings


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="node-agent",
        description="Enrol this node's ambient pods: in-pod redirection, netns handed to ztunnel over ZDS.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=ENV_HELP,
    )
    p.add_argument("--version", action="version", version=version_text("node-agent"))
    p.add_argument("--node-name", default=env.get("NODE_NAME"), help="this node's name (env NODE_NAME)")
    p.add_argument(
        "--control-plane",
        default=env.get("CONTROL_PLANE_ADDRESS"),
        help="istiod address host:port for the pod watch and status (env CONTROL_PLANE_ADDRESS); "
        "without it only CNI events enrol pods",
    )
    p.add_argument(
        "--pod-source",
        choices=POD_SOURCES,
        default=env.get("POD_SOURCE") or None,
        help="where the node's pods come from: control-plane (the pod watch of --control-plane) or "
        "kubernetes (the Kubernetes API, as istio-cni) (env POD_SOURCE; default control-plane)",
    )
    p.add_argument(
        "--kubeconfig",
        default=env.get("KUBECONFIG") or None,
        metavar="PATH",
        help="kubeconfig for --pod-source kubernetes (env KUBECONFIG; default: the in-cluster service "
        "account)",
    )
    p.add_argument(
        "--ztunnel-uds-address",
        "--zds-socket",
        dest="zds_socket",
        default=None,
        metavar="PATH",
        help="the ZDS socket ztunnel connects to, named as upstream istio-cni's setting (env "
        f"ZTUNNEL_UDS_ADDRESS; default {DEFAULT_SOCKET_PATH}); ztunnel's INPOD_UDS must name the same path. "
        "--zds-socket is the old spelling of the flag",
    )
    p.add_argument(
        "--cni-socket",
        default=env.get("CNI_SOCKET", DEFAULT_CNI_SOCKET),
        metavar="PATH",
        help="socket the ambient-cni plugin posts pod events to "
        f"(env CNI_SOCKET; default {DEFAULT_CNI_SOCKET})",
    )
    p.add_argument(
        "--rule-backend",
        choices=[b.value for b in Backend],
        default=env.get("RULE_BACKEND", Backend.IPTABLES.value),
        help="iptables (iptables-restore) or nftables (nft -f) (env RULE_BACKEND)",
    )
    dns = p.add_mutually_exclusive_group()
    dns.add_argument("--dns-capture", dest="dns_capture", action="store_true", default=None)
    dns.add_argument(
        "--no-dns-capture",
        dest="dns_capture",
        action="store_false",
        help="capture pods' DNS to ztunnel's 15053 (env DNS_CAPTURE; default on, as upstream since 1.25; "
        "a pod overrides it with the ambient.istio.io/dns-capture annotation)",
    )
    ipv6 = p.add_mutually_exclusive_group()
    ipv6.add_argument("--ipv6", dest="ipv6", action="store_true", default=None)
    ipv6.add_argument("--no-ipv6", dest="ipv6", action="store_false", help="also redirect IPv6 (env IPV6)")
    p.add_argument(
        "--health-addr",
        default=env.get("HEALTH_ADDR", DEFAULT_HEALTH_ADDR),
        help="host:port of /healthz and /readyz; empty to disable (env HEALTH_ADDR)",
    )
    p.add_argument(
        "--host-prefix",
        default=env.get("HOST_PREFIX", ""),
        help="prefix for netns paths, where the host's /proc and /var/run are mounted (env HOST_PREFIX; "
        "upstream /host)",
    )
    p.add_argument(
        "--zds-allowed-uid",
        type=int,
        action="append",
        metavar="UID",
        help="peer uid allowed on the ZDS socket (repeatable; default: this process's uid)",
    )
    p.add_argument(
        "--no-reconcile-on-start",
        dest="reconcile",
        action="store_false",
        default=True,
        help="do not rewrite the rules of already-enrolled pods when starting",
    )
    p.add_argument(
        "--log-level",
        default=env.get("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="(env LOG_LEVEL; default info)",
    )
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="plain: upstream's tab-separated lines with k=v fields (default); json: one object a line "
        "(env LOG_FORMAT)",
    )
    return p


def load_config(argv: Sequence[str] | None, env: Mapping[str, str]) -> AgentConfig:
    """Flags first, environment second.

    Raises:
        ConfigError: a missing node name or an invalid value (the message names the flag/variable).
    """
    args = build_parser(env).parse_args(argv)
    if not args.node_name:
        raise ConfigError("node name missing: pass --node-name or set NODE_NAME")
    settings = EnvSettings(env, error=ConfigError)
    dns = args.dns_capture if args.dns_capture is not None else settings.flag("DNS_CAPTURE", True)
    ipv6 = args.ipv6 if args.ipv6 is not None else settings.flag("IPV6", False)
    health = args.health_addr or None
    if health is not None:
        _split_host_port(health, _health_setting(argv))
    if args.control_plane:
        _check_control_plane(args.control_plane, _given(argv, "--control-plane", "CONTROL_PLANE_ADDRESS"))
    try:
        log_format = args.log_format or log_format_from(env)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    zds_socket, warnings = zds_socket_setting(args.zds_socket, env)
    pod_source = args.pod_source or POD_SOURCE_CONTROL_PLANE
    if pod_source not in POD_SOURCES:  # from POD_SOURCE (argparse checks only the flag's own values)
        raise ConfigError(f"POD_SOURCE={pod_source!r} is not one of {', '.join(POD_SOURCES)}")
    return AgentConfig(
        node_name=args.node_name,
        control_plane=args.control_plane or None,
        pod_source=pod_source,
        kubeconfig=args.kubeconfig,
        zds_socket=zds_socket,
        warnings=tuple(warnings),
        cni_socket=args.cni_socket,
        backend=Backend(args.rule_backend),
        dns_capture=dns,
        ipv6=ipv6,
        health_addr=health,
        host_prefix=args.host_prefix,
        zds_allowed_uids=frozenset(args.zds_allowed_uid) if args.zds_allowed_uid else None,
        reconcile_on_start=args.reconcile,
        log_level=args.log_level,
        log_format=log_format,
    )


def _given(argv: Sequence[str] | None, flag: str, variable: str) -> str:
    """How the operator gave a setting: the flag when it is on the command line, else the variable."""
    given = sys.argv[1:] if argv is None else argv
    return flag if any(a == flag or a.startswith(flag + "=") for a in given) else variable


def _health_setting(argv: Sequence[str] | None) -> str:
    return _given(argv, "--health-addr", "HEALTH_ADDR")


def _check_control_plane(address: str, setting: str) -> None:
    """[https://|http://]HOST:PORT with a port istiod can listen on (1-65535), before anything starts."""
    _, sep, rest = address.partition("://")
    try:
        _, port = split_host_port((rest if sep else address).rstrip("/"))
    except AddressError as exc:
        problem = exc.problem.replace("host:port", "[https://]HOST:PORT", 1)
        raise ConfigError(f"{setting}={address!r} {problem}") from None
    if port == 0:
        raise ConfigError(f"{setting}={address!r} has port 0, which nothing listens on; use 1-65535")


def _split_host_port(addr: str, setting: str = "--health-addr") -> tuple[str, int]:
    try:
        return split_host_port(addr, default_host="127.0.0.1")
    except AddressError as exc:
        raise ConfigError(f"{setting}={addr!r} {exc.problem}") from None


def check_listen_addresses(config: AgentConfig, argv: Sequence[str] | None = None) -> None:
    """Refuse, before anything starts, a health address that cannot be bound (in use, not of this host).

    Raises:
        ConfigError: naming the setting, its value and what to do.
    """
    if config.health_addr is not None:
        setting = _health_setting(argv)
        host, port = _split_host_port(config.health_addr, setting)
        if port:
            check_listen(setting, host, port, error=ConfigError)


def effective_capabilities() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def startup_problems(config: AgentConfig, *, caps: int | None = None, which: Any = find_binary) -> list[str]:
    """Everything that keeps the agent from working here, each with how to fix it."""
    problems: list[str] = []
    caps = effective_capabilities() if caps is None else caps
    for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")):
        if not caps & (1 << bit):
            problems.append(
                f"missing capability {name}: run node-agent as root (or grant {name}; containers: "
                "privileged or cap_add NET_ADMIN, SYS_ADMIN)"
            )
    needed = ["ip"]
    if config.backend is Backend.IPTABLES:
        needed += ["iptables", "iptables-save", "iptables-restore"]
        if config.ipv6:
            needed += ["ip6tables", "ip6tables-save", "ip6tables-restore"]
    else:
        needed += ["nft"]
    for binary in needed:
        if which(binary) is None:
            package = "nftables" if binary == "nft" else "iproute2" if binary == "ip" else "iptables"
            problems.append(f"missing binary {binary}: install it (apt-get install {package})")
    return problems


def startup_check(config: AgentConfig) -> None:
    problems = startup_problems(config)
    if problems:
        raise StartupCheckError("cannot run here:\n  " + "\n  ".join(problems))


class _Listed:
    """A task_status that only records that the pod source delivered its first listing."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def started(self, value: None = None) -> None:
        self.event.set()


def _pod_source(config: AgentConfig, env: Mapping[str, str]) -> tuple[PodSource | None, StatusReporter]:
    """The Kubernetes API's pods and status writer with pod source `kubernetes`; else the control plane's
    pod watch and status writer, when one is configured; else no source, and the status goes to the log."""
    if config.pod_source == POD_SOURCE_KUBERNETES:
        from services.node_agent.kube.source import KubePodSource
        from services.node_agent.kube.status import KubeStatusReporter
        from shared.kube.client import load_config

        load_config(config.kubeconfig)  # KubeConfigError now, not from inside the nursery
        log.info("pods from the Kubernetes API", extra={"fields": [
            ("node", config.node_name), ("kubeconfig", config.kubeconfig or "in-cluster")]})
        return (KubePodSource(config.node_name, kubeconfig=config.kubeconfig),
                KubeStatusReporter(kubeconfig=config.kubeconfig))
    if config.control_plane is None:
        log.info("no control plane configured: pods are enrolled by CNI events only")
        return None, LogStatusReporter()
    try:
        from services.node_agent.watch_source import PodWatchSource
        from shared.aio import GrpcTarget
    except ImportError as exc:
        log.warning(
            "control plane configured but the pod watch is unavailable",
            extra={"fields": [("control_plane", config.control_plane), ("error", str(exc))]},
        )
        return None, LogStatusReporter()
    try:
        target = GrpcTarget.from_env("CONTROL_PLANE", {**env, "CONTROL_PLANE_ADDRESS": config.control_plane})
    except ValueError as exc:
        raise ConfigError(f"--control-plane: {exc}") from None
    return PodWatchSource(target, config.node_name), ControlPlaneStatusReporter(target, config.node_name)


async def run_agent(
    config: AgentConfig,
    *,
    applier: RuleApplier | None = None,
    pod_source: PodSource | None = None,
    status: StatusReporter | None = None,
    task_status: trio.TaskStatus[NodeAgent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the agent until cancelled; started(agent) once every socket is bound.

    `pod_source` and `status` replace what the config implies (the control plane's, or none and the log).
    """
    cache = NetnsCache()
    server = ZdsServer(config.zds_socket, cache, allowed_uids=config.zds_allowed_uids)
    if pod_source is None:
        source, implied_status = _pod_source(config, os.environ)
    else:
        source, implied_status = pod_source, LogStatusReporter()
    status = implied_status if status is None else status
    agent = NodeAgent(
        applier=applier or NetnsRuleApplier(config.rule_settings, config.backend),
        ztunnel=server,
        status=status,
        settings=config.rule_settings,
        opener=PathNetnsOpener(config.host_prefix),
        cache=cache,
        reconcile_on_start=config.reconcile_on_start,
    )

    async def health(request: Request) -> Response:
        if request.path not in ("/healthz", "/readyz"):
            return json_response({"error": "try /healthz or /readyz"}, 404)
        counts = {STATUS_ENABLED: 0, STATUS_PENDING: 0}
        for state in agent.pods.values():
            counts[state.status] = counts.get(state.status, 0) + 1
        body = {
            "status": "ok",
            "node": config.node_name,
            "ztunnel_connected": server.connected,
            "pods": counts,
        }
        return json_response(body)

    made: list[Path] = []
    cni_own: SocketFile | None = None
    try:
        # this agent serves both sockets, so it owns their directories: made when missing, removed at exit
        made += make_parents(config.zds_socket)
        made += make_parents(config.cni_socket)
        async with trio.open_nursery() as nursery:
            if isinstance(status, ControlPlaneStatusReporter | KubeStatusReporter):
                # before any pod is enrolled; a write failure is retried by it, never fatal here
                await nursery.start(status.run)
            if source is not None:
                # the first listing restores already-redirected pods before any ztunnel can connect, so the
                # first ZDS snapshot is complete (an incomplete one would make ztunnel drop pods)
                listed = _Listed()
                nursery.start_soon(partial(source.run, agent, task_status=listed))
                with trio.move_on_after(config.watch_sync_timeout):
                    await listed.event.wait()
                if not listed.event.is_set():
                    log.warning(
                        "the pod watch has not listed this node's pods in time; starting without them",
                        extra={"fields": [("timeout", f"{config.watch_sync_timeout:.0f}s")]},
                    )
            await nursery.start(server.serve)
            await nursery.start(agent.run)
            cni_listener = await open_unix_listener(config.cni_socket)
            cni_own = bound_socket_file(config.cni_socket)
            lookup = source.lookup if source is not None else None
            await nursery.start(serve_http, CniEndpoint(agent, lookup).route, [cni_listener])
            log.info("CNI-event endpoint listening", extra={"fields": [("path", config.cni_socket)]})
            if config.health_addr is not None:
                host, port = _split_host_port(config.health_addr)
                listeners = await trio.open_tcp_listeners(port, host=host)
                await nursery.start(serve_http, health, listeners)
                log.info("health endpoint listening",
                         extra={"fields": [("address", Display(config.health_addr)), ("path", "/healthz")]})
            log.info("node-agent ready", extra={"fields": [
                ("node", config.node_name), ("backend", Display(config.backend.value)),
                ("dns_capture", config.dns_capture), ("ipv6", config.ipv6)]})
            task_status.started(agent)
    finally:
        enrolled = len(agent.pods)
        agent.close()
        remove_own_socket(config.cni_socket, cni_own)  # never a file it refused to replace, nor another's
        remove_made(made)
        # fail closed until a node agent and ztunnel take them again
        log.info("node-agent stopped; enrolled pods keep their redirection rules",
                 extra={"fields": [("enrolled", enrolled)]})


async def _main(config: AgentConfig) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await nursery.start(run_agent, config)
            async for signum in signals:
                log.info("received signal; shutting down",
                         extra={"fields": [("signal", signal.Signals(signum).name)]})
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `node-agent`."""
    try:
        config = load_config(argv, os.environ)
        check_listen_addresses(config, argv)
    except ConfigError as exc:
        print(f"node-agent: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(json_format=config.log_format == "json", level=config.log_level)
    raise_open_files_limit("node-agent")
    for warning in config.warnings:
        log.warning("deprecated setting in use", extra={"fields": [("detail", warning)]})
    try:
        startup_check(config)
    except StartupCheckError as exc:
        print(f"node-agent: error: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(_main, config)
    except (OSError, AmbientError, BaseExceptionGroup) as exc:
        failure = start_failure(exc)  # e.g. an address taken after the start-up check, a socket path
        if failure is None:
            raise
        print(f"node-agent: error: cannot start: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
