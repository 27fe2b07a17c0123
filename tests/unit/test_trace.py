"""The live connection trace (services/ztunnel/telemetry/trace.py): who gets which event, and a slow reader
never holds anything up."""

from __future__ import annotations

import json
from collections.abc import Callable

from services.ztunnel.telemetry.access_log import ConnectionOutcome, Peer, Telemetry
from services.ztunnel.telemetry.trace import SUBSCRIBER_BUFFER, ConnectionTrace, PodRef, stream_events
from shared.logs import Display
from shared.zds.types import WorkloadInfo

POD = PodRef(uid="uid-1", info=WorkloadInfo(name="sleep-5c6d7e", namespace="sleep", service_account="sleep"))


def numbered(i: int) -> Callable[[], dict[str, object]]:
    return lambda: {"n": i}


def test_a_pod_is_named_by_uid_namespace_and_name_or_name() -> None:
    assert all(POD.matches(q) for q in ("uid-1", "sleep/sleep-5c6d7e", "sleep-5c6d7e"))
    assert not any(POD.matches(q) for q in ("sleep", "other/sleep-5c6d7e", "uid"))
    assert not PodRef(uid="u").matches("sleep-5c6d7e")


def test_events_are_built_only_for_someone_who_wants_them() -> None:
    trace = ConnectionTrace()
    built: list[int] = []

    def make() -> dict[str, object]:
        built.append(1)
        return {"n": len(built)}

    trace.publish(POD, make)  # nobody listens
    with trace.subscribe("other-pod") as other:
        trace.publish(POD, make)  # nobody listens to this pod
        assert built == []
        with trace.subscribe("sleep-5c6d7e") as mine, trace.subscribe(None) as every:
            trace.publish(POD, make)
            trace.publish(None, make)  # a connection of no pod: only the reader of every pod
        assert built == [1, 1]
        assert mine.receive.receive_nowait() == {"n": 1}
        assert [every.receive.receive_nowait(), every.receive.receive_nowait()] == [{"n": 1}, {"n": 2}]
        assert other.dropped == 0
    assert trace.subscribers == []


def test_a_slow_reader_loses_events_counted_never_waited_for() -> None:
    trace = ConnectionTrace()
    with trace.subscribe(None, size=2) as sub:
        for i in range(5):
            trace.publish(POD, numbered(i))
        assert sub.dropped == 3
        assert [sub.receive.receive_nowait()["n"] for _ in range(2)] == [0, 1]


async def test_the_stream_says_what_it_traces_then_each_event_and_its_drops() -> None:
    trace = ConnectionTrace()
    stream = stream_events(trace, "uid-1", [POD, PodRef(uid="uid-2")])
    assert json.loads(await stream.__anext__()) == {
        "event": "tracing", "pod": "uid-1", "running": [{"uid": "uid-1", "pod": "sleep/sleep-5c6d7e"}]}
    assert len(trace.subscribers) == 1
    for i in range(SUBSCRIBER_BUFFER + 2):
        trace.publish(POD, numbered(i))
    assert json.loads(await stream.__anext__()) == {"event": "dropped", "count": 2}
    assert json.loads(await stream.__anext__()) == {"n": 0}
    await stream.aclose()
    assert trace.subscribers == []


def test_telemetry_views_tag_their_pod_and_share_everything_else() -> None:
    root = Telemetry()
    view = root.for_pod("uid-1", POD.info)
    assert view.pod == POD and root.pod is None
    assert view.metrics is root.metrics and view.trace is root.trace and view.log is root.log
    outcome = ConnectionOutcome(direction="outbound", src_addr=Display("10.0.0.1:4000"),
                                dst_addr=Display("10.0.0.2:80"), src=Peer(workload="sleep"))
    with root.trace.subscribe("uid-1") as sub:
        view.connection_complete(outcome)
        view.connection_failed(src_addr=Display("10.0.0.1:4001"), dst_addr=Display("10.0.0.9:15008"),
                               direction="inbound", error="no workload")
        root.connection_complete(outcome)  # not this pod's
        complete = sub.receive.receive_nowait()
        failed = sub.receive.receive_nowait()
        assert sub.receive.statistics().current_buffer_used == 0
    assert (complete["event"], complete["uid"], complete["route"], complete["original_dst"]) == (
        "connection complete", "uid-1", "passthrough", "10.0.0.2:80")
    assert (failed["event"], failed["listener"], failed["error"]) == (
        "connection failed", "inbound HBONE (15008)", "no workload")
    assert list(root.metrics.closed.children) == list(view.metrics.closed.children)


def test_ambient_trace_describes_each_event_on_one_line() -> None:
    from ambient.trace import describe

    outbound = {"event": "connection complete", "time": "T", "listener": "outbound (15001)",
                "direction": "outbound", "src": "10.0.0.1:4000", "original_dst": "10.96.0.10:9080",
                "dst_service": "productpage.bookinfo.svc.cluster.local",
                "route": "HBONE via waypoint waypoint at 10.0.0.9:15008", "hbone_target": "10.96.0.10:9080",
                "dst_workload": "waypoint", "policy": None, "status": 503, "bytes_sent": 0, "bytes_recv": 0,
                "duration_ms": 4, "error": "http status: 503 Service Unavailable"}
    assert describe(outbound) == (
        "T outbound (15001) 10.0.0.1:4000 -> 10.96.0.10:9080 (productpage.bookinfo.svc.cluster.local) "
        "| HBONE via waypoint waypoint at 10.0.0.9:15008 target 10.96.0.10:9080 workload waypoint "
        "| policy: none here (the destination decides) | 503 | sent 0 B, received 0 B, 4 ms "
        "| error: http status: 503 Service Unavailable")
    failed = {"event": "connection failed", "time": "T", "listener": "outbound (15001)",
              "src": "10.0.0.1:4001", "original_dst": "10.96.0.11:80", "error": "no healthy upstream"}
    assert describe(failed) == "T outbound (15001) 10.0.0.1:4001 -> 10.96.0.11:80 failed: no healthy upstream"
    dns_query = {"event": "dns query", "time": "T", "listener": "DNS (15053)", "protocol": "udp",
                 "name": "productpage.bookinfo", "type": "A", "answered_by": "ztunnel", "rcode": "NOERROR",
                 "answers": ["10.96.0.20"], "error": None}
    assert describe(dns_query) == (
        "T DNS (15053) udp productpage.bookinfo A | answered by ztunnel | NOERROR | 10.96.0.20")
    assert describe({**dns_query, "answered_by": "upstream", "rcode": "SERVFAIL", "answers": [],
                     "error": "no upstream answered"}) == (
        "T DNS (15053) udp productpage.bookinfo A | answered by upstream | SERVFAIL | no address "
        "| error: no upstream answered")
    assert describe({"event": "dropped", "count": 3}) == (
        "... 3 connection(s) not shown: this reader fell behind")
    assert describe({"event": "tracing", "pod": "a/b", "running": []}, where="the ztunnel of node-a") == (
        "tracing a/b on the ztunnel of node-a; not running there (yet): it shows once it is; Ctrl-C stops")
