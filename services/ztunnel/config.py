"""ztunnel's settings, read from upstream-named environment variables (SPEC §1, §4, §6, §7)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import msgspec

from services.ztunnel.errors import ConfigError
from services.ztunnel.proxy.context import ProxyConfig
from shared.grpc_target import GrpcTarget

DEFAULT_INPOD_UDS = "/var/run/ztunnel/ztunnel.sock"


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


def _bool(env: Mapping[str, str], name: str, default: bool | None) -> bool | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true or false)")


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")


def parse_duration(name: str, raw: str) -> float:
    """`5s`, `500ms`, `1m` or a bare number of seconds."""
    match = _DURATION.match(raw.strip())
    if not match:
        raise ConfigError(f"{name}={raw!r} is not a duration (examples: 5s, 500ms, 1m)")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value / 1000 if unit == "ms" else value * 60 if unit == "m" else value


def _addr(env: Mapping[str, str], name: str, default: tuple[str | None, int]) -> tuple[str | None, int]:
    raw = env.get(name)
    if not raw:
        return default
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{name}={raw!r} must be HOST:PORT (e.g. 127.0.0.1:15000 or [::]:15020)")
    host = host.strip("[]")
    return (host or None), int(port)


def drain_deadline(env: Mapping[str, str]) -> float:
    """Upstream: CONNECTION_TERMINATION_DEADLINE, else TERMINATION_GRACE_PERIOD_SECONDS - 5 s
    (- 1 s when <= 10 s, at least 1 s), else 5 s."""
    if raw := env.get("CONNECTION_TERMINATION_DEADLINE"):
        return parse_duration("CONNECTION_TERMINATION_DEADLINE", raw)
    if raw := env.get("TERMINATION_GRACE_PERIOD_SECONDS"):
        try:
            grace = float(raw)
        except ValueError:
            raise ConfigError(f"TERMINATION_GRACE_PERIOD_SECONDS={raw!r} is not a number") from None
        return max(1.0, grace - (1 if grace <= 10 else 5))
    return 5.0


def load_config(env: Mapping[str, str] | None = None) -> ZtunnelConfig:
    """Read the settings from `env` (default: the process environment).

    Raises:
        ConfigError: a value is malformed; the message names the variable.
    """
    env = os.environ if env is None else env
    log_format = env.get("LOG_FORMAT", "plain").lower()
    if log_format not in {"plain", "json"}:
        raise ConfigError(f"LOG_FORMAT={log_format!r} must be plain or json")
    admin_host, admin_port = _addr(env, "ADMIN_ADDR", ("127.0.0.1", 15000))
    ipv6 = _bool(env, "IPV6_ENABLED", True)
    proxy = ProxyConfig(
        ipv6=bool(ipv6),
        orig_src=_bool(env, "ENABLE_ORIG_SRC", None),
        cluster_id=env.get("CLUSTER_ID", "Kubernetes"),
        connect_timeout=parse_duration("CONNECT_TIMEOUT", env.get("CONNECT_TIMEOUT", "10s")),
        splice=bool(_bool(env, "ZTUNNEL_SPLICE", True)),
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
        stats_addr=_addr(env, "STATS_ADDR", (None, 15020)),
        readiness_addr=_addr(env, "READINESS_ADDR", (None, 15021)),
        drain_deadline=drain_deadline(env),
        proxy=proxy,
    )
