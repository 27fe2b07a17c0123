"""Errors of the ztunnel process, each message written for the operator who reads the log line.

`ProxyStartError` is what a failed `start_workload` raises; the ZDS client turns it into the NACK
"failure to start proxy : <message>". When `shared.zds.errors.ProxyStartError` exists we raise that class
(so the lead's client can catch it by type); otherwise a local stand-in with the same shape.
"""

from __future__ import annotations

from shared.errors import AmbientError

try:  # pragma: no cover - depends on whether the ZDS package has landed yet
    from shared.zds.errors import ProxyStartError as _SharedProxyStartError  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover

    class _SharedProxyStartError(AmbientError):  # type: ignore[no-redef,unused-ignore]
        """A pod's proxy set could not be started (bind failure, bad netns fd); the pod stays pending."""


class ZtunnelError(AmbientError):
    """Base of this package's errors."""


class ProxyStartError(_SharedProxyStartError):  # type: ignore[misc,valid-type,unused-ignore]
    """A pod's listener set could not be bound; nothing of it is left running."""


class StartupCheckError(ZtunnelError):
    """A start-up self check failed (setns, SO_MARK): ztunnel cannot work on this host as configured."""


class ConfigError(ZtunnelError):
    """An environment setting has a value ztunnel cannot use."""


class ConnectError(ZtunnelError):
    """An upstream connection (to a destination or to the app) could not be made."""


class SelfCallError(ZtunnelError):
    """Inbound traffic whose original destination is one of ztunnel's own in-pod ports (a loop)."""
