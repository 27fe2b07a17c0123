"""Errors of the ztunnel process, each message written for the operator who reads the log line.

`ProxyStartError` (from shared.zds.errors) is what a failed `start_workload` raises; the ZDS client's
workload manager turns it into the NACK "failure to start proxy : <message>" and keeps the pod pending.
"""

from __future__ import annotations

from shared.errors import AmbientError
from shared.zds.errors import ProxyStartError

__all__ = ["ConfigError", "ConnectError", "ProxyStartError", "SelfCallError", "StartupCheckError",
           "ZtunnelError"]


class ZtunnelError(AmbientError):
    """Base of this package's errors."""


class StartupCheckError(ZtunnelError):
    """A start-up self check failed (setns, SO_MARK): ztunnel cannot work on this host as configured."""


class ConfigError(ZtunnelError):
    """An environment setting has a value ztunnel cannot use."""


class ConnectError(ZtunnelError):
    """An upstream connection (to a destination or to the app) could not be made."""


class SelfCallError(ZtunnelError):
    """Inbound traffic whose original destination is one of ztunnel's own in-pod ports (a loop)."""
