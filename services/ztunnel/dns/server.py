"""One pod's DNS proxy: its UDP and TCP sockets on 15053, each query answered locally or forwarded.

Theory of operation
-------------------
`DnsProxy.decide()` is synchronous: it parses a query (dnspython) and returns the bytes of the answer, a
query to forward, or nothing (dropped). Dropped: fewer than 12 bytes (no id to answer), or a message with
QR set (never answer an answer: no loops). FORMERR: the rest of what does not parse (truncated, bad
compression pointers, trailing junk) and queries without exactly one question; NOTIMP: opcodes other
than QUERY. Locally answered: what `Resolver` knows (authoritative, TTL 30 s) and NXDOMAIN under the
cluster domain. Everything else goes to the `Forwarder`; at most `max_inflight` forwards of the pod are
open at once, a query beyond that is answered SERVFAIL at once (a flood from one pod costs that pod its
answers, never the data path's or another pod's tasks). An upstream that does not answer in time gives
SERVFAIL.

UDP answers fit the client's size (its EDNS payload, else 512 bytes): a bigger one goes out with TC set
and no records, and the client asks again over TCP. TCP carries length-prefixed messages, answered in
order; a connection idle for `tcp_idle` seconds is closed, and a pod has at most `max_tcp` open.

    proxy = DnsProxy(resolver, forwarder, metrics, client_namespace="default")
    nursery.start_soon(proxy.serve_udp, udp_sock, nursery)     # one task; forwards run in `nursery`
    await proxy.handle_tcp(conn)                               # per accepted connection
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trio

from services.ztunnel.dns.errors import StreamEnded, UpstreamError
from services.ztunnel.dns.forwarder import MAX_MESSAGE, Forwarder, receive_exactly
from services.ztunnel.dns.resolver import TTL, Forward, NxDomain, Records, Resolver
from services.ztunnel.telemetry.metrics import Metrics
from services.ztunnel.telemetry.trace import now_text

log = logging.getLogger("ztunnel.dns")

HEADER_SIZE: Final = 12
UDP_DEFAULT_SIZE: Final = 512
MAX_INFLIGHT: Final = 64
MAX_TCP: Final = 32
TCP_IDLE: Final = 10.0

SourceLabels = Callable[[], Mapping[str, str]]
"""The `source_*` labels of the pod's DNS metrics (workload, namespace, canonical service, revision)."""


@dataclass(frozen=True, slots=True)
class Forwarded:
    """A query for the upstream resolvers, with what it takes to answer the pod."""

    query: dns.message.Message
    wire: bytes
    rdtype: str


def _unknown_source() -> Mapping[str, str]:
    return {"source_canonical_service": "unknown", "source_canonical_revision": "unknown",
            "source_workload": "unknown", "source_workload_namespace": "unknown"}


def _error_reply(qid: int, rcode: dns.rcode.Rcode, query: dns.message.Message | None = None) -> bytes:
    if query is not None:
        reply = dns.message.make_response(query)
    else:
        reply = dns.message.Message(id=qid)
        reply.flags = dns.flags.QR
    reply.set_rcode(rcode)
    return reply.to_wire()


def fit(reply: dns.message.Message, limit: int) -> bytes:
    """`reply` in at most `limit` bytes: as it is, or with its records dropped and TC set."""
    try:
        return reply.to_wire(max_size=limit)
    except dns.exception.TooBig:
        reply.answer.clear()
        reply.authority.clear()
        reply.additional.clear()
        reply.flags |= dns.flags.TC
        return reply.to_wire(max_size=limit)


def udp_limit(query: dns.message.Message) -> int:
    """The largest answer the client takes over UDP: its EDNS payload size, at least 512."""
    return max(UDP_DEFAULT_SIZE, query.payload) if query.edns >= 0 else UDP_DEFAULT_SIZE


def fit_raw(raw: bytes, query: dns.message.Message, limit: int) -> bytes:
    """An upstream answer cut to `limit` for a UDP client (TC set, records dropped) when it is bigger."""
    if len(raw) <= limit:
        return raw
    reply = dns.message.make_response(query)
    reply.set_rcode(dns.rcode.NOERROR)
    reply.flags |= dns.flags.TC
    return reply.to_wire(max_size=limit)


