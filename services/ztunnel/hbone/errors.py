"""Errors of the HBONE tunnel, each message written for the operator who reads the log line.

Protocol errors carry what goes on the wire: an HTTP status the server answers with, or an HTTP/2 error code.
"""

from __future__ import annotations

from ..errors import ZtunnelError


class HboneError(ZtunnelError):
    """Base of the HBONE errors."""


class HboneProtocolError(HboneError):
    """The peer broke HTTP/2 (bad frame, flow-control violation, oversized header block, ...).

    `error_code` is the HTTP/2 error code sent in the GOAWAY that ends the connection.
    """

    def __init__(self, message: str, *, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code


class HttpStatusError(HboneError):
    """The HBONE server answered the CONNECT with a status other than 200 (upstream's `HttpStatus`)."""

    def __init__(self, status: int, target: str) -> None:
        hints = {
            400: "the server rejected the request (is the target this pod's IP?)",
            401: "denied by an authorization policy on the destination",
            503: "the destination could not connect to the application (is it listening on that port?)",
        }
        hint = hints.get(status, "unexpected status")
        super().__init__(f"http status: {status} for CONNECT {target}: {hint}")
        self.status = status


class TlsError(HboneError):
    """The TLS handshake failed or the TLS connection broke."""


class PeerIdentityError(TlsError):
    """The peer's certificate is valid but names the wrong SPIFFE identity or trust domain."""


class StreamResetError(HboneError):
    """The HBONE stream was reset (by the peer or locally) before it completed."""

    def __init__(self, message: str, *, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code


class ConnectionClosedError(HboneError):
    """The HBONE connection carrying the stream ended (GOAWAY, PING timeout, TLS or socket error)."""
