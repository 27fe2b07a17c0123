"""ztunnel's settings, read from upstream-named environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

import msgspec

from services.ztunnel.dns.forwarder import read_nameservers
from services.ztunnel.errors import ConfigError
from services.ztunnel.proxy.context import ProxyConfig
from shared.grpc_target import GrpcTarget
from shared.settings import EnvSettings, check_listen

DEFAULT_INPOD_UDS = "/var/run/ztunnel/ztunnel.sock"
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"


def resolv_conf_nameservers(path: str) -> tuple[str, ...]:
    """The node's resolvers (DNS_RESOLV_CONF, default /etc/resolv.conf): where forwarded queries go.

    Raises:
        ConfigError: DNS_RESOLV_CONF names a file that cannot be read (a missing default file is no
            resolvers: forwarded queries then get SERVFAIL).
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return read_nameservers(f.read())
    except FileNotFoundError:
        if path == DEFAULT_RESOLV_CONF:
            return ()
        raise ConfigError(f"DNS_RESOLV_CONF={path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"DNS_RESOLV_CONF={path}: {exc.strerror}") from None


class ZtunnelConfig(msgspec.Struct, frozen=True, kw_only=True):
    inpod_uds: str = DEFAULT_INPOD_UDS
    zds_state_file: str | None = None
    """ZTUNNEL_ZDS_STATE_FILE: where to write the in-pod state as JSON after every change (the ZDS
    conformance kit's client interface, docs/zds-conformance.md)."""
    node_name: str = ""
    pod_name: str = ""
    pod_namespace: str = ""
    instance_ip: str = ""
    cluster_id: str = "Kubernetes"
    xds_address: str | None = None
    xds_target: GrpcTarget | None = None
    """Built from XDS_ADDRESS / XDS_ROOT_CERT / XDS_TOKEN_FILE / XDS_HEADER_* when XDS_ADDRESS is set."""
    ca_address: str | None = None
    ca_target: GrpcTarget | None = None
    """The CA (CA_ADDRESS / CA_ROOT_CERT / CA_TOKEN_FILE / CA_HEADER_*), each defaulting to its XDS_* twin
    (upstream: the CA is istiod). Built only with XDS_ADDRESS: without xDS there is no mesh and every
    connection is plain passthrough."""
    log_format: str = "plain"
    log_level: str = "info"
    admin_addr: tuple[str, int] = ("127.0.0.1", 15000)
    stats_addr: tuple[str | None, int] = (None, 15020)  # None: every wildcard (v4 and v6)
    readiness_addr: tuple[str | None, int] = (None, 15021)
    drain_deadline: float = 5.0
    proxy: ProxyConfig = ProxyConfig()


def drain_deadline(env: Mapping[str, str]) -> float:
    """Upstream: CONNECTION_TERMINATION_DEADLINE, else TERMINATION_GRACE_PERIOD_SECONDS - 5 s
    (- 1 s when <= 10 s, at least 1 s), else 5 s."""
    settings = EnvSettings(env, error=ConfigError)
    if env.get("CONNECTION_TERMINATION_DEADLINE"):
        return settings.duration("CONNECTION_TERMINATION_DEADLINE", 5.0)
    if env.get("TERMINATION_GRACE_PERIOD_SECONDS"):
        grace = settings.number("TERMINATION_GRACE_PERIOD_SECONDS", 0.0)
        return max(1.0, grace - (1 if grace <= 10 else 5))
    return 5.0


def connection_cap(value: int, name: str) -> int | None:
    """A connection cap setting: 0 (the default) = derived at start (proxy/limits.py), else the number.

    Raises:
        ConfigError: a negative value.
    """
    if value < 0:
        raise ConfigError(f"{name}={value} must be 0 (derived from the open-files limit) or positive")
    return value or None


UPSTREAM_NAMES: Final = {
    "XDS_ROOT_CA": ("XDS_ROOT_CERT",),
    "CA_ROOT_CA": ("CA_ROOT_CERT",),
    "AUTH_TOKEN": ("XDS_TOKEN_FILE", "CA_TOKEN_FILE"),
}
"""Upstream ztunnel's names for the root certificate and token files, read as aliases of ours (ours win
where both are set), so one environment configures either implementation."""


def with_upstream_names(env: Mapping[str, str]) -> Mapping[str, str]:
    """`env` with upstream's XDS_ROOT_CA / CA_ROOT_CA / AUTH_TOKEN filled into our names where unset.

    Raises:
        ConfigError: a root setting names upstream's `SYSTEM` (the system trust store), which this
            ztunnel refuses: a mesh's root is its own CA, never the host's public ones.
    """
    merged = dict(env)
    for upstream, ours in UPSTREAM_NAMES.items():
        value = env.get(upstream)
        if not value:
            continue
        if value == "SYSTEM" and upstream.endswith("ROOT_CA"):
            raise ConfigError(f"{upstream}=SYSTEM (the system trust store) is not supported; "
                              "name the mesh's root certificate file")
        for name in ours:
            merged.setdefault(name, value)
    return merged


def load_config(env: Mapping[str, str] | None = None) -> ZtunnelConfig:
    """Read the settings from `env` (default: the process environment).

    Raises:
        ConfigError: a value is malformed; the message names the variable.
    """
    env = with_upstream_names(os.environ if env is None else env)
    settings = EnvSettings(env, error=ConfigError)
    log_format = env.get("LOG_FORMAT", "plain").lower()
    if log_format not in {"plain", "json"}:
        raise ConfigError(f"LOG_FORMAT={log_format!r} must be plain or json")
    admin_host, admin_port = settings.host_port("ADMIN_ADDR", ("127.0.0.1", 15000))
    proxy = ProxyConfig(
        ipv6=settings.flag("IPV6_ENABLED", True),
        orig_src=settings.optional_flag("ENABLE_ORIG_SRC"),
        cluster_id=env.get("CLUSTER_ID", "Kubernetes"),
        connect_timeout=settings.duration("CONNECT_TIMEOUT", 10.0),
        splice=settings.flag("ZTUNNEL_SPLICE", True),
        dns_capture=settings.flag("ISTIO_META_DNS_CAPTURE", True),
        dns_upstreams=resolv_conf_nameservers(env.get("DNS_RESOLV_CONF", DEFAULT_RESOLV_CONF)),
        dns_timeout=settings.duration("DNS_FORWARD_TIMEOUT", 5.0),
        dns_max_inflight=settings.integer("DNS_MAX_INFLIGHT", 64),
        max_connections=connection_cap(settings.integer("ZTUNNEL_MAX_CONNECTIONS", 0),
                                       "ZTUNNEL_MAX_CONNECTIONS"),
        max_connections_per_pod=connection_cap(settings.integer("ZTUNNEL_MAX_CONNECTIONS_PER_POD", 0),
                                               "ZTUNNEL_MAX_CONNECTIONS_PER_POD"),
    )
    xds_target = None
    if env.get("XDS_ADDRESS"):
        try:
            xds_target = GrpcTarget.from_env("XDS", env)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    ca_target = None
    if xds_target is not None:
        ca_env = dict(env)
        for suffix in ("ADDRESS", "ROOT_CERT", "TOKEN_FILE"):
            if not ca_env.get(f"CA_{suffix}") and env.get(f"XDS_{suffix}"):
                ca_env[f"CA_{suffix}"] = env[f"XDS_{suffix}"]
        try:
            ca_target = GrpcTarget.from_env("CA", ca_env)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return ZtunnelConfig(
        inpod_uds=env.get("INPOD_UDS", DEFAULT_INPOD_UDS),
        zds_state_file=env.get("ZTUNNEL_ZDS_STATE_FILE") or None,
        node_name=env.get("NODE_NAME", ""),
        pod_name=env.get("POD_NAME", ""),
        pod_namespace=env.get("POD_NAMESPACE", ""),
        instance_ip=env.get("INSTANCE_IP", ""),
        cluster_id=proxy.cluster_id,
        xds_address=env.get("XDS_ADDRESS") or None,
        xds_target=xds_target,
        ca_address=env.get("CA_ADDRESS") or None,
        ca_target=ca_target,
        log_format=log_format,
        log_level=env.get("RUST_LOG", env.get("LOG_LEVEL", "info")),
        admin_addr=(admin_host or "127.0.0.1", admin_port),
        stats_addr=settings.host_port("STATS_ADDR", (None, 15020)),
        readiness_addr=settings.host_port("READINESS_ADDR", (None, 15021)),
        drain_deadline=drain_deadline(env),
        proxy=proxy,
    )


def check_listen_addresses(config: ZtunnelConfig) -> None:
    """Refuse, before anything starts, a listen address that cannot be bound (in use, not of this host).

    Raises:
        ConfigError: naming the setting, its value and what to do.
    """
    for name, (host, port) in (("ADMIN_ADDR", config.admin_addr), ("STATS_ADDR", config.stats_addr),
                               ("READINESS_ADDR", config.readiness_addr)):
        if port:  # port 0: the kernel picks a free one
            check_listen(name, host, port, error=ConfigError)
