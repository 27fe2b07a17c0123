"""Access log lines in upstream ztunnel's format, formatted and parsed back; metrics labels."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.ztunnel.telemetry.access_log import (
    ConnectionOutcome,
    Peer,
    Telemetry,
    format_addr,
    traffic_labels,
)
from services.ztunnel.telemetry.metrics import Metrics, build_tag
from shared.logs import (
    Display,
    UpstreamFormatter,
    debug_quote,
    format_plain,
    format_timestamp,
    set_log_level,
    write_line,
)
from tests.access_logs import parse_plain

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def test_plain_line_matches_upstream_example_shape() -> None:
    line = format_plain(
        epoch=1_700_000_000.123456, level="info", target="access", message="connection complete",
        fields=[
            ("src.addr", Display("10.0.0.1:40000")), ("src.workload", "a"), ("src.namespace", "ns"),
            ("src.identity", "spiffe://cluster.local/ns/ns/sa/a"), ("src.cluster", None),
            ("dst.addr", Display("10.0.0.2:15008")), ("dst.hbone_addr", Display("10.0.0.2:8080")),
            ("dst.workload", "b"), ("dst.namespace", "ns"), ("dst.identity", "spiffe://cluster.local/ns/ns/sa/b"),
            ("direction", "outbound"), ("bytes_sent", 10), ("bytes_recv", 20), ("duration", "3ms"),
        ])
    assert line == (
        "2023-11-14T22:13:20.123456Z\tinfo\taccess\tconnection complete\t"
        'src.addr=10.0.0.1:40000 src.workload="a" src.namespace="ns" '
        'src.identity="spiffe://cluster.local/ns/ns/sa/a" '
        'dst.addr=10.0.0.2:15008 dst.hbone_addr=10.0.0.2:8080 dst.workload="b" dst.namespace="ns" '
        'dst.identity="spiffe://cluster.local/ns/ns/sa/b" direction="outbound" bytes_sent=10 bytes_recv=20 '
        'duration="3ms"'
    )


@pytest.mark.parametrize("epoch", [
    1_700_000_000.123456, 1_700_000_000.9999996, 1_700_000_001.0000004, 1_700_000_000.0000005,
    1.9999996, 0.0, -0.0000004, -1.5, 2_000_000_000.5,
])
def test_timestamps_are_what_datetime_formats(epoch: float) -> None:
    # The date part is kept per second: every line of the same second, and a rounding carry into the next
    # second, must still read exactly as datetime writes them.
    expected = dt.datetime.fromtimestamp(epoch, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert format_timestamp(epoch) == expected
    assert format_timestamp(epoch + 0.25) == dt.datetime.fromtimestamp(
        epoch + 0.25, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert format_timestamp(epoch) == expected


def test_repeated_field_values_render_the_same_and_display_values_stay_bare() -> None:
    fields: list[tuple[str, object]] = [("src.workload", "a"), ("dst.addr", Display("10.0.0.2:15008")),
                                        ("src.identity", 'quo"te'), ("n", 3)]
    first = format_plain(epoch=0, level="info", target="access", message="m", fields=fields)
    again = format_plain(epoch=0, level="info", target="access", message="m", fields=fields)
    as_display = format_plain(epoch=0, level="info", target="access", message="m",
                              fields=[("src.workload", Display("a"))])
    assert first == again
    assert first.endswith('\tsrc.workload="a" dst.addr=10.0.0.2:15008 src.identity="quo\\"te" n=3')
    assert as_display.endswith("\tsrc.workload=a")


@pytest.mark.parametrize("value,quoted", [
    ("plain", '"plain"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("line\nbreak\ttab", '"line\\nbreak\\ttab"'),
    ("bell\x07", '"bell\\u{7}"'),
    ("ünïcode", '"ünïcode"'),
])
def test_debug_quoting_round_trips(value: str, quoted: str) -> None:
    assert debug_quote(value) == quoted
    line = format_plain(epoch=0, level="info", target="access", message="m", fields=[("k", value), ("n", 5)])
    assert parse_plain(line).fields == {"k": value, "n": 5}


def test_addresses_are_bare_and_ipv6_bracketed() -> None:
    assert format_addr(("10.1.2.3", 80)) == "10.1.2.3:80"
    assert format_addr(("::ffff:10.1.2.3", 80)) == "10.1.2.3:80"
    assert format_addr(("fd00::1", 443, 0, 0)) == "[fd00::1]:443"


def record(error: str | None = None) -> ConnectionOutcome:
    rec = ConnectionOutcome(direction="outbound", src_addr=Display("10.0.0.1:40000"),
                           dst_addr=Display("10.0.0.2:9080"), src=Peer(workload="a", namespace="ns"),
                           dst=Peer())
    rec.bytes_sent, rec.bytes_recv = 123, 4567
    rec.error = error
    return rec


def capture(json_format: bool = False) -> tuple[Telemetry, io.StringIO]:
    out = io.StringIO()
    logger = logging.Logger("access", level=logging.DEBUG)  # a private logger: no global state touched
    handler = logging.StreamHandler(out)
    handler.setFormatter(UpstreamFormatter(json_format=json_format))
    logger.addHandler(handler)
    return Telemetry(Metrics(), logger=logger), out


def test_connection_complete_success_line_parses_back() -> None:
    tel, out = capture()
    tel.connection_complete(record())
    (line,) = out.getvalue().splitlines()
    parsed = parse_plain(line)
    assert TS.match(parsed.timestamp)
    assert (parsed.level, parsed.target, parsed.message) == ("info", "access", "connection complete")
    assert list(parsed.fields) == ["src.addr", "src.workload", "src.namespace", "dst.addr", "direction",
                                   "bytes_sent", "bytes_recv", "duration"]
    assert parsed.fields["bytes_sent"] == 123 and parsed.fields["bytes_recv"] == 4567
    assert parsed.fields["src.addr"] == "10.0.0.1:40000"
    assert re.fullmatch(r"\d+ms", str(parsed.fields["duration"]))
    assert '\tsrc.addr=10.0.0.1:40000 src.workload="a"' in line


def test_the_direct_line_writer_writes_what_logging_writes_and_steps_aside_otherwise() -> None:
    def private(json_format: bool = False) -> tuple[logging.Logger, io.StringIO]:
        out = io.StringIO()
        logger = logging.Logger("access", level=logging.INFO)
        handler = logging.StreamHandler(out)
        handler.setFormatter(UpstreamFormatter(json_format=json_format))
        logger.addHandler(handler)
        return logger, out

    fields: list[tuple[str, object]] = [("src.addr", Display("10.0.0.1:40000")), ("src.workload", "a"),
                                        ("bytes_sent", 5), ("error", None)]
    logger, out = private()
    assert write_line(logger, logging.ERROR, "connection complete", fields)
    logger.error("connection complete", extra={"fields": fields})
    direct, logged = out.getvalue().splitlines()
    assert direct.split("\t", 1)[1] == logged.split("\t", 1)[1]
    assert TS.match(direct.split("\t", 1)[0])

    assert not write_line(logger, logging.DEBUG, "m", fields)  # below the level: nothing written
    json_logger, json_out = private(json_format=True)
    assert not write_line(json_logger, logging.INFO, "m", fields)
    logger.addHandler(logging.StreamHandler(io.StringIO()))  # two handlers: logging's own path
    assert not write_line(logger, logging.INFO, "m", fields)
    filtered, filtered_out = private()
    filtered.handlers[0].addFilter(lambda record: False)
    assert not write_line(filtered, logging.INFO, "m", fields)
    assert out.getvalue().count("\n") == 2 and not json_out.getvalue() and not filtered_out.getvalue()


def test_connection_complete_failure_is_error_with_trailing_error_field() -> None:
    tel, out = capture()
    tel.connection_complete(record(error="io error: Connection refused (os error 111)"))
    line = out.getvalue().rstrip("\n")
    parsed = parse_plain(line)
    assert parsed.level == "error"
    assert list(parsed.fields)[-1] == "error"
    assert line.endswith(' error="io error: Connection refused (os error 111)"')


def test_connection_failed_is_warn_with_early_deny_fields() -> None:
    tel, out = capture()
    tel.connection_failed(src_addr=Display("10.0.0.9:1234"), dst_addr=Display("10.0.0.2:15001"),
                          direction="inbound", error="attempted recursive call to ourselves")
    parsed = parse_plain(out.getvalue())
    assert (parsed.level, parsed.message) == ("warn", "connection failed")
    assert list(parsed.fields) == ["src.addr", "dst.addr", "direction", "error"]


def test_connection_opened_is_debug() -> None:
    tel, out = capture()
    tel.connection_opened(record())
    parsed = parse_plain(out.getvalue())
    assert (parsed.level, parsed.message) == ("debug", "connection opened")
    assert "bytes_sent" not in parsed.fields


def test_each_pod_view_keeps_its_open_connections_until_they_are_written() -> None:
    tel, _ = capture()
    pod_a, pod_b = tel.for_pod("a", None), tel.for_pod("b", None)
    out1, out2 = record(), record()
    inb = ConnectionOutcome(direction="inbound", src_addr=Display("10.0.0.2:40001"),
                            dst_addr=Display("10.0.0.1:8080"))
    for view, outcome in ((pod_a, out1), (pod_a, inb), (pod_a, out2)):
        view.connection_opened(outcome)
    pod_b.connection_opened(other := record())
    assert list(pod_a.open.outbound) == [out1, out2] and list(pod_a.open.inbound) == [inb]
    assert list(pod_b.open.outbound) == [other] and len(pod_b.open) == 1
    assert len(tel.open) == 0  # the process's own view holds none of the pods'
    pod_a.connection_complete(out1)
    pod_a.connection_complete(inb)
    assert list(pod_a.open.outbound) == [out2] and not pod_a.open.inbound
    # a connection that never opened (refused, or no upstream socket) is written without having been held
    never = record()
    pod_a.connection_complete(never)
    pod_a.connection_failed(src_addr=never.src_addr, dst_addr=never.dst_addr, direction="outbound",
                            error="cannot create the upstream socket", outcome=never)
    assert list(pod_a.open.outbound) == [out2]
    pod_a.connection_failed(src_addr=out2.src_addr, dst_addr=out2.dst_addr, direction="outbound",
                            error="x", outcome=out2)
    pod_b.connection_complete(other)
    assert len(pod_a.open) == len(pod_b.open) == 0


def test_open_connections_hold_the_records_not_copies() -> None:
    tel, _ = capture()
    view = tel.for_pod("a", None)
    held = [record() for _ in range(1000)]
    for outcome in held:
        view.connection_opened(outcome)
    held[500].bytes_sent = 9
    assert next(o for i, o in enumerate(view.open.outbound) if i == 500).bytes_sent == 9
    for outcome in reversed(held):
        view.connection_complete(outcome)
    assert len(view.open) == 0


def test_json_format() -> None:
    tel, out = capture(json_format=True)
    tel.connection_complete(record(error="boom"))
    obj = json.loads(out.getvalue())
    assert obj["level"] == "error" and obj["scope"] == "access" and obj["message"] == "connection complete"
    assert TS.match(obj["time"])
    assert obj["src.addr"] == "10.0.0.1:40000" and obj["bytes_sent"] == 123 and obj["error"] == "boom"
    assert list(obj)[:4] == ["level", "time", "scope", "message"]


def test_metrics_count_connections_and_bytes_with_istio_convention() -> None:
    tel, _ = capture()
    rec = record()
    tel.connection_opened(rec)
    tel.connection_complete(rec)
    text = generate_latest(tel.metrics.registry).decode()
    assert re.search(r'^istio_tcp_connections_opened_total\{.*reporter="source".*\} 1\.0$', text, re.M)
    assert re.search(r'^istio_tcp_connections_closed_total\{.*source_workload="a".*\} 1\.0$', text, re.M)
    # received = request direction (client -> upstream), sent = response direction.
    assert re.search(r"^istio_tcp_received_bytes_total\{.*\} 123\.0$", text, re.M)
    assert re.search(r"^istio_tcp_sent_bytes_total\{.*\} 4567\.0$", text, re.M)


def test_metrics_export_what_prometheus_client_counters_and_gauges_would() -> None:
    tel, _ = capture()
    rec = record()
    tel.connection_opened(rec)
    tel.connection_complete(rec)
    rec.error, rec.opened = "boom", False  # the same ends, never got through: counted as failed
    tel.connection_complete(rec)
    tel.metrics.proxies_started.inc()
    tel.metrics.active_proxies.set(3)

    reference = CollectorRegistry()
    labels = traffic_labels(rec)
    for attr in ("opened", "closed", "sent", "received", "failed"):
        family = getattr(tel.metrics, attr)
        counter = Counter(family.name, family.documentation, family.labelnames, registry=reference)
        if attr == "sent":
            counter.labels(**labels).inc(4567 * 2)
        elif attr == "received":
            counter.labels(**labels).inc(123 * 2)
        else:
            counter.labels(**labels).inc()
    refused = tel.metrics.connections_refused  # none refused: the family with no series
    Counter(refused.name, refused.documentation, refused.labelnames, registry=reference)
    Gauge("istio_active_proxy_count", tel.metrics.active_proxies.documentation, registry=reference).set(3)
    Counter("istio_proxies_started", tel.metrics.proxies_started.documentation, registry=reference).inc()
    Counter("istio_proxies_stopped", tel.metrics.proxies_stopped.documentation, registry=reference)
    Gauge("istio_build", "Istio component build info", ["component", "tag"],
          registry=reference).labels(component="ztunnel", tag=build_tag()).set(1)
    for attr in ("dns_requests", "dns_upstream_requests", "dns_upstream_failures"):  # no query yet
        family = getattr(tel.metrics, attr)
        Counter(family.name, family.documentation, family.labelnames, registry=reference)
    duration = tel.metrics.dns_upstream_duration
    Histogram(duration.name, duration.documentation, duration.labelnames, buckets=duration.buckets,
              registry=reference)
    ours = generate_latest(tel.metrics.registry)
    assert ours == generate_latest(reference)
    assert b"_created" not in ours  # upstream exports none; prometheus_client's Counter does by default
    assert re.search(rb'^istio_build\{component="ztunnel",tag="\d+\.\d+\.\d+"\} 1\.0$', ours, re.M)


def test_metrics_families_check_label_names_and_amounts() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="incorrect label names"):
        metrics.opened.labels(reporter="source")
    with pytest.raises(ValueError, match="non-negative"):
        metrics.proxies_started.inc(-1)
    with pytest.raises(ValueError, match="no label values"):
        metrics.opened.inc()


def test_ztunnel_imports_prometheus_client_only_for_a_scrape() -> None:
    code = "import sys, services.ztunnel.app; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_set_log_level_accepts_upstream_names_and_rejects_others() -> None:
    root = logging.getLogger()
    old = root.level
    try:
        assert set_log_level("warn").startswith("warn")
        assert root.level == logging.WARNING
        set_log_level("access=debug")
        assert logging.getLogger("access").level == logging.DEBUG
        with pytest.raises(ValueError, match="unknown log level"):
            set_log_level("loud")
    finally:
        root.setLevel(old)
        logging.getLogger("access").setLevel(logging.NOTSET)
