"""The DNS proxy with real UDP and TCP clients on loopback, and a fake upstream resolver on 127.0.0.1 (never
another address): local answers, NXDOMAIN, forwarding with the TCP fallback, SERVFAIL on a silent upstream,
malformed queries, the per-pod in-flight bound, and the metrics."""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
import trio
import trio.testing

from services.ztunnel.dns.forwarder import Forwarder, Upstream
from services.ztunnel.dns.resolver import Resolver
from services.ztunnel.dns.server import DnsProxy, TracePublish
from services.ztunnel.net import accept_forever
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import NetworkAddress, Service
from services.ztunnel.telemetry.metrics import Family, Metrics
from services.ztunnel.telemetry.trace import ConnectionTrace, PodRef
from shared.zds.types import WorkloadInfo

LOOPBACK = "127.0.0.1"
PRODUCTPAGE = Service(name="productpage", namespace="bookinfo",
                      hostname="productpage.bookinfo.svc.cluster.local",
                      addresses=(NetworkAddress(address="10.96.0.20"),))


@dataclass
class FakeUpstream:
    """A resolver on loopback: answers every A query with `address`; `truncate` makes its UDP answers TC
    (records only over TCP); `silent` makes it read and never answer."""

    address: str = "192.0.2.7"
    records: int = 1
    truncate: bool = False
    silent: bool = False
    seen: list[tuple[str, str]] = field(default_factory=list)  # (protocol, name)

    def answer(self, wire: bytes, protocol: str) -> bytes | None:
        query = dns.message.from_wire(wire)
        self.seen.append((protocol, query.question[0].name.to_text()))
        if self.silent:
            return None
        reply = dns.message.make_response(query)
        if self.truncate and protocol == "udp":
            reply.flags |= dns.flags.TC
        else:
            base = self.address.rsplit(".", 1)[0]
            addresses = [self.address] if self.records == 1 else [f"{base}.{i}" for i in range(self.records)]
            reply.answer.append(dns.rrset.from_text_list(query.question[0].name, 60, "IN", "A", addresses))
        return reply.to_wire()

    async def serve_udp(self, sock: trio.socket.SocketType) -> None:
        while True:
            wire, peer = await sock.recvfrom(65535)
            data = self.answer(wire, "udp")
            if data is not None:
                await sock.sendto(data, peer)

    async def serve_tcp(self, listener: trio.socket.SocketType) -> None:
        async def one(conn: trio.socket.SocketType) -> None:
            async with trio.SocketStream(conn) as stream:
                (length,) = struct.unpack("!H", await receive(stream, 2))
                data = self.answer(await receive(stream, length), "tcp")
                if data is not None:
                    await stream.send_all(struct.pack("!H", len(data)) + data)

        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(one, conn)


