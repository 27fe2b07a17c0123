"""Errors of the HBONE tunnel, each message written for the operator who reads the log line.

Protocol errors carry what goes on the wire: an HTTP status the server answers with, or an HTTP/2 error code.
"""

from __future__ import annotations

import http
from typing import ClassVar

from services.ztunnel.errors import ZtunnelError


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
    """The HBONE server answered the CONNECT with a status other than 200 (upstream's `HttpStatus`).

    `str()` is upstream's wording (`http status: 401 Unauthorized`, as access logs show it); `hint` says
    what the status usually means.
    """

    HINTS: ClassVar[dict[int, str]] = {
        400: "the destination rejected the request (is the target its own IP?)",
        401: "denied by an authorization policy at the destination",
        503: "the destination could not connect to its application (is it listening on that port?)",
    }

    def __init__(self, status: int, target: str) -> None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        super().__init__(f"http status: {status} {phrase}".rstrip())
        self.status = status
        self.target = target
        self.hint = self.HINTS.get(status, "unexpected status")


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
