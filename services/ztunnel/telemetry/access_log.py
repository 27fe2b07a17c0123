"""The access log and the traffic metrics of proxied connections, in upstream ztunnel's shapes.

Theory of operation
-------------------
One `ConnectionOutcome` follows a proxied connection: the copy loop (or the HBONE server) bumps its byte
counters, and `Telemetry.connection_complete()` writes the single access log line (logger `access`, so
target `access`, formatted by logging.py) and updates the metrics (metrics.py) when it ends.
Byte counts in the log are "un-flipped" (bytes_sent = client -> upstream); in the metrics they follow Istio's
convention (received = request direction, sent = response direction). While someone traces a pod
(trace.py, ztunnel's admin `/debug/connections`), the same record also goes to them, tagged with the pod
by that pod's `Telemetry.for_pod` view.

Each view also keeps its pod's open connections (`OpenConnections`): the record goes in when
`connection_opened` marks it and comes out when `connection_complete` (or `connection_failed`) writes it,
both O(1) dict operations at those two points, nothing on the byte path. ztunnel's `/config_dump` lists them
(configdump.py) as upstream's `workloadState[uid].connections`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from typing import Final

import msgspec

from services.ztunnel.telemetry.metrics import Child, Family, Metrics
from services.ztunnel.telemetry.trace import (
    ConnectionTrace,
    Event,
    PodRef,
    Verdict,
    addr_text,
    failed_event,
    listener_of,
    now_text,
    policy_text,
)
from shared.addr import format_host_port, unmap
from shared.logs import Display, Field, write_line
from shared.zds.types import WorkloadInfo

ACCESS_LOGGER: Final = "access"


class Peer(msgspec.Struct, frozen=True, kw_only=True):
    """What is known about one end of a connection (all optional: unknown ends are logged by address).

    `workload` is the xDS workload name (the pod name only when xDS has nothing), the metrics'
    `*_workload` label; `name` is the workload's own (pod) name, which the access log's `src.workload` /
    `dst.workload` carry as upstream's do (the workload name when it is unknown); `identity` is set only
    when mTLS proved it, while `principal` is the identity xDS gives the workload (upstream reports it as
    `destination_principal` even for plain TCP). `service*` name the destination's Service.
    """

    workload: str | None = None
    name: str | None = None
    namespace: str | None = None
    identity: str | None = None
    cluster: str | None = None
    service: str | None = None
    """The Service's hostname (`dst.service`, `destination_service`)."""
    service_name: str | None = None
    service_namespace: str | None = None
    canonical_service: str | None = None
    canonical_revision: str | None = None
    principal: str | None = None


MAX_FIELD_LENGTH = 1024
"""An access-log error longer than this many characters is cut, ending in `...(N more)` (a peer's 60 KB
`:authority` quoted in an error must not be copied into every log line)."""


def truncate_field(value: str) -> str:
    """`value` cut to MAX_FIELD_LENGTH characters, saying how many were left out."""
    if len(value) <= MAX_FIELD_LENGTH:
        return value
    return f"{value[:MAX_FIELD_LENGTH]}...({len(value) - MAX_FIELD_LENGTH} more)"


def format_addr(addr: tuple[str, int] | tuple[str, int, int, int]) -> Display:
    return Display(format_host_port(unmap(addr[0]), addr[1]))