async def receive(stream: trio.SocketStream, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        assert chunk, "stream ended early"
        data += chunk
    return data


@dataclass
class Running:
    proxy: DnsProxy
    metrics: Metrics
    udp: tuple[str, int]
    tcp: tuple[str, int]


async def udp_and_tcp_on_one_port() -> tuple[trio.socket.SocketType, trio.socket.SocketType, int]:
    """A UDP and a listening TCP socket on the same ephemeral loopback port (a resolver's two halves). The
    UDP port's TCP twin may be taken by someone else's connection: then another port is tried."""
    for _ in range(20):
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await udp.bind((LOOPBACK, 0))
        port = udp.getsockname()[1]
        tcp = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await tcp.bind((LOOPBACK, port))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(8)
        return udp, tcp, port
    raise AssertionError("no loopback port free for both UDP and TCP in 20 tries")


@asynccontextmanager
async def running(upstream: FakeUpstream | None = None, *, forward_timeout: float = 5.0,
                  max_inflight: int = 64, trace: TracePublish | None = None) -> AsyncIterator[Running]:
    """The fake upstream (when given) and one pod's DNS proxy, both on 127.0.0.1 ephemeral ports."""
    store = StateStore()
    store.apply_addresses([PRODUCTPAGE], [])
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        upstreams = []
        if upstream is not None:
            up_udp, up_tcp, port = await udp_and_tcp_on_one_port()
            nursery.start_soon(upstream.serve_udp, up_udp)
            nursery.start_soon(upstream.serve_tcp, up_tcp)
            upstreams.append(Upstream(LOOPBACK, port))
        proxy = DnsProxy(Resolver(store), Forwarder(upstreams, timeout=forward_timeout), metrics,
                         client_namespace="bookinfo", max_inflight=max_inflight, trace=trace)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        udp.bind((LOOPBACK, 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        tcp.bind((LOOPBACK, 0))
        tcp.listen(8)
        nursery.start_soon(proxy.serve_udp, udp, nursery)

        def spawn(conn: socket.socket, peer: object) -> None:
            nursery.start_soon(proxy.handle_tcp, conn)

        nursery.start_soon(functools.partial(accept_forever, tcp, spawn, on_capacity_error=print))
        try:
            yield Running(proxy=proxy, metrics=metrics, udp=udp.getsockname(), tcp=tcp.getsockname())
        finally:
            nursery.cancel_scope.cancel()
            tcp.close()


def query(name: str, rdtype: str = "A", qid: int | None = None) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    if qid is not None:
        q.id = qid
    return q


async def ask_udp(addr: tuple[str, int], wire: bytes) -> dns.message.Message:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect(addr)
        await sock.send(wire)
        return dns.message.from_wire(await sock.recv(65535))


async def ask_tcp(addr: tuple[str, int] | trio.socket.SocketType, *wires: bytes) -> list[dns.message.Message]:
    """Length-prefixed queries on one connection (to `addr`, or on an already connected socket)."""
    stream = await trio.open_tcp_stream(*addr) if isinstance(addr, tuple) else trio.SocketStream(addr)
    async with stream:
        out = []
        for wire in wires:
            await stream.send_all(struct.pack("!H", len(wire)) + wire)
            (length,) = struct.unpack("!H", await receive(stream, 2))
            out.append(dns.message.from_wire(await receive(stream, length)))
        return out


def addresses(reply: dns.message.Message) -> list[str]:
    return [rdata.to_text() for rrset in reply.answer for rdata in rrset]


def count(metrics: Metrics, family: str, **labels: str) -> float:
    fam: Family = getattr(metrics, family)
    return sum(child.value for key, child in fam.children.items()
               if all(dict(zip(fam.labelnames, key, strict=True))[k] == v for k, v in labels.items()))


async def test_service_name_is_answered_locally_over_udp_and_tcp() -> None:
    upstream = FakeUpstream()
    async with running(upstream) as r:
        reply = await ask_udp(r.udp, query("productpage").to_wire())
        assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
        assert addresses(reply) == ["10.96.0.20"]
        first, second = await ask_tcp(r.tcp, query("productpage.bookinfo.svc.cluster.local").to_wire(),
                                      query("productpage.bookinfo", "AAAA").to_wire())
        assert addresses(first) == ["10.96.0.20"]
        assert second.rcode() == dns.rcode.NOERROR and addresses(second) == []
        assert count(r.metrics, "dns_requests", request_protocol="udp", request_query_type="A") == 1
        assert count(r.metrics, "dns_requests", request_protocol="tcp") == 2
        assert count(r.metrics, "dns_upstream_requests") == 0
    assert upstream.seen == []


async def test_unknown_name_under_the_cluster_domain_is_nxdomain() -> None:
    upstream = FakeUpstream()
    async with running(upstream) as r:
        reply = await ask_udp(r.udp, query("nosuch.bookinfo.svc.cluster.local").to_wire())
        assert reply.rcode() == dns.rcode.NXDOMAIN
    assert upstream.seen == []


async def test_other_names_are_forwarded_to_the_upstream() -> None:
    upstream = FakeUpstream(address="192.0.2.7")
    async with running(upstream) as r:
        q = query("www.example.com", qid=4242)
        reply = await ask_udp(r.udp, q.to_wire())
        assert reply.id == 4242 and addresses(reply) == ["192.0.2.7"]
        (tcp_reply,) = await ask_tcp(r.tcp, query("www.example.org").to_wire())
        assert addresses(tcp_reply) == ["192.0.2.7"]
        assert count(r.metrics, "dns_upstream_requests") == 2
        assert count(r.metrics, "dns_upstream_failures") == 0
        assert sum(h.count for h in r.metrics.dns_upstream_duration.children.values()) == 2
    assert upstream.seen == [("udp", "www.example.com."), ("udp", "www.example.org.")]


async def test_truncated_upstream_answer_is_asked_again_over_tcp() -> None:
    upstream = FakeUpstream(truncate=True, records=3)
    async with running(upstream) as r:
        (reply,) = await ask_tcp(r.tcp, query("big.example.com").to_wire())
        assert not reply.flags & dns.flags.TC
        assert sorted(addresses(reply)) == ["192.0.2.0", "192.0.2.1", "192.0.2.2"]
    assert upstream.seen == [("udp", "big.example.com."), ("tcp", "big.example.com.")]


async def test_an_answer_too_big_for_udp_goes_back_truncated() -> None:
    upstream = FakeUpstream(truncate=True, records=60)  # 60 A records: over 512 bytes
    async with running(upstream) as r:
        reply = await ask_udp(r.udp, query("big.example.com").to_wire())
        assert reply.flags & dns.flags.TC and addresses(reply) == []
        (full,) = await ask_tcp(r.tcp, query("big.example.com").to_wire())
        assert len(addresses(full)) == 60


async def test_silent_upstream_gives_servfail_and_counts_a_failure() -> None:
    async with running(FakeUpstream(silent=True), forward_timeout=0.2) as r:
        reply = await ask_udp(r.udp, query("www.example.com").to_wire())
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert count(r.metrics, "dns_upstream_failures", request_query_type="A") == 1


async def test_each_answered_query_is_in_the_pods_live_trace() -> None:
    trace = ConnectionTrace()
    pod = PodRef(uid="uid-1", info=WorkloadInfo(name="sleep", namespace="bookinfo", service_account="sleep"))
    other = PodRef(uid="uid-2")
    with trace.subscribe("bookinfo/sleep") as sub, trace.subscribe("uid-2") as not_ours:
        publish = functools.partial(trace.publish, pod)
        async with running(FakeUpstream(address="192.0.2.7"), trace=publish) as r:
            await ask_udp(r.udp, query("productpage").to_wire())
            await ask_tcp(r.tcp, query("www.example.com").to_wire())
        local, forwarded = sub.receive.receive_nowait(), sub.receive.receive_nowait()
        shown = ("event", "protocol", "name", "type", "answered_by", "rcode", "answers")
        assert {k: local[k] for k in shown} == {
            "event": "dns query", "protocol": "udp", "name": "productpage", "type": "A",
            "answered_by": "ztunnel", "rcode": "NOERROR", "answers": ["10.96.0.20"]}
        assert (forwarded["protocol"], forwarded["name"], forwarded["answered_by"], forwarded["answers"]) == (
            "tcp", "www.example.com", "upstream", ["192.0.2.7"])
        assert not_ours.pod == other.uid
        with pytest.raises(trio.WouldBlock):
            not_ours.receive.receive_nowait()  # another pod's reader sees none of it


async def test_no_upstream_configured_gives_servfail() -> None:
    async with running(None) as r:
        reply = await ask_udp(r.udp, query("www.example.com").to_wire())
        assert reply.rcode() == dns.rcode.SERVFAIL


async def test_malformed_queries_are_dropped_or_formerr_and_the_proxy_goes_on() -> None:
    async with running(FakeUpstream()) as r:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            await sock.connect(r.udp)
            await sock.send(b"\x12\x34\x01")  # shorter than a header: dropped
            answer = dns.message.make_response(query("productpage", qid=7)).to_wire()
            await sock.send(answer)  # an answer (QR set): dropped, never answered
            # a question whose name is a compression pointer to itself
            loop = struct.pack("!HHHHHH", 99, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + struct.pack("!HH", 1, 1)
            await sock.send(loop)
            formerr = dns.message.from_wire(await sock.recv(65535))
            assert formerr.id == 99 and formerr.rcode() == dns.rcode.FORMERR
            await sock.send(query("productpage", qid=100).to_wire())
            ok = dns.message.from_wire(await sock.recv(65535))
            assert ok.id == 100 and addresses(ok) == ["10.96.0.20"]
        # TCP: a message cut short by the client's close ends that connection only
        stream = await trio.open_tcp_stream(*r.tcp)
        await stream.send_all(struct.pack("!H", 300) + b"\x00" * 10)
        await stream.aclose()
        (ok_tcp,) = await ask_tcp(r.tcp, query("productpage").to_wire())
        assert addresses(ok_tcp) == ["10.96.0.20"]


async def test_forwards_in_flight_are_bounded_per_pod() -> None:
    async with running(FakeUpstream(silent=True), forward_timeout=30, max_inflight=1) as r:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            await sock.connect(r.udp)
            await sock.send(query("slow.example.com", qid=1).to_wire())
            while r.proxy.inflight < 1:
                await trio.testing.wait_all_tasks_blocked()
            await sock.send(query("next.example.com", qid=2).to_wire())
            await sock.send(query("productpage", qid=3).to_wire())  # local answers need no forward slot
            replies = {m.id: m for m in [dns.message.from_wire(await sock.recv(65535)) for _ in range(2)]}
            assert replies[2].rcode() == dns.rcode.SERVFAIL
            assert addresses(replies[3]) == ["10.96.0.20"]
