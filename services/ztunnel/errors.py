"""Errors of the ztunnel process, each message written for the operator who reads the log line.

`ProxyStartError` is what a failed `start_workload` raises; the in-pod state manager turns it into the NACK
"failure to start proxy : <message>" and keeps the pod pending.
"""

from __future__ import annotations

from shared.errors import AmbientError


class ZtunnelError(AmbientError):
    """Base of this package's errors."""


class ProxyStartError(ZtunnelError):
    """ztunnel could not start a pod's proxy (e.g. a port in use inside the pod). NACKed as
    "failure to start proxy : <this>"; the pod stays pending and is retried."""


class StartupCheckError(ZtunnelError):
    """A start-up self check failed (setns, SO_MARK): ztunnel cannot work on this host as configured."""


class ConfigError(ZtunnelError):
    """An environment setting has a value ztunnel cannot use."""


class ConnectError(ZtunnelError):
    """An upstream connection (to a destination or to the app) could not be made."""