class ConnectionOutcome:
    """One proxied connection (or one HBONE tunnel), from accept to close: its ends, what it carried and how
    it ended. The one record that feeds both the access log line and the metrics.

    The handler makes it as soon as it knows the ends; the copy loop (or the HBONE server) bumps the byte
    counters; `Telemetry.connection_opened` marks it `opened`; `Telemetry.connection_complete` writes it.
    Bytes are counted from the client's side for both directions: `bytes_sent` = client -> upstream (the
    request direction), `bytes_recv` = upstream -> client.
    """

    __slots__ = ("bytes_recv", "bytes_sent", "direction", "dst", "dst_addr", "dst_hbone_addr", "error",
                 "for_host", "opened", "original", "reporter", "src", "src_addr", "start", "status",
                 "verdict", "waypoint")

    def __init__(self, *, direction: str, src_addr: Display, dst_addr: Display, src: Peer | None = None,
                 dst: Peer | None = None, dst_hbone_addr: Display | None = None) -> None:
        self.direction = direction
        self.src_addr = src_addr
        self.dst_addr = dst_addr
        self.dst_hbone_addr = dst_hbone_addr
        self.src = src or Peer()
        self.dst = dst or Peer()
        self.bytes_sent = 0  # client -> upstream
        self.bytes_recv = 0  # upstream -> client
        self.start = time.monotonic()
        self.status: int | None = None
        """The CONNECT answer of an HBONE tunnel (200, 401, 503, ...), when there was one."""
        self.error: str | None = None
        """Why it failed or ended early, in upstream's words; None for a clean end."""
        self.opened = False
        """It got through and was counted as opened; otherwise it is counted as failed when it ends."""
        # For the live trace only (trace.py): what the log line does not say.
        self.original: tuple[str, int] | None = None
        """Outbound: where the app was going (a service VIP, say), when `dst_addr` is elsewhere."""
        self.for_host: str | None = None
        """Inbound HBONE: the service hostname the client named (`Forwarded: ...;host=`), if it did."""
        self.waypoint: str | None = None
        """Outbound through a waypoint: its workload name."""
        self.verdict: Verdict | None = None
        """Inbound: the authorization decision."""
        self.reporter: str | None = None
        """The metrics' `reporter` when it is not the direction's (`waypoint` for a waypoint's tunnels)."""

    def fields(self, *, with_bytes: bool) -> list[Field]:
        fields: list[Field] = [
            ("src.addr", self.src_addr),
            ("src.workload", self.src.name or self.src.workload),
            ("src.namespace", self.src.namespace),
            ("src.identity", self.src.identity),
            ("src.cluster", self.src.cluster),
            ("dst.addr", self.dst_addr),
            ("dst.hbone_addr", self.dst_hbone_addr),
            ("dst.service", self.dst.service),
            ("dst.workload", self.dst.name or self.dst.workload),
            ("dst.namespace", self.dst.namespace),
            ("dst.identity", self.dst.identity),
            ("dst.cluster", self.dst.cluster),
            ("direction", self.direction),
        ]
        if with_bytes:
            ms = int((time.monotonic() - self.start) * 1000)
            fields += [("bytes_sent", self.bytes_sent), ("bytes_recv", self.bytes_recv),
                       ("duration", f"{ms}ms")]
        return fields


    def trace_event(self, pod: PodRef | None) -> Event:
        """This connection as the live trace shows it (trace.py): its listener, where the app was going,
        the route, the policy decision, bytes, duration and error."""
        hbone = self.dst_hbone_addr is not None
        if self.direction == "outbound":
            original = addr_text(self.original) or str(self.dst_addr)
            if not hbone:
                route = "passthrough"
            elif self.waypoint is not None:
                route = f"HBONE via waypoint {self.waypoint} at {self.dst_addr}"
            else:
                route = f"HBONE to the ztunnel at {self.dst_addr}"
        else:
            original = str(self.dst_hbone_addr if hbone else self.dst_addr)
            route = "delivered to the app"
        src, dst = self.src, self.dst
        return {
            "time": now_text(), "event": "connection complete", "pod": pod.key if pod else None,
            "uid": pod.uid if pod else None, "direction": self.direction,
            "listener": listener_of(self.direction, None, hbone),
            "src": str(self.src_addr), "src_workload": src.workload, "src_identity": src.identity,
            "original_dst": original, "route": route, "hbone_target": addr_text(self.dst_hbone_addr),
            "dst_service": dst.service, "dst_workload": dst.workload, "dst_identity": dst.identity,
            "policy": policy_text(self.verdict), "status": self.status,
            "bytes_sent": self.bytes_sent, "bytes_recv": self.bytes_recv,
            "duration_ms": int((time.monotonic() - self.start) * 1000), "error": self.error,
        }


def traffic_labels(record: ConnectionOutcome) -> dict[str, str]:
    """The `TRAFFIC_LABELS` values of a connection, filled as upstream fills them (src/proxy/metrics.rs):
    workload = the xDS workload name, app and canonical service = its canonical name, version and canonical
    revision = its canonical revision; the source principal only when mTLS proved it, the destination's
    from xDS; anything unknown "unknown"."""
    def v(value: str | None) -> str:
        return value or "unknown"

    src, dst = record.src, record.dst
    mtls = src.identity is not None and dst.identity is not None
    return {
        "reporter": record.reporter or ("source" if record.direction == "outbound" else "destination"),
        "source_workload": v(src.workload),
        "source_canonical_service": v(src.canonical_service),
        "source_canonical_revision": v(src.canonical_revision),
        "source_workload_namespace": v(src.namespace),
        "source_principal": v(src.identity),
        "source_app": v(src.canonical_service),
        "source_version": v(src.canonical_revision),
        "source_cluster": v(src.cluster),
        "destination_service": v(dst.service),
        "destination_service_namespace": v(dst.service_namespace),
        "destination_service_name": v(dst.service_name),
        "destination_workload": v(dst.workload),
        "destination_canonical_service": v(dst.canonical_service),
        "destination_canonical_revision": v(dst.canonical_revision),
        "destination_workload_namespace": v(dst.namespace),
        "destination_principal": v(dst.identity or dst.principal),
        "destination_app": v(dst.canonical_service),
        "destination_version": v(dst.canonical_revision),
        "destination_cluster": v(dst.cluster),
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls" if mtls else "unknown",
    }


class _Series:
    """One label set's metric children, looked up once (`Counter.labels()` with 23 labels is ~5 us)."""

    __slots__ = ("_children", "_labels", "_metrics")

    def __init__(self, metrics: Metrics, labels: dict[str, str]) -> None:
        self._metrics = metrics
        self._labels = labels
        self._children: dict[str, Child] = {}

    def child(self, name: str) -> Child:
        """The child of family `name` (an attribute of `Metrics`); created on first use, as before."""
        found = self._children.get(name)
        if found is None:
            family: Family = getattr(self._metrics, name)
            found = self._children[name] = family.labels(**self._labels)
        return found


