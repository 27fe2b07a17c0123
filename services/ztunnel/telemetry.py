"""Access logs and traffic metrics in upstream ztunnel's shapes.

Theory of operation
-------------------
Logging goes through the standard `logging` module so that `/logging?level=` can change levels at run time;
`UpstreamFormatter` renders a record the way ztunnel's tracing subscriber does (SPEC §6):

    <RFC3339 UTC µs>\\t<level>\\t<target>\\t<message>\\t<k=v k=v ...>

Structured fields travel in `record.fields` (a sequence of `(key, value)` pairs, in order). A `str` value is
written Debug-quoted like Rust's `{:?}`, an `int` or a `Display` value bare (Rust's `%value`), `None` is
left out. The access log's logger is named `access`, so its target is `access`; other loggers `a.b.c` are
written as `a::b::c` the way Rust module paths look. `LOG_FORMAT=json` switches to one JSON object per line.

One `ConnectionRecord` follows a proxied connection: the copy loop bumps its byte counters, and
`Telemetry.connection_complete()` writes the single access log line and the metrics when it ends.
Byte counts in the log are "un-flipped" (bytes_sent = client -> upstream); in the metrics they follow Istio's
convention (received = request direction, sent = response direction).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import msgspec

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

ACCESS_LOGGER: Final = "access"

_LEVEL_NAMES: Final = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

LEVELS: Final = {"trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
                 "error": logging.ERROR, "off": logging.CRITICAL + 10}


class Display(str):
    """A value written bare, like Rust's `%value` (addresses, enum-like words)."""

    __slots__ = ()


Field = tuple[str, object]


def debug_quote(value: str) -> str:
    """Rust's `{:?}` for a string: double quotes, with `"`, `\\` and control characters escaped."""
    if value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'  # the common case (names, identities), without the per-character loop
    out = ['"']
    for ch in value:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\0":
            out.append("\\0")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _render_value(value: object) -> str:
    if isinstance(value, Display):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return debug_quote(value)
    return str(value)


def format_timestamp(epoch: float) -> str:
    """RFC3339 in UTC with microseconds and a `Z`, as upstream prints it."""
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_plain(*, epoch: float, level: str, target: str, message: str, fields: Iterable[Field] = ()) -> str:
    """One log line in upstream's plain format (without the newline)."""
    parts = [f"{key}={_render_value(value)}" for key, value in fields if value is not None]
    line = f"{format_timestamp(epoch)}\t{level}\t{target}\t{message}"
    return f"{line}\t{' '.join(parts)}" if parts else line


def format_json(*, epoch: float, level: str, target: str, message: str, fields: Iterable[Field] = ()) -> str:
    """One log line as a JSON object: level, time, scope, message, then the fields in order."""
    obj: dict[str, Any] = {"level": level, "time": format_timestamp(epoch), "scope": target,
                           "message": message}
    for key, value in fields:
        if value is None:
            continue
        obj[key] = str(value) if isinstance(value, Display) else value
    return json.dumps(obj, separators=(",", ":"))


def target_of(logger_name: str) -> str:
    return logger_name.replace(".", "::")


class UpstreamFormatter(logging.Formatter):
    """Formats every record like ztunnel; structured fields come from `extra={"fields": [...]}`."""

    def __init__(self, *, json_format: bool = False) -> None:
        super().__init__()
        self.json_format = json_format

    def format(self, record: logging.LogRecord) -> str:
        fields: list[Field] = list(getattr(record, "fields", ()))
        message = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            fields.append(("error", self.formatException(record.exc_info).splitlines()[-1]))
        render = format_json if self.json_format else format_plain
        level = _LEVEL_NAMES.get(record.levelno, "trace" if record.levelno <= TRACE else "info")
        return render(epoch=record.created, level=level, target=target_of(record.name), message=message,
                      fields=fields)


def setup_logging(*, json_format: bool, level: str = "info", stream: Any = None) -> logging.Handler:
    """Install the upstream formatter on the root logger (stderr by default). Returns the handler."""
    # Our format uses none of the caller, thread or process fields: not collecting them saves a fifth of an
    # access log line's cost (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(UpstreamFormatter(json_format=json_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level, logging.INFO))
    return handler


def set_log_level(spec: str) -> str:
    """Apply `/logging?level=` syntax: `info`, or `target=level,target=level` (targets with `::`).

    Returns:
        a one-line description of the resulting levels.
    Raises:
        ValueError: an unknown level name.
    """
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        target, _, name = item.rpartition("=")
        if name.lower() not in LEVELS:
            raise ValueError(f"unknown log level {name!r} (expected one of {', '.join(LEVELS)})")
        logger = logging.getLogger(target.replace("::", ".")) if target else logging.getLogger()
        logger.setLevel(LEVELS[name.lower()])
    return current_log_levels()


def current_log_levels() -> str:
    names = {v: k for k, v in LEVELS.items()}
    root = logging.getLogger()
    parts = [names.get(root.level, str(root.level))]
    for name, logger in sorted(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            parts.append(f"{target_of(name)}={names.get(logger.level, str(logger.level))}")
    return ",".join(parts)


# --- parsing back (tests, tools) -----------------------------------------------------------------------


class ParsedLine(msgspec.Struct, frozen=True, kw_only=True):
    timestamp: str
    level: str
    target: str
    message: str
    fields: dict[str, str | int]


def _parse_fields(text: str) -> dict[str, str | int]:
    fields: dict[str, str | int] = {}
    i = 0
    n = len(text)
    while i < n:
        while i < n and text[i] == " ":
            i += 1
        if i >= n:
            break
        eq = text.index("=", i)
        key = text[i:eq]
        i = eq + 1
        if i < n and text[i] == '"':
            i += 1
            buf = []
            while text[i] != '"':
                if text[i] == "\\":
                    nxt = text[i + 1]
                    if nxt == "u":
                        end = text.index("}", i)
                        buf.append(chr(int(text[i + 3:end], 16)))
                        i = end + 1
                        continue
                    buf.append({"n": "\n", "r": "\r", "t": "\t", "0": "\0"}.get(nxt, nxt))
                    i += 2
                    continue
                buf.append(text[i])
                i += 1
            i += 1
            fields[key] = "".join(buf)
        else:
            end = text.find(" ", i)
            end = n if end < 0 else end
            raw = text[i:end]
            fields[key] = int(raw) if raw.isdigit() else raw
            i = end
    return fields


def parse_plain(line: str) -> ParsedLine:
    """Parse one plain-format line back (inverse of `format_plain`); quoted values come back unescaped."""
    parts = line.rstrip("\n").split("\t", 4)
    if len(parts) < 4:
        raise ValueError(f"not an upstream-format log line: {line!r}")
    fields = _parse_fields(parts[4]) if len(parts) == 5 else {}
    return ParsedLine(timestamp=parts[0], level=parts[1], target=parts[2], message=parts[3], fields=fields)


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
