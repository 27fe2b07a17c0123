"""A live trace of one pod's connections: each connection's record, as it is written, to whoever asks.

Theory of operation
-------------------
Every proxied connection ends in one `ConnectionOutcome` (access_log.py), and every one that never got that
far in one `connection failed` line. `Telemetry` writes both; when someone is tracing (`ConnectionTrace`
has subscribers) it also hands them to `publish`, tagged with the pod whose proxy set handled them
(`PodRef`, from the pod's own `Telemetry.for_pod` view). Nothing else changes on the data path: with no
subscriber the cost is one list check per connection.

A subscriber is a bounded trio memory channel. `publish` never waits: when a subscriber's channel is full
its event is dropped and counted (`Subscription.dropped`), so a slow reader (a terminal, a paused pipe)
never slows connections. The event, a plain dict ready for JSON, is built once per connection and only
when some subscriber wants it.

Upstream ztunnel has no such trace; its closest is the access log at debug level.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import msgspec
import trio

from shared.addr import format_host_port
from shared.logs import Display
from shared.zds.types import WorkloadInfo

Event = dict[str, Any]
SUBSCRIBER_BUFFER: Final = 256
"""Events a subscriber may fall behind by before its events are dropped (and counted)."""


class Verdict(Protocol):
    """An authorization decision, as the HBONE server and the trace read it (`authz.Decision` is one; the
    trace also shows its `policy` when it has one)."""

    @property
    def allowed(self) -> bool: ...

    @property
    def reason(self) -> str:
        """Why it was denied ("" when allowed, or when there is nothing to say)."""
        ...


class PodRef(msgspec.Struct, frozen=True, kw_only=True):
    """The pod whose proxy set handled a connection: its ZDS uid and, when ZDS named it, ns/name."""

    uid: str
    info: WorkloadInfo | None = None

    @property
    def key(self) -> str | None:
        return f"{self.info.namespace}/{self.info.name}" if self.info is not None else None

    def matches(self, query: str) -> bool:
        """`query` names this pod: its uid, `namespace/name` or its name."""
        return query == self.uid or (self.info is not None and query in (self.key, self.info.name))


class Subscription:
    """One trace reader: events for `pod` (every pod when None) arrive on `receive`."""

    __slots__ = ("_send", "dropped", "pod", "receive")

    def __init__(self, pod: str | None, size: int) -> None:
        self.pod = pod
        self._send, self.receive = trio.open_memory_channel[Event](size)
        self.dropped = 0
        """Events this reader missed because its channel was full."""

    def wants(self, pod: PodRef | None) -> bool:
        return self.pod is None or (pod is not None and pod.matches(self.pod))

    def offer(self, event: Event) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1

    def close(self) -> None:
        self._send.close()


class ConnectionTrace:
    """The process's trace readers (one instance, shared by every pod's `Telemetry` view)."""

    def __init__(self) -> None:
        self.subscribers: list[Subscription] = []

    @contextmanager
    def subscribe(self, pod: str | None, *, size: int = SUBSCRIBER_BUFFER) -> Iterator[Subscription]:
        """Receive the events of `pod` (uid, ns/name or name; None: every pod) until the block ends."""
        sub = Subscription(pod, size)
        self.subscribers.append(sub)
        try:
            yield sub
        finally:
            self.subscribers.remove(sub)
            sub.close()

    def publish(self, pod: PodRef | None, make: Callable[[], Event]) -> None:
        """Offer the event `make()` builds (once, if anyone wants it) to every subscriber of `pod`."""
        event: Event | None = None
        for sub in self.subscribers:
            if sub.wants(pod):
                if event is None:
                    event = make()
                sub.offer(event)


def now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def addr_text(addr: object) -> str | None:
    if addr is None:
        return None
    if isinstance(addr, tuple):
        return format_host_port(addr[0], addr[1])
    return str(addr)


def listener_of(direction: str, dst_port: int | None, hbone: bool) -> str:
    """Which of the pod's listeners took the connection."""
    if direction == "outbound":
        return "outbound (15001)"
    if hbone or dst_port == 15008:
        return "inbound HBONE (15008)"
    return "inbound plaintext (15006)"


def _port(addr: Display | None) -> int | None:
    if addr is None:
        return None
    tail = str(addr).rpartition(":")[2]
    return int(tail) if tail.isdigit() else None


def policy_text(verdict: Verdict | None) -> str | None:
    """`allow`, `allow by ns/name`, or `deny: <reason>`; None when nothing was decided (outbound: upstream
    enforces policy at the destination only)."""
    if verdict is None:
        return None
    policy = getattr(verdict, "policy", None)
    if verdict.allowed:
        return f"allow by {policy}" if policy else "allow (no policy applies)"
    return f"deny: {verdict.reason}"


def failed_event(pod: PodRef | None, *, src_addr: Display, dst_addr: Display, direction: str,
                 error: str) -> Event:
    """The trace event of a connection refused before it had a record (no destination, no workload...)."""
    return {
        "time": now_text(), "event": "connection failed", "pod": pod.key if pod else None,
        "uid": pod.uid if pod else None, "direction": direction,
        "listener": listener_of(direction, _port(dst_addr), False), "src": str(src_addr),
        "original_dst": str(dst_addr), "error": error,
    }


async def stream_events(trace: ConnectionTrace, pod: str | None,
                        running: Sequence[PodRef]) -> AsyncGenerator[bytes, None]:
    """The trace as JSON lines, for as long as the reader reads: first a `tracing` line naming the running
    pods that match, then one line per connection, and a `dropped` line (with how many) before the next
    event whenever this reader fell behind."""
    with trace.subscribe(pod) as sub:
        matching = [{"uid": ref.uid, "pod": ref.key} for ref in running if pod is None or ref.matches(pod)]
        yield msgspec.json.encode({"event": "tracing", "pod": pod, "running": matching}) + b"\n"
        reported = 0
        async for event in sub.receive:
            if sub.dropped > reported:
                yield msgspec.json.encode({"event": "dropped", "count": sub.dropped - reported}) + b"\n"
                reported = sub.dropped
            yield msgspec.json.encode(event) + b"\n"