_SERIES_CACHE_MAX: Final = 4096


class OpenConnections:
    """One pod's open connections, per direction, in the order they opened: the live `ConnectionOutcome`
    records themselves (keyed by identity), added when a connection is counted as opened and removed when
    its outcome is written.

    Bounded by what it holds: an entry lives exactly as long as its connection, and every open connection
    holds at least one file descriptor of its own (the app's socket, outbound; the socket to the app,
    inbound), so the process's fd limit (host.py raises it at start-up) bounds the registry. Nothing is
    copied: a dump reads the records as they are now.
    """

    __slots__ = ("inbound", "outbound")

    def __init__(self) -> None:
        self.inbound: dict[ConnectionOutcome, None] = {}
        self.outbound: dict[ConnectionOutcome, None] = {}

    def _of(self, outcome: ConnectionOutcome) -> dict[ConnectionOutcome, None]:
        return self.outbound if outcome.direction == "outbound" else self.inbound

    def add(self, outcome: ConnectionOutcome) -> None:
        self._of(outcome)[outcome] = None

    def discard(self, outcome: ConnectionOutcome) -> None:
        """Forget `outcome` (nothing happens if it was never added)."""
        self._of(outcome).pop(outcome, None)

    def __len__(self) -> int:
        return len(self.inbound) + len(self.outbound)


class Telemetry:
    """Writes access log lines and updates metrics for connections."""

    def __init__(self, metrics: Metrics | None = None, *, logger: logging.Logger | None = None) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.log = logger if logger is not None else logging.getLogger(ACCESS_LOGGER)
        self._series: dict[tuple[str, Peer, Peer], _Series] = {}
        self.trace = ConnectionTrace()
        self.pod: PodRef | None = None
        """The pod this view writes for (`for_pod`); None for the process's own."""
        self.open = OpenConnections()
        """The connections opened through this view and not yet written: each pod's own (`for_pod`)."""

    def for_pod(self, uid: str, info: WorkloadInfo | None) -> Telemetry:
        """A view for one pod's proxy set: the same metrics, log and trace; its trace events name the pod,
        and it keeps the pod's own open connections."""
        view = copy.copy(self)
        view.pod = PodRef(uid=uid, info=info)
        view.open = OpenConnections()
        return view

    def _series_of(self, record: ConnectionOutcome) -> _Series:
        # The labels depend only on the direction (or reporter) and the two peers (frozen, hashable).
        key = (record.reporter or record.direction, record.src, record.dst)
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= _SERIES_CACHE_MAX:
                self._series.clear()
            series = self._series[key] = _Series(self.metrics, traffic_labels(record))
        return series

    def connection_opened(self, outcome: ConnectionOutcome) -> None:
        outcome.opened = True
        self.open.add(outcome)
        self._series_of(outcome).child("opened").inc()
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("connection opened", extra={"fields": outcome.fields(with_bytes=False)})

    def connection_complete(self, outcome: ConnectionOutcome) -> None:
        """The connection's one access log line (info, or error with `outcome.error`) and its metrics.

        One that never got through (refused by policy, the peer's CONNECT answer, ...) was never counted as
        opened, so it is counted as failed rather than closed.
        """
        self.open.discard(outcome)
        series = self._series_of(outcome)
        series.child("closed" if outcome.opened else "failed").inc()
        series.child("received").inc(outcome.bytes_sent)
        series.child("sent").inc(outcome.bytes_recv)
        fields = outcome.fields(with_bytes=True)
        error = outcome.error
        if error is None:
            if not write_line(self.log, logging.INFO, "connection complete", fields):
                self.log.info("connection complete", extra={"fields": fields})
        else:
            fields.append(("error", truncate_field(error)))
            if not write_line(self.log, logging.ERROR, "connection complete", fields):
                self.log.error("connection complete", extra={"fields": fields})
        if self.trace.subscribers:
            self.trace.publish(self.pod, lambda: outcome.trace_event(self.pod))

    def connection_failed(self, *, src_addr: Display, dst_addr: Display, direction: str, error: str,
                          outcome: ConnectionOutcome | None = None) -> None:
        """A `connection failed` line: the connection never reached the point of having an outcome to log
        (no destination, no workload, refused handshake), or its upstream socket could not be made
        (`outcome` given: counted as failed)."""
        if outcome is not None:
            self.open.discard(outcome)
            self._series_of(outcome).child("failed").inc()
        fields: Sequence[Field] = (("src.addr", src_addr), ("dst.addr", dst_addr), ("direction", direction),
                                   ("error", truncate_field(error)))
        self.log.warning("connection failed", extra={"fields": fields})
        if self.trace.subscribers:
            self.trace.publish(self.pod, lambda: failed_event(self.pod, src_addr=src_addr, dst_addr=dst_addr,
                                                              direction=direction, error=error))
