"""The ZDS error vocabulary. Messages are upstream's where upstream has one (peers log and match them)."""

from __future__ import annotations

from shared.errors import AmbientError


class ZdsError(AmbientError):
    """Base of every ZDS error."""


class ZdsReadError(ZdsError):
    """A datagram that cannot be turned into a message: decode failure, no payload, wrong fd count,
    truncation. Upstream ztunnel NACKs "failure to read message : <this>" and reconnects."""


class ZdsEndOfStream(ZdsError):
    """A zero-length datagram (or EOF): the peer ended the stream."""


class ZdsProtocolError(ZdsError):
    """A well-formed message that is not allowed now (keep after snapshot, second snapshot_sent, add
    without workload_info, a message that breaks one-in-flight). Upstream ztunnel NACKs
    "failure to process message : <this>" and exits; ours NACKs and drops the connection."""


class ZdsVersionError(ZdsProtocolError):
    """The client's hello carried no version, NOT_USED, or one this side does not speak."""


class ZdsNoConnection(ZdsError):
    """The node agent has no ztunnel connection to send an add to (retryable)."""

    def __init__(self) -> None:
        super().__init__("no ztunnel connection")


class ZdsNack(ZdsError):
    """ztunnel answered with a NACK; `error` is its message (retryable)."""

    def __init__(self, error: str) -> None:
        super().__init__(f"got ack error: {error}")
        self.error = error


class ZdsTimeout(ZdsError):
    """No answer from ztunnel within the deadline (retryable)."""


class ZdsConnectionLost(ZdsError):
    """The connection ended before the message was answered (retryable)."""
