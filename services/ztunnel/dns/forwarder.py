"""Forwarding the queries ztunnel does not answer itself to the node's resolvers.

Theory of operation
-------------------
The upstream resolvers are the `nameserver` lines of the node's resolv.conf (ztunnel's own, read once at
start). A query is sent as the pod sent it, over UDP first; an answer with TC set is asked again over TCP.
Each resolver gets `timeout` seconds; the next one is tried after a timeout or an error, and when none
answers the caller gets `UpstreamError` (the pod gets SERVFAIL). Sockets come from `make_socket`: in a pod
they are made in its netns with ztunnel's packet mark, so the pod's own DNS rules do not capture them again.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import dns.exception
import dns.flags
import dns.message
import trio

from services.ztunnel.dns.errors import StreamEnded, UpstreamError
from shared.addr import format_host_port

DNS_PORT: Final = 53
MAX_MESSAGE: Final = 65535
"""Largest DNS message (the TCP length prefix is 16 bits); UDP answers are read up to this size."""

MakeSocket = Callable[[socket.AddressFamily, socket.SocketKind], socket.socket]
"""Makes a non-blocking socket of the given family and kind (SOCK_DGRAM or SOCK_STREAM)."""


def read_nameservers(text: str) -> tuple[str, ...]:
    """The `nameserver` addresses of a resolv.conf's text, in order (zone suffixes and bad lines skipped)."""
    out = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            address = fields[1].split("%", 1)[0]
            try:
                socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
            except OSError:
                continue
            out.append(address)
    return tuple(out)


def default_socket(family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
    """A plain non-blocking socket in ztunnel's own namespace (tests, and ztunnel without pods)."""
    return socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str
    port: int = DNS_PORT

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return format_host_port(self.host, self.port)


class Forwarder:
    """Sends queries to `upstreams` in order; one `forward()` per query, any number at once."""

    def __init__(self, upstreams: Sequence[Upstream], *, timeout: float = 5.0,
                 make_socket: MakeSocket = default_socket) -> None:
        self.upstreams = tuple(upstreams)
        self.timeout = timeout
        self.make_socket = make_socket

    async def forward(self, query: dns.message.Message, wire: bytes) -> bytes:
        """The upstream's answer to `query` (whose wire form is `wire`), as the upstream wrote it.

        Raises:
            UpstreamError: no upstream resolver is configured, or none answered in time.
        """
        if not self.upstreams:
            raise UpstreamError("no upstream DNS resolver: the node's resolv.conf names no nameserver")
        errors = []
        for upstream in self.upstreams:
            with trio.move_on_after(self.timeout):
                try:
                    raw, answer = await self._udp(upstream, query, wire)
                    if answer.flags & dns.flags.TC:
                        raw, answer = await self._tcp(upstream, query, wire)
                    return raw
                except (OSError, dns.exception.DNSException, trio.BrokenResourceError, StreamEnded,
                        UpstreamError) as exc:
                    errors.append(f"{upstream}: {exc}")
                    continue
            errors.append(f"{upstream}: no answer within {self.timeout:g}s")
        raise UpstreamError("upstream DNS resolvers failed: " + "; ".join(errors))

    async def _udp(self, upstream: Upstream, query: dns.message.Message,
                   wire: bytes) -> tuple[bytes, dns.message.Message]:
        with trio.socket.from_stdlib_socket(self.make_socket(upstream.family, socket.SOCK_DGRAM)) as sock:
            await sock.connect((upstream.host, upstream.port))
            await sock.send(wire)
            while True:  # a stray datagram (an old answer, a spoof attempt) is skipped, not taken
                raw = await sock.recv(MAX_MESSAGE)
                answer = _parse_answer(raw, query, truncated_ok=True)
                if answer is not None:
                    return raw, answer

    async def _tcp(self, upstream: Upstream, query: dns.message.Message,
                   wire: bytes) -> tuple[bytes, dns.message.Message]:
        sock = trio.socket.from_stdlib_socket(self.make_socket(upstream.family, socket.SOCK_STREAM))
        try:
            await sock.connect((upstream.host, upstream.port))
        except BaseException:
            sock.close()
            raise
        async with trio.SocketStream(sock) as stream:
            await stream.send_all(struct.pack("!H", len(wire)) + wire)
            (length,) = struct.unpack("!H", await receive_exactly(stream, 2))
            raw = await receive_exactly(stream, length)
        answer = _parse_answer(raw, query, truncated_ok=False)
        if answer is None:
            raise UpstreamError("its TCP answer does not answer the query")
        return raw, answer


def _parse_answer(raw: bytes, query: dns.message.Message, *,
                  truncated_ok: bool) -> dns.message.Message | None:
    """`raw` parsed when it answers `query` (same id and question), else None."""
    truncated = len(raw) >= 12 and bool(int.from_bytes(raw[2:4], "big") & dns.flags.TC)
    try:
        answer = dns.message.from_wire(raw, ignore_trailing=True, question_only=truncated_ok and truncated)
    except dns.exception.DNSException:
        return None
    return answer if query.is_response(answer) else None


async def receive_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    """`count` bytes from `stream`.

    Raises:
        StreamEnded: the stream ended first.
    """
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            raise StreamEnded(f"the connection closed after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)
