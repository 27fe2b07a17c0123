"""ZDS session state machines for both roles: pure objects, no I/O, no clock.

Theory of operation
-------------------
A ZDS connection is a strict ping-pong after the hello: the node agent (server role) sends one
`WorkloadRequest`, ztunnel (client role) answers with exactly one `WorkloadResponse{ack}`, and only then
may the next request go out. Correlation is purely temporal. The connection has three phases:

    hello  ->  snapshot (add / keep / del ..., then snapshot_sent)  ->  steady (add / del ...)

Each role's object checks that what it sends and what it receives fits the phase and the one-in-flight
rule, using one transition table per role. Anything absent from a table is a protocol error:
`ZdsProtocolError` for a peer that broke the rules (answered with a NACK, then the connection is
dropped), `LocalProtocolError` for our own code trying to send out of turn (a bug, never sent).
The transport glue (services/node_agent/zds_server.py, services/ztunnel/inpod/zds_client.py) feeds
decoded messages in and writes the datagrams these objects return.
"""

from __future__ import annotations

import enum

from shared.zds.codec import Datagram, encode_ack, encode_hello, encode_request
from shared.zds.errors import ZdsProtocolError, ZdsVersionError
from shared.zds.types import (
    Ack,
    AddWorkload,
    DelWorkload,
    Hello,
    KeepWorkload,
    Request,
    SnapshotSent,
    Version,
)

SUPPORTED_VERSIONS = frozenset({Version.V1})


class LocalProtocolError(RuntimeError):
    """This side tried to send something the protocol does not allow now (a bug in the caller)."""


class Phase(enum.Enum):
    HELLO = "hello"  # server: waiting for the client's hello; client: hello not sent yet
    SNAPSHOT = "snapshot"  # the node agent is sending its snapshot
    STEADY = "steady"  # after snapshot_sent was answered (server) / received (client)
    CLOSED = "closed"


def _kind(message: Request) -> str:
    return {AddWorkload: "add", KeepWorkload: "keep", DelWorkload: "del", SnapshotSent: "snapshot_sent"}[
        type(message)
    ]


def version_name(version: int) -> str:
    try:
        return Version(version).name
    except ValueError:
        return f"unknown version {version}"


def check_hello(hello: Hello) -> None:
    """Accept V1; a missing (NOT_USED) or unknown version is a ZdsVersionError naming it."""
    if hello.version not in SUPPORTED_VERSIONS:
        supported = ", ".join(v.name for v in sorted(SUPPORTED_VERSIONS))
        raise ZdsVersionError(
            f"ztunnel sent ZdsHello with {version_name(hello.version)} (supported: {supported}); closing"
        )


# Requests the node agent may send, by phase. snapshot_sent moves the server to STEADY once answered.
_SERVER_SENDS: dict[tuple[Phase, str], Phase] = {
    (Phase.SNAPSHOT, "add"): Phase.SNAPSHOT,
    (Phase.SNAPSHOT, "keep"): Phase.SNAPSHOT,
    (Phase.SNAPSHOT, "del"): Phase.SNAPSHOT,
    (Phase.SNAPSHOT, "snapshot_sent"): Phase.STEADY,
    (Phase.STEADY, "add"): Phase.STEADY,
    (Phase.STEADY, "del"): Phase.STEADY,
}


class ServerSession:
    """Node-agent side of one connection.

    Use: `receive_hello()` once; then `send()` a request, write the datagram, and feed the answer to
    `receive_ack()` before sending the next. A datagram arriving with nothing in flight is
    `ZdsProtocolError("ztunnel protocol error, unexpected message")`, as upstream's keepalive check.
    """

    def __init__(self) -> None:
        self.phase = Phase.HELLO
        self.in_flight: Request | None = None
        self._after_answer: Phase | None = None

    @property
    def idle(self) -> bool:
        return self.phase in (Phase.SNAPSHOT, Phase.STEADY) and self.in_flight is None

    def receive_hello(self, hello: Hello) -> None:
        if self.phase is not Phase.HELLO:
            raise ZdsProtocolError("ztunnel protocol error, unexpected hello")
        try:
            check_hello(hello)
        except ZdsVersionError:
            self.phase = Phase.CLOSED
            raise
        self.phase = Phase.SNAPSHOT

    def send(self, request: Request) -> Datagram:
        if self.in_flight is not None:
            raise LocalProtocolError(f"cannot send {_kind(request)}: {_kind(self.in_flight)} is unanswered")
        after = _SERVER_SENDS.get((self.phase, _kind(request)))
        if after is None:
            raise LocalProtocolError(f"cannot send {_kind(request)} in phase {self.phase.value}")
        datagram = encode_request(request)
        self.in_flight = request
        self._after_answer = after
        return datagram

    def receive_ack(self, ack: Ack) -> Request:
        """Match an answer to the request in flight; returns that request."""
        request = self.in_flight
        if request is None or self._after_answer is None:
            self.phase = Phase.CLOSED
            raise ZdsProtocolError(
                "ztunnel protocol error, unexpected message: an answer with no request in flight")
        self.phase = self._after_answer
        self.in_flight = None
        self._after_answer = None
        return request

    def close(self) -> None:
        self.phase = Phase.CLOSED
        self.in_flight = None


class ClientSession:
    """ztunnel side of one connection.

    Use: `hello()` first; then for each received request `receive_request()` (which may raise
    `ZdsProtocolError`), act on it, and `respond()` exactly once, with the error text for a NACK.
    After a protocol or read error call `respond()` with the NACK text and then drop the connection
    (`closing` is true). `snapshot_received` tells readiness whether this connection saw snapshot_sent.
    """

    def __init__(self) -> None:
        self.phase = Phase.HELLO
        self.awaiting_response = False
        self.closing = False

    @property
    def snapshot_received(self) -> bool:
        return self.phase is Phase.STEADY

    def hello(self, version: int = Version.V1) -> Datagram:
        if self.phase is not Phase.HELLO:
            raise LocalProtocolError("hello already sent")
        self.phase = Phase.SNAPSHOT
        return encode_hello(version)

    def receive_request(self, request: Request) -> Request:
        if self.phase is Phase.HELLO:
            raise LocalProtocolError("send the hello before reading requests")
        if self.awaiting_response or self.closing:
            raise LocalProtocolError("the previous request has not been answered")
        self.awaiting_response = True
        match request:
            case AddWorkload(workload_info=None):
                self.closing = True
                raise ZdsProtocolError("add workload received without workload_info")
            case KeepWorkload() if self.phase is Phase.STEADY:
                self.closing = True
                raise ZdsProtocolError("pod keep received after snapshot")
            case SnapshotSent() if self.phase is Phase.STEADY:
                self.closing = True
                raise ZdsProtocolError("pod snapshot received already")
            case SnapshotSent():
                self.phase = Phase.STEADY
        return request

    def reject_unreadable(self) -> None:
        """A datagram could not be read: the NACK for it is the only thing left to send."""
        self.awaiting_response = True
        self.closing = True

    def respond(self, error: str = "") -> Datagram:
        if not self.awaiting_response:
            raise LocalProtocolError("no request to answer")
        self.awaiting_response = False
        if self.closing:
            self.phase = Phase.CLOSED
        return encode_ack(error)


__all__ = [
    "ClientSession",
    "LocalProtocolError",
    "Phase",
    "ServerSession",
    "check_hello",
    "version_name",
]
