"""Access logs and traffic metrics in upstream ztunnel's shapes.

Theory of operation
-------------------
The access log's logger is named `access`, so its target is `access`; its lines are written by the one
formatter of every process (`shared.logs`: upstream's plain format, or `LOG_FORMAT=json`).

One `ConnectionRecord` follows a proxied connection: the copy loop bumps its byte counters, and
`Telemetry.connection_complete()` writes the single access log line and the metrics when it ends.
Byte counts in the log are "un-flipped" (bytes_sent = client -> upstream); in the metrics they follow Istio's
convention (received = request direction, sent = response direction).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Final

import msgspec

from shared.logs import Display, Field

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

ACCESS_LOGGER: Final = "access"

# --- connections -------------------------------------------------------------------------------------


class Peer(msgspec.Struct, frozen=True, kw_only=True):
    """What is known about one end of a connection (all optional: unknown ends are logged by address)."""

    workload: str | None = None
    namespace: str | None = None
    identity: str | None = None
    cluster: str | None = None
    service: str | None = None


def format_addr(addr: tuple[str, int] | tuple[str, int, int, int]) -> Display:
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:"):]
    return Display(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


class ConnectionRecord:
    """One proxied connection's facts, filled while it runs; byte counters are bumped by the copy loop."""

    __slots__ = ("bytes_recv", "bytes_sent", "direction", "dst", "dst_addr", "dst_hbone_addr", "src",
                 "src_addr", "start")

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

    def fields(self, *, with_bytes: bool) -> list[Field]:
        fields: list[Field] = [
            ("src.addr", self.src_addr),
            ("src.workload", self.src.workload),
            ("src.namespace", self.src.namespace),
            ("src.identity", self.src.identity),
            ("src.cluster", self.src.cluster),
            ("dst.addr", self.dst_addr),
            ("dst.hbone_addr", self.dst_hbone_addr),
            ("dst.service", self.dst.service),
            ("dst.workload", self.dst.workload),
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


_TRAFFIC_LABELS: Final = (
    "reporter", "source_workload", "source_canonical_service", "source_canonical_revision",
    "source_workload_namespace", "source_principal", "source_app", "source_version", "source_cluster",
    "destination_service", "destination_service_namespace", "destination_service_name",
    "destination_workload", "destination_canonical_service", "destination_canonical_revision",
    "destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
    "destination_cluster", "request_protocol", "response_flags", "connection_security_policy",
)


class _Child:
    """One label set's value of a family (what prometheus_client's `labels()` returns, minus its lock: the
    process is single-threaded)."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _Family:
    """A counter or gauge family with prometheus_client's interface (`labels(**values)`, or `inc()` /
    `set()` on a family without labels); exported by `Metrics.registry`'s collector."""

    def __init__(self, kind: str, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], _Child] = {}
        if not self.labelnames:
            self.children[()] = _Child()

    def labels(self, **values: str) -> _Child:
        if set(values) != set(self.labelnames):
            raise ValueError(f"{self.name}: incorrect label names {sorted(values)}")
        key = tuple(str(values[name]) for name in self.labelnames)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = _Child()
        return child

    def _unlabelled(self) -> _Child:
        if self.labelnames:
            raise ValueError(f"{self.name}: no label values given")
        return self.children[()]

    def inc(self, amount: float = 1) -> None:
        self._unlabelled().inc(amount)

    def set(self, value: float) -> None:
        self._unlabelled().set(value)


