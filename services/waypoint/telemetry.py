"""The waypoint's per-request access log line and request metrics (its tunnels use ztunnel's telemetry).

Theory of operation
-------------------
Each HTTP request ends in one `RequestOutcome`: `WaypointTelemetry.request_complete` writes the line
(logger `access`, message `request complete`, fields in docs/waypoint-proxy.md) and counts
`istio_requests_total` and `istio_request_duration_milliseconds` with `reporter="waypoint"` and Istio's
standard labels (the L4 traffic labels, `request_protocol="http"`, plus `response_code` and
`grpc_response_status`). Every tunnel (HTTP or opaque TCP) ends in ztunnel's `ConnectionOutcome`
(`connection complete`, the `istio_tcp_*` families), also reported as `waypoint`.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from services.ztunnel.telemetry.access_log import ConnectionOutcome, Peer, Telemetry, traffic_labels
from services.ztunnel.telemetry.metrics import TRAFFIC_LABELS, Family, Histogram, Metrics, _Collector
from shared.logs import Display, Field

REPORTER: Final = "waypoint"
REQUEST_LABELS: Final = (*TRAFFIC_LABELS, "response_code", "grpc_response_status")
DURATION_BUCKETS_MS: Final = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                              300000, 600000, 1800000, 3600000)
"""Istio's default buckets for `istio_request_duration_milliseconds`."""


class WaypointMetrics(Metrics):
    """ztunnel's families (the waypoint's L4 tunnels count there) plus the request families."""

    def __init__(self) -> None:
        self.requests = Family("counter", "istio_requests", "Count of requests", REQUEST_LABELS)
        self.request_duration = Histogram("istio_request_duration_milliseconds", "Duration of requests",
                                          REQUEST_LABELS, DURATION_BUCKETS_MS)
        super().__init__()

    def _collector(self) -> _Collector:
        base = super()._collector()
        return _Collector([*base._families, self.requests, self.request_duration])


class RequestOutcome:
    """One HTTP request through the waypoint, from its head to the end of its response."""

    __slots__ = ("authority", "bytes_received", "bytes_sent", "dst", "method", "path", "protocol",
                 "response_flags", "route_name", "src", "src_addr", "start", "status", "upstream_host")

    def __init__(self, *, src_addr: Display, src: Peer, dst: Peer, method: str, path: str, authority: str,
                 protocol: str = "HTTP/1.1") -> None:
        self.src_addr = src_addr
        self.src = src
        self.dst = dst
        """The destination: the service, then the endpoint workload once one is chosen."""
        self.method = method
        self.path = path
        self.authority = authority
        self.protocol = protocol
        self.status = 0
        self.response_flags = "-"
        self.upstream_host: str | None = None
        self.route_name: str | None = None
        self.bytes_received = 0
        """Request body bytes from the client."""
        self.bytes_sent = 0
        """Response body bytes to the client."""
        self.start = time.monotonic()

    def fields(self, duration_ms: int) -> list[Field]:
        return [
            ("src.addr", self.src_addr),
            ("src.workload", self.src.name or self.src.workload),
            ("src.namespace", self.src.namespace),
            ("src.identity", self.src.identity),
            ("dst.service", self.dst.service),
            ("dst.workload", self.dst.name or self.dst.workload),
            ("dst.namespace", self.dst.namespace),
            ("dst.identity", self.dst.identity),
            ("upstream_host", self.upstream_host),
            ("method", self.method),
            ("path", self.path),
            ("protocol", self.protocol),
            ("authority", self.authority),
            ("response_code", self.status),
            ("response_flags", self.response_flags),
            ("route_name", self.route_name),
            ("bytes_received", self.bytes_received),
            ("bytes_sent", self.bytes_sent),
            ("duration", f"{duration_ms}ms"),
        ]

    def labels(self) -> dict[str, str]:
        record = ConnectionOutcome(direction="inbound", src_addr=self.src_addr, dst_addr=self.src_addr,
                                   src=self.src, dst=self.dst)
        record.reporter = REPORTER
        labels = traffic_labels(record)
        labels.update(request_protocol="http", response_code=str(self.status), grpc_response_status="",
                      response_flags=self.response_flags)
        return labels


class WaypointTelemetry(Telemetry):
    """ztunnel's Telemetry (the L4 lines and families) with the request line and families."""

    metrics: WaypointMetrics

    def __init__(self, metrics: WaypointMetrics | None = None, *,
                 logger: logging.Logger | None = None) -> None:
        super().__init__(metrics if metrics is not None else WaypointMetrics(), logger=logger)

    def request_complete(self, outcome: RequestOutcome) -> None:
        elapsed = (time.monotonic() - outcome.start) * 1000
        labels = outcome.labels()
        self.metrics.requests.labels(**labels).inc()
        self.metrics.request_duration.labels(**labels).observe(elapsed)
        self.log.info("request complete", extra={"fields": outcome.fields(int(elapsed))})