TracePublish = Callable[[Callable[[], dict[str, Any]]], None]


def _parsed(raw: bytes) -> dns.message.Message | None:
    try:
        return dns.message.from_wire(raw)
    except (dns.exception.DNSException, ValueError, UnicodeError):
        return None


def dns_event(query: dns.message.Message, rdtype: str, protocol: str, reply: dns.message.Message | None, *,
              answered_by: str, error: str | None = None) -> dict[str, Any]:
    """The live-trace event of one answered query: the name and type asked, who answered (`ztunnel` from
    the mesh's state, or the `upstream` resolver it was forwarded to), the response code and addresses."""
    answers = [] if reply is None else [rdata.to_text() for rrset in reply.answer for rdata in rrset]
    return {
        "time": now_text(), "event": "dns query", "listener": "DNS (15053)", "protocol": protocol,
        "name": query.question[0].name.to_text(omit_final_dot=True), "type": rdtype,
        "answered_by": answered_by,
        "rcode": dns.rcode.to_text(reply.rcode()) if reply is not None else "SERVFAIL",
        "answers": answers, "error": error,
    }


class DnsProxy:
    """The DNS proxy of one pod (one per pod, so one pod's floods and failures stay its own)."""

    def __init__(self, resolver: Resolver | None, forwarder: Forwarder, metrics: Metrics, *,
                 client_namespace: str = "", source: SourceLabels = _unknown_source,
                 max_inflight: int = MAX_INFLIGHT, max_tcp: int = MAX_TCP,
                 tcp_idle: float = TCP_IDLE, trace: TracePublish | None = None) -> None:
        """`trace`, when given, is offered a `dns query` event per answered query (the pod's live trace:
        `publish(make)` calls `make()` only when someone is tracing the pod)."""
        self.trace = trace
        self.resolver = resolver
        self.forwarder = forwarder
        self.metrics = metrics
        self.client_namespace = client_namespace
        self.source = source
        self.max_inflight = max_inflight
        self.max_tcp = max_tcp
        self.tcp_idle = tcp_idle
        self.inflight = 0
        self.tcp_open = 0

    def _labels(self, rdtype: str, protocol: str) -> dict[str, str]:
        return {"request_query_type": rdtype, "request_protocol": protocol, **self.source()}

    def decide(self, wire: bytes, protocol: str) -> bytes | Forwarded | None:
        """The answer to `wire` (received over `protocol`, "udp" or "tcp"), a query to forward, or None
        when it is dropped. Never raises on any input."""
        if len(wire) < HEADER_SIZE:
            return None
        qid, flags = struct.unpack_from("!HH", wire)
        if flags & dns.flags.QR:
            return None
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError, UnicodeError):
            return _error_reply(qid, dns.rcode.FORMERR)
        if query.opcode() != dns.opcode.QUERY:
            return _error_reply(qid, dns.rcode.NOTIMP, query)
        if len(query.question) != 1:
            return _error_reply(qid, dns.rcode.FORMERR)
        question = query.question[0]
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.metrics.dns_requests.labels(**self._labels(rdtype, protocol)).inc()
        answer = (Forward() if self.resolver is None or question.rdclass != dns.rdataclass.IN else
                  self.resolver.resolve(question.name.to_text(omit_final_dot=True), rdtype,
                                        client_namespace=self.client_namespace))
        if isinstance(answer, Forward):
            return Forwarded(query=query, wire=wire, rdtype=rdtype)
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        if isinstance(answer, NxDomain):
            reply.set_rcode(dns.rcode.NXDOMAIN)
        elif isinstance(answer, Records) and answer.addresses:
            reply.answer.append(dns.rrset.from_text_list(question.name, TTL, dns.rdataclass.IN,
                                                         question.rdtype, list(answer.addresses)))
        if self.trace is not None:
            self.trace(lambda: dns_event(query, rdtype, protocol, reply, answered_by="ztunnel"))
        return fit(reply, udp_limit(query) if protocol == "udp" else MAX_MESSAGE)

    async def forward(self, forwarded: Forwarded, protocol: str) -> bytes:
        """The upstream's answer for the pod, or SERVFAIL (no upstream answered, or too many in flight)."""
        query = forwarded.query
        labels = self._labels(forwarded.rdtype, protocol)
        if self.inflight >= self.max_inflight:
            self.metrics.dns_upstream_failures.labels(**labels).inc()
            return _error_reply(query.id, dns.rcode.SERVFAIL, query)
        self.inflight += 1
        self.metrics.dns_upstream_requests.labels(**labels).inc()
        start = time.monotonic()
        try:
            raw = await self.forwarder.forward(query, forwarded.wire)
        except UpstreamError as exc:
            self.metrics.dns_upstream_failures.labels(**labels).inc()
            log.debug("dns forward failed", extra={"fields": [
                ("name", query.question[0].name.to_text()), ("error", str(exc))]})
            if self.trace is not None:
                error = str(exc)
                self.trace(lambda: dns_event(query, forwarded.rdtype, protocol, None, answered_by="upstream",
                                             error=error))
            return _error_reply(query.id, dns.rcode.SERVFAIL, query)
        finally:
            self.inflight -= 1
            self.metrics.dns_upstream_duration.labels(**labels).observe(time.monotonic() - start)
        if self.trace is not None:
            self.trace(lambda: dns_event(query, forwarded.rdtype, protocol, _parsed(raw),
                                         answered_by="upstream"))
        return fit_raw(raw, query, udp_limit(query)) if protocol == "udp" else raw

    async def answer(self, wire: bytes, protocol: str) -> bytes | None:
        """`decide`, with the forwarding done: what goes back to the pod, or None."""
        decided = self.decide(wire, protocol)
        if isinstance(decided, Forwarded):
            return await self.forward(decided, protocol)
        return decided

    async def serve_udp(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        """Answer datagrams on the bound `sock` until cancelled; forwards run in `nursery`. Closes `sock`."""
        with trio.socket.from_stdlib_socket(sock) as udp:

            async def reply_later(forwarded: Forwarded, peer: tuple[object, ...]) -> None:
                data = await self.forward(forwarded, "udp")
                await _send(udp, data, peer)

            while True:
                try:
                    wire, peer = await udp.recvfrom(MAX_MESSAGE)
                except OSError:  # ICMP errors from an earlier answer's peer surface here
                    continue
                decided = self.decide(wire, "udp")
                if isinstance(decided, Forwarded):
                    nursery.start_soon(reply_later, decided, peer)
                elif decided is not None:
                    await _send(udp, decided, peer)

    async def handle_tcp(self, conn: socket.socket) -> None:
        """Answer the length-prefixed queries of one accepted connection, in order, until it ends or idles."""
        if self.tcp_open >= self.max_tcp:
            return  # the caller closes it
        self.tcp_open += 1
        try:
            async with trio.SocketStream(trio.socket.from_stdlib_socket(conn)) as stream:
                while True:
                    wire = None
                    with trio.move_on_after(self.tcp_idle):
                        wire = await _read_message(stream)
                    if wire is None:
                        return  # closed by the client, or idle
                    data = await self.answer(wire, "tcp")
                    if data is None:
                        return
                    await stream.send_all(struct.pack("!H", len(data)) + data)
        except (OSError, trio.BrokenResourceError, StreamEnded):
            return
        finally:
            self.tcp_open -= 1


async def _read_message(stream: trio.SocketStream) -> bytes | None:
    """One length-prefixed message; None when the stream ends cleanly before it."""
    prefix = await stream.receive_some(2)
    if not prefix:
        return None
    if len(prefix) == 1:
        prefix += await receive_exactly(stream, 1)
    (length,) = struct.unpack("!H", prefix)
    return await receive_exactly(stream, length)


async def _send(udp: trio.socket.SocketType, data: bytes, peer: tuple[object, ...]) -> None:
    with contextlib.suppress(OSError):  # the client went away; its retry will ask again
        await udp.sendto(data, peer)
