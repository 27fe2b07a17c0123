"""The Prometheus families ztunnel exports, counted in plain Python and rendered by prometheus_client.

Theory of operation
-------------------
Counting happens on the data path, so it is a dict look-up and a float add (`Family.labels()` -> `Child`);
prometheus_client (about 2.3 MiB resident with the modules its package imports) is imported only when
`Metrics.registry` is first read, at the first scrape, and `_Collector` turns the families into its metric
families then. Which label values a connection gets is the access log's business (access_log.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

TRAFFIC_LABELS: Final = (
    "reporter", "source_workload", "source_canonical_service", "source_canonical_revision",
    "source_workload_namespace", "source_principal", "source_app", "source_version", "source_cluster",
    "destination_service", "destination_service_namespace", "destination_service_name",
    "destination_workload", "destination_canonical_service", "destination_canonical_revision",
    "destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
    "destination_cluster", "request_protocol", "response_flags", "connection_security_policy",
)
DNS_LABELS: Final = (
    "request_query_type", "request_protocol", "source_canonical_service", "source_canonical_revision",
    "source_workload", "source_workload_namespace",
)
DNS_DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.1, 1.0, 5.0)


class Child:
    """One label set's value of a family (what prometheus_client's `labels()` returns, minus its lock: the
    process is single-threaded)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount

    def set(self, value: float) -> None:
        self.value = float(value)


def _label_key(name: str, labelnames: tuple[str, ...], values: dict[str, str]) -> tuple[str, ...]:
    """The child key of a label set; ValueError when the names are not the family's."""
    if set(values) != set(labelnames):
        raise ValueError(f"{name}: incorrect label names {sorted(values)}")
    return tuple(str(values[label]) for label in labelnames)


class HistogramChild:
    """One label set's observations of a histogram family: cumulative bucket counts, sum and count."""

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.count += 1
        self.sum += value


class Histogram:
    """A histogram family (`labels(**values).observe(seconds)`), exported like prometheus_client's."""

    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(sorted(buckets))
        self.children: dict[tuple[str, ...], HistogramChild] = {}

    def labels(self, **values: str) -> HistogramChild:
        key = _label_key(self.name, self.labelnames, values)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = HistogramChild(self.buckets)
        return child


class Family:
    """A counter or gauge family with prometheus_client's interface (`labels(**values)`, or `inc()` /
    `set()` on a family without labels); exported by `Metrics.registry`'s collector."""

    def __init__(self, kind: str, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], Child] = {}
        if not self.labelnames:
            self.children[()] = Child()

    def labels(self, **values: str) -> Child:
        key = _label_key(self.name, self.labelnames, values)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = Child()
        return child

    def _unlabelled(self) -> Child:
        if self.labelnames:
            raise ValueError(f"{self.name}: no label values given")
        return self.children[()]

    def inc(self, amount: float = 1) -> None:
        self._unlabelled().inc(amount)

    def set(self, value: float) -> None:
        self._unlabelled().set(value)


class _Collector:
    """Turns the families into prometheus_client metric families at scrape time (what its Counter and Gauge
    export with `_created` series disabled: one `_total` sample per counter child, as upstream ztunnel)."""

    def __init__(self, families: Sequence[Family | Histogram]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        for family in self._families:
            if isinstance(family, Histogram):
                histogram = HistogramMetricFamily(family.name, family.documentation, labels=family.labelnames)
                for key, hist in list(family.children.items()):
                    bounds = [*(format(b, "g") for b in hist.buckets), "+Inf"]
                    counts = [*hist.counts, hist.count]
                    histogram.add_metric(list(key), list(zip(bounds, counts, strict=True)), hist.sum)
                yield histogram
            elif family.kind == "counter":
                counter = CounterMetricFamily(family.name, family.documentation, labels=family.labelnames)
                for key, child in list(family.children.items()):
                    counter.add_metric(key, child.value)
                yield counter
            else:
                gauge = GaugeMetricFamily(family.name, family.documentation, labels=family.labelnames)
                for key, child in list(family.children.items()):
                    gauge.add_metric(key, child.value)
                yield gauge


def build_tag() -> str:
    """`istio_build`'s `tag`: upstream puts the Istio release there; ours is this project's version."""
    from importlib import metadata

    try:
        return metadata.version("trio-ambient")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class Metrics:
    """The Prometheus families ztunnel exports.

    Counting is plain Python (`Family`); prometheus_client (about 2.3 MiB resident with the http.server,
    email and urllib modules its package imports) is only imported when `registry` is first read, that is at
    the first scrape of the stats endpoint.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        counter, gauge, traffic = partial(Family, "counter"), partial(Family, "gauge"), TRAFFIC_LABELS
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
        self.connections_refused = counter(
            "istio_tcp_connections_refused", "The total number of TCP connections ztunnel refused because "
            "a pod or the process held as many as its limit allows (ours: upstream has no such limit)",
            ("reason",))
        self.active_proxies = gauge("istio_active_proxy_count", "The total number of active workload proxies")
        self.proxies_started = counter("istio_proxies_started", "The total number of proxies started")
        self.proxies_stopped = counter("istio_proxies_stopped", "The total number of proxies stopped")
        self.build = gauge("istio_build", "Istio component build info", ("component", "tag"))
        self.dns_requests = counter("istio_dns_requests", "Total number of DNS requests", DNS_LABELS)
        self.dns_upstream_requests = counter("istio_dns_upstream_requests", "Total number of DNS requests "
                                             "forwarded to upstream", DNS_LABELS)
        self.dns_upstream_failures = counter("istio_dns_upstream_failures", "Total number of DNS requests "
                                             "that failed to forward upstream", DNS_LABELS)
        self.dns_upstream_duration = Histogram("istio_dns_upstream_request_duration_seconds", "Total time in "
                                               "seconds ztunnel takes to get a DNS response from upstream",
                                               DNS_LABELS, DNS_DURATION_BUCKETS)
        self._registry = registry
        if registry is not None:
            registry.register(self._collector())

    def _collector(self) -> _Collector:
        """Made once prometheus_client is imported (the registry's first use)."""
        from prometheus_client import disable_created_metrics

        disable_created_metrics()  # type: ignore[no-untyped-call]  # upstream exports no `_created` series; nor do prometheus_client's here
        self.build.labels(component="ztunnel", tag=build_tag()).set(1)
        return _Collector([self.opened, self.closed, self.sent, self.received, self.failed,
                           self.connections_refused,
                           self.active_proxies, self.proxies_started, self.proxies_stopped, self.build,
                           self.dns_requests, self.dns_upstream_requests, self.dns_upstream_failures,
                           self.dns_upstream_duration])

    @property
    def registry(self) -> CollectorRegistry:
        """The registry the families are exported on (made, and prometheus_client imported, on first use)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry()
            self._registry.register(self._collector())
        return self._registry
