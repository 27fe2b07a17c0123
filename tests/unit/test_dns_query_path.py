"""The DNS proxy's query path under fuzzing (hypothesis): whatever bytes arrive, `decide()` never raises,
drops what it cannot answer, and every answer it writes is a well-formed response to the query's id that fits
the UDP limit; and the four DNS families as a scrape shows them."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rcode
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from services.ztunnel.dns.forwarder import Forwarder
from services.ztunnel.dns.resolver import Resolver
from services.ztunnel.dns.server import DnsProxy, Forwarded
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import NetworkAddress, Service
from services.ztunnel.telemetry.metrics import Metrics


def proxy() -> DnsProxy:
    store = StateStore()
    store.apply_addresses([Service(name=f"svc{i}", namespace="ns", hostname=f"svc{i}.ns.svc.cluster.local",
                                   addresses=tuple(NetworkAddress(address=f"10.96.{i}.{j}")
                                                   for j in range(1, 1 + i * 10)))
                           for i in range(6)], [])
    return DnsProxy(Resolver(store), Forwarder([]), Metrics(), client_namespace="ns")


PROXY = proxy()
QUERIES = [dns.message.make_query(name, rdtype, use_edns=edns).to_wire()
           for name in ("svc1", "svc5.ns.svc.cluster.local", "no.ns.svc.cluster.local", "example.com")
           for rdtype in ("A", "AAAA", "TXT") for edns in (False, True)]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    wire = bytearray(draw(st.sampled_from(QUERIES)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "append", "pointer"]))
        if kind == "flip" and wire:
            wire[draw(st.integers(0, len(wire) - 1))] = draw(st.integers(0, 255))
        elif kind == "cut":
            del wire[draw(st.integers(0, len(wire))):]
        elif kind == "append":
            wire += draw(st.binary(max_size=64))
        elif kind == "pointer" and len(wire) > 14:
            at = draw(st.integers(12, len(wire) - 2))
            wire[at:at + 2] = struct.pack("!H", 0xC000 | draw(st.integers(0, len(wire))))
    return bytes(wire)


def check(wire: bytes, protocol: str) -> None:
    decided = PROXY.decide(wire, protocol)
    if decided is None or isinstance(decided, Forwarded):
        return
    reply = dns.message.from_wire(decided)
    assert reply.flags & dns.flags.QR
    assert reply.id == struct.unpack_from("!H", wire)[0]
    if protocol == "udp":
        assert len(decided) <= max(512, 65535 if wire and reply.edns >= 0 else 512)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=700))
def test_arbitrary_bytes(wire: bytes) -> None:
    check(wire, "udp")


@settings(max_examples=600, deadline=None)
@given(mutated(), st.sampled_from(["udp", "tcp"]))
def test_mutated_queries(wire: bytes, protocol: str) -> None:
    check(wire, protocol)


def test_big_local_answer_is_truncated_for_udp_but_whole_over_tcp() -> None:
    wire = dns.message.make_query("svc5", "A").to_wire()
    udp = dns.message.from_wire(PROXY.decide(wire, "udp"))  # type: ignore[arg-type]
    tcp = dns.message.from_wire(PROXY.decide(wire, "tcp"))  # type: ignore[arg-type]
    assert udp.flags & dns.flags.TC and not udp.answer
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 50


def test_dns_families_are_exported() -> None:
    metrics = Metrics()
    labels = {"request_query_type": "A", "request_protocol": "udp", "source_canonical_service": "sleep",
              "source_canonical_revision": "latest", "source_workload": "sleep",
              "source_workload_namespace": "default"}
    metrics.dns_requests.labels(**labels).inc()
    metrics.dns_upstream_requests.labels(**labels).inc()
    metrics.dns_upstream_failures.labels(**labels).inc()
    metrics.dns_upstream_duration.labels(**labels).observe(0.003)
    text = generate_latest(metrics.registry).decode()
    for name in ("istio_dns_requests_total", "istio_dns_upstream_requests_total",
                 "istio_dns_upstream_failures_total"):
        (line,) = [line for line in text.splitlines() if line.startswith(name + "{")]
        assert 'request_query_type="A"' in line and 'request_protocol="udp"' in line
        assert 'source_workload="sleep"' in line and line.endswith(" 1.0")
    buckets = {line.split('le="')[1].split('"')[0]: line.rsplit(" ", 1)[1] for line in text.splitlines()
               if line.startswith("istio_dns_upstream_request_duration_seconds_bucket{")}
    assert buckets == {"0.001": "0.0", "0.005": "1.0", "0.01": "1.0", "0.1": "1.0", "1": "1.0", "5": "1.0",
                       "+Inf": "1.0"}
    assert "istio_dns_upstream_request_duration_seconds_count{" in text