class _Collector:
    """Turns the families into prometheus_client metric families at scrape time (what its Counter and Gauge
    would have exported: `_total` and `_created` samples per counter child)."""

    def __init__(self, families: Sequence[_Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        from prometheus_client import metrics as prometheus_metrics
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        created = prometheus_metrics._use_created  # as its Counter: PROMETHEUS_DISABLE_CREATED_SERIES
        for family in self._families:
            if family.kind == "counter":
                counter = CounterMetricFamily(family.name, family.documentation, labels=family.labelnames)
                for key, child in list(family.children.items()):
                    counter.add_metric(key, child.value, child.created if created else None)
                yield counter
            else:
                gauge = GaugeMetricFamily(family.name, family.documentation, labels=family.labelnames)
                for key, child in list(family.children.items()):
                    gauge.add_metric(key, child.value)
                yield gauge


class Metrics:
    """The Prometheus families ztunnel exports.

    Counting is plain Python (`_Family`); prometheus_client (about 2.3 MiB resident with the http.server,
    email and urllib modules its package imports) is only imported when `registry` is first read, that is at
    the first scrape of the stats endpoint.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        counter, gauge, traffic = partial(_Family, "counter"), partial(_Family, "gauge"), _TRAFFIC_LABELS
        self.opened = counter("istio_tcp_connections_opened", "The total number of TCP connections opened",
                              traffic)
        self.closed = counter("istio_tcp_connections_closed", "The total number of TCP connections closed",
                              traffic)
        self.sent = counter("istio_tcp_sent_bytes", "The size of total bytes sent during response in case of "
                            "a TCP connection", traffic)
        self.received = counter("istio_tcp_received_bytes", "The size of total bytes received during request "
                                "in case of a TCP connection", traffic)
        self.failed = counter("istio_tcp_connections_failed", "The total number of TCP connections that "
                              "failed to establish", traffic)
        self.active_proxies = gauge("istio_active_proxy_count", "The total number of active workload proxies")
        self.proxies_started = counter("istio_proxies_started", "The total number of proxies started")
        self.proxies_stopped = counter("istio_proxies_stopped", "The total number of proxies stopped")
        self._registry = registry
        if registry is not None:
            registry.register(self._collector())

    def _collector(self) -> _Collector:
        return _Collector([self.opened, self.closed, self.sent, self.received, self.failed,
                           self.active_proxies, self.proxies_started, self.proxies_stopped])

    @property
    def registry(self) -> CollectorRegistry:
        """The registry the families are exported on (made, and prometheus_client imported, on first use)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry()
            self._registry.register(self._collector())
        return self._registry

    @staticmethod
    def labels_of(record: ConnectionRecord) -> dict[str, str]:
        def v(value: str | None) -> str:
            return value or "unknown"

        mtls = record.src.identity is not None and record.dst.identity is not None
        return {
            "reporter": "source" if record.direction == "outbound" else "destination",
            "source_workload": v(record.src.workload),
            "source_canonical_service": v(record.src.workload),
            "source_canonical_revision": "latest" if record.src.workload else "unknown",
            "source_workload_namespace": v(record.src.namespace),
            "source_principal": v(record.src.identity),
            "source_app": v(record.src.workload),
            "source_version": "latest" if record.src.workload else "unknown",
            "source_cluster": v(record.src.cluster),
            "destination_service": v(record.dst.service),
            "destination_service_namespace": v(record.dst.namespace if record.dst.service else None),
            "destination_service_name": v(record.dst.service.split(".")[0] if record.dst.service else None),
            "destination_workload": v(record.dst.workload),
            "destination_canonical_service": v(record.dst.workload),
            "destination_canonical_revision": "latest" if record.dst.workload else "unknown",
            "destination_workload_namespace": v(record.dst.namespace),
            "destination_principal": v(record.dst.identity),
            "destination_app": v(record.dst.workload),
            "destination_version": "latest" if record.dst.workload else "unknown",
            "destination_cluster": v(record.dst.cluster),
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
        self._children: dict[str, _Child] = {}

    def child(self, name: str) -> _Child:
        """The child of family `name` (an attribute of `Metrics`); created on first use, as before."""
        found = self._children.get(name)
        if found is None:
            family: _Family = getattr(self._metrics, name)
            found = self._children[name] = family.labels(**self._labels)
        return found


_SERIES_CACHE_MAX: Final = 4096


class Telemetry:
    """Writes access log lines and updates metrics for connections."""

    def __init__(self, metrics: Metrics | None = None, *, logger: logging.Logger | None = None) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.log = logger if logger is not None else logging.getLogger(ACCESS_LOGGER)
        self._series: dict[tuple[str, Peer, Peer], _Series] = {}

    def _series_of(self, record: ConnectionRecord) -> _Series:
        # The labels depend only on the direction and the two peers (frozen, hashable).
        key = (record.direction, record.src, record.dst)
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= _SERIES_CACHE_MAX:
                self._series.clear()
            series = self._series[key] = _Series(self.metrics, Metrics.labels_of(record))
        return series

    def connection_opened(self, record: ConnectionRecord) -> None:
        self._series_of(record).child("opened").inc()
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("connection opened", extra={"fields": record.fields(with_bytes=False)})

    def connection_complete(self, record: ConnectionRecord, error: str | None = None, *,
                            opened: bool = True) -> None:
        """The connection's one access log line (info, or error with `error=`) and its metrics.

        `opened=False`: it never got through (refused by policy, the peer's CONNECT answer, ...): counted
        as failed rather than closed, since it was never counted as opened.
        """
        series = self._series_of(record)
        series.child("closed" if opened else "failed").inc()
        series.child("received").inc(record.bytes_sent)
        series.child("sent").inc(record.bytes_recv)
        fields = record.fields(with_bytes=True)
        if error is None:
            self.log.info("connection complete", extra={"fields": fields})
        else:
            fields.append(("error", error))
            self.log.error("connection complete", extra={"fields": fields})

    def connection_failed(self, *, src_addr: Display, dst_addr: Display, direction: str, error: str,
                          record: ConnectionRecord | None = None) -> None:
        if record is not None:
            self._series_of(record).child("failed").inc()
        fields: Sequence[Field] = (("src.addr", src_addr), ("dst.addr", dst_addr), ("direction", direction),
                                   ("error", error))
        self.log.warning("connection failed", extra={"fields": fields})
