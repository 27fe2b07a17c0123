"""Errors of the DNS proxy, each message written for the operator who reads the log line."""

from __future__ import annotations

from services.ztunnel.errors import ZtunnelError


class UpstreamError(ZtunnelError):
    """No upstream resolver answered a forwarded query (timeout, refused, garbage); the pod gets SERVFAIL."""


class StreamEnded(ZtunnelError):
    """A DNS-over-TCP peer closed the connection in the middle of a length-prefixed message."""
