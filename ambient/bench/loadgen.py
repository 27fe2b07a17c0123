"""`python -m ambient.bench.loadgen`: the request/response and connection-rate load of `ambient bench`.

    loadgen serve --rr-port 8080 --crr-port 8081            the servers (in the server pod)
          [--echo-port 8090 --stream-port 8091]              and connload's echo and marker stream
    loadgen rr HOST PORT --rate 1000 --conns 4 --seconds 10  1 KB HTTP/1.1 at a fixed rate (fortio-like)
    loadgen rr HOST PORT --closed ...                        as fast as it goes: the generator's own ceiling
    loadgen crr HOST PORT --conc 4 --seconds 10              connect, 100 bytes each way, close (TCP_CRR)
    loadgen crr HOST PORT --conc 4 --count 50000             the same for a number of connections (churn)

Clients print one JSON object on stdout and exit. Everything is plain non-blocking sockets on one epoll
loop (no event-loop library on the measured path), so the generator costs as little Python as possible; its
ceiling is measured by `ambient bench` against the baseline arm and printed beside the figures.

Theory of operation
-------------------
rr: `conns` kept-alive connections share the rate; request i of connection k is due at
t0 + (i * conns + k) / rate. A connection sends its next request when it is both due and idle (HTTP/1.1,
no pipelining), so a slow response delays the next send instead of queueing requests: the achieved rate is
reported and a run that fell behind says so (`late` counts sends more than 1 ms past their slot). Latency
is measured from the send to the last byte of the response, like fortio. The request is a POST with a
1024-byte body; the response carries 1024 bytes.

crr: `conc` connections in flight; each connects, sends 100 bytes, reads the server's 100 bytes and its
close, closes and is replaced at once. The server closes first so the client's ephemeral ports are not held
in TIME_WAIT.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import resource
import select
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.accept import ACCEPT_CAPACITY_ERRNOS

RR_SIZE = 1024
CRR_SIZE = 100
READ_SIZE = 65536
LATE_AFTER = 0.001  # a send more than 1 ms after its slot counts as late
STREAM_BLOCK = 65536  # the stream server's block: the marker, then padding

_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % (
    RR_SIZE
) + (b"x" * RR_SIZE)
_CRR_REPLY = b"y" * CRR_SIZE
_HEADER_END = b"\r\n\r\n"


def _request(host: str) -> bytes:
    head = (
        f"POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {RR_SIZE}\r\n\r\n"
    )
    return head.encode() + b"q" * RR_SIZE


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def percentiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """Nearest-rank percentiles (q in 0..100) of `values`; 0.0 for an empty sequence."""
    if not values:
        return [0.0 for _ in qs]
    ordered = sorted(values)
    n = len(ordered)
    out = []
    for q in qs:
        rank = max(1, min(n, int(-(-q * n // 100))))  # ceil(q/100 * n), at least 1
        out.append(ordered[rank - 1])
    return out


# --- servers ---------------------------------------------------------------------------------------------


@dataclass
class _ServerConn:
    sock: socket.socket
    kind: str  # "rr", "crr", "echo" or "stream"
    buf: bytearray = field(default_factory=bytearray)
    out: bytes = b""
    block: bytes = b""  # stream: what is sent again and again once the marker line arrived


def stream_block(marker: bytes) -> bytes:
    """One block of the stream server: the marker, then padding up to STREAM_BLOCK bytes."""
    return (marker + b"." * STREAM_BLOCK)[:STREAM_BLOCK]


def raise_nofile(need: int) -> tuple[int, int]:
    """Lift RLIMIT_NOFILE so `need` descriptors fit: the soft limit to the hard one, and (as root) the hard
    one to `need` when it is lower. Returns the (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, hard, need)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        return resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def accept_ready(lsock: socket.socket) -> list[socket.socket]:
    """Every connection waiting on a non-blocking listener, non-blocking themselves; out of fds or memory
    it stops early (the rest wait for the next round)."""
    out: list[socket.socket] = []
    while True:
        try:
            csock, _ = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return out
        except OSError as exc:
            if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                return out
            raise
        csock.setblocking(False)
        out.append(csock)


def serve(rr_port: int, crr_port: int, echo_port: int = 0, stream_port: int = 0) -> None:
    """Serve the rr (HTTP/1.1 keep-alive, 1 KB answers) and crr (100 bytes, then close) ports forever; and
    when given, echo (every byte back) and stream (the first line back, then blocks that begin with it,
    until the peer goes away)."""
    raise_nofile(65536)
    ep = select.epoll()
    listeners = {}
    ports = ((rr_port, "rr"), (crr_port, "crr"), (echo_port, "echo"), (stream_port, "stream"))
    for port, kind in ((port, kind) for port, kind in ports if port):
        lsock = _listen(port)
        listeners[lsock.fileno()] = (lsock, kind)
        ep.register(lsock.fileno(), select.EPOLLIN)
    conns: dict[int, _ServerConn] = {}

    def close(conn: _ServerConn) -> None:
        fd = conn.sock.fileno()
        conns.pop(fd, None)
        ep.unregister(fd)
        conn.sock.close()

    def flush(conn: _ServerConn) -> bool:
        """Write what is pending; False when the peer is gone."""
        if conn.block and len(conn.out) < STREAM_BLOCK:
            conn.out += conn.block * 4
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        conn.out = conn.out[sent:]
        ep.modify(conn.sock.fileno(), select.EPOLLIN | (select.EPOLLOUT if conn.out or conn.block else 0))
        return True

    while True:
        for fd, events in ep.poll():
            if fd in listeners:
                lsock, kind = listeners[fd]
                for csock in accept_ready(lsock):
                    csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[csock.fileno()] = _ServerConn(csock, kind)
                    ep.register(csock.fileno(), select.EPOLLIN)
                continue
            conn = conns.get(fd)
            if conn is None:
                continue
            if events & select.EPOLLOUT and (conn.out or conn.block) and not flush(conn):
                close(conn)
                continue
            if not events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                continue
            try:
                data = conn.sock.recv(READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                close(conn)
                continue
            if not data:
                close(conn)
                continue
            if conn.kind in ("echo", "stream"):
                conn.out += data if not conn.block else b""
                if conn.kind == "stream" and not conn.block:
                    conn.block = stream_block(data.split(b"\n", 1)[0])
                if not flush(conn):
                    close(conn)
                continue
            conn.buf += data
            if conn.kind == "crr":
                if len(conn.buf) >= CRR_SIZE:
                    with contextlib.suppress(OSError):
                        conn.sock.send(_CRR_REPLY)
                    close(conn)  # the server closes first: no TIME_WAIT on the client's ports
                continue
            answers = 0
            while True:
                end = conn.buf.find(_HEADER_END)
                if end < 0:
                    break
                total = end + 4 + _content_length(bytes(conn.buf[:end]))
                if len(conn.buf) < total:
                    break
                del conn.buf[:total]
                answers += 1
            if answers:
                conn.out += _RESPONSE * answers
                if not flush(conn):
                    close(conn)


# --- rr client -------------------------------------------------------------------------------------------


@dataclass
class _RrConn:
    sock: socket.socket
    index: int
    next_slot: int  # request number of this connection's next send
    busy: bool = False
    sent_at: float = 0.0
    got: int = 0
    want: int = -1  # total response bytes once the head is parsed
    head: bytearray = field(default_factory=bytearray)


def _connect_blocking(host: str, port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def run_rr(
    host: str, port: int, *, rate: float, conns: int, seconds: float, closed: bool
) -> dict[str, object]:
    """Drive `conns` kept-alive connections at `rate` requests/s (or flat out when `closed`)."""
    request = _request(host)
    ep = select.epoll()
    pool = [_RrConn(_connect_blocking(host, port), k, 0) for k in range(conns)]
    by_fd = {c.sock.fileno(): c for c in pool}
    for c in pool:
        ep.register(c.sock.fileno(), select.EPOLLIN)
    latencies: list[float] = []
    late = errors = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    interval = conns / rate if rate > 0 else 0.0

    def due(c: _RrConn) -> float:
        if closed:
            return 0.0
        return t0 + (c.next_slot * conns + c.index) / rate

    def send(c: _RrConn, now: float) -> None:
        nonlocal late
        if not closed and now - due(c) > LATE_AFTER:
            late += 1
        c.sock.sendall(request)  # 1.1 KB: fits the socket buffer of an idle connection
        c.busy, c.sent_at, c.got, c.want = True, now, 0, -1
        c.head.clear()
        c.next_slot += 1

    while True:
        now = time.perf_counter()
        if now >= end and not any(c.busy for c in pool):
            break
        wait = 1.0
        for c in pool:
            if c.busy or now >= end:
                continue
            slot = due(c)
            if slot <= now:
                send(c, now)
                now = time.perf_counter()
            else:
                wait = min(wait, slot - now)
        if now >= end:
            wait = min(wait, max(0.0, end + 5.0 - now))
            if now > end + 5.0:
                errors += sum(1 for c in pool if c.busy)
                break
        for fd, _ in ep.poll(wait):
            c = by_fd[fd]
            try:
                data = c.sock.recv(READ_SIZE)
            except BlockingIOError:
                continue
            if not data:
                raise ConnectionError(f"{host}:{port} closed a kept-alive connection")
            if c.want < 0:
                c.head += data
                cut = c.head.find(_HEADER_END)
                if cut < 0:
                    continue
                c.want = cut + 4 + _content_length(bytes(c.head[:cut]))
                c.got = len(c.head)
            else:
                c.got += len(data)
            if c.got >= c.want:
                done = time.perf_counter()
                c.busy = False
                latencies.append(done - c.sent_at)
    elapsed = time.perf_counter() - t0
    for c in pool:
        c.sock.close()
    p50, p90, p99, p999 = percentiles(latencies, (50, 90, 99, 99.9))
    return {
        "mode": "closed" if closed else "fixed-rate",
        "target_rps": 0.0 if closed else rate,
        "connections": conns,
        "seconds": elapsed,
        "requests": len(latencies),
        "rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "late_sends": late,
        "errors": errors,
        "interval_s": interval,
        "p50_ms": p50 * 1e3,
        "p90_ms": p90 * 1e3,
        "p99_ms": p99 * 1e3,
        "p999_ms": p999 * 1e3,
        "max_ms": max(latencies, default=0.0) * 1e3,
    }


# --- crr client ------------------------------------------------------------------------------------------


@dataclass
class _CrrConn:
    sock: socket.socket
    started: float
    connected: bool = False
    got: int = 0


def run_crr(host: str, port: int, *, conc: int, seconds: float, count: int = 0) -> dict[str, object]:
    """Keep `conc` short connections in flight for `seconds` (or, with `count`, until that many were
    started, `seconds` then being only the deadline); count completed ones."""
    ep = select.epoll()
    live: dict[int, _CrrConn] = {}
    done: list[float] = []
    errors = 0
    payload = b"c" * CRR_SIZE
    started = 0

    def more() -> bool:
        return time.perf_counter() < end and (count <= 0 or started < count)

    def start() -> None:
        nonlocal started
        started += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            raise OSError(code, f"connect to {host}:{port}: {errno.errorcode.get(code, code)}")
        live[sock.fileno()] = _CrrConn(sock, time.perf_counter())
        ep.register(sock.fileno(), select.EPOLLOUT)

    def finish(c: _CrrConn, ok: bool) -> None:
        nonlocal errors
        fd = c.sock.fileno()
        ep.unregister(fd)
        del live[fd]
        c.sock.close()
        if ok:
            done.append(time.perf_counter() - c.started)
        else:
            errors += 1

    t0 = time.perf_counter()
    end = t0 + seconds
    for _ in range(conc):
        if more():
            start()
    while live:
        now = time.perf_counter()
        if now > end + 5.0:
            for c in list(live.values()):
                finish(c, ok=False)
            break
        for fd, _events in ep.poll(0.5):
            found = live.get(fd)
            if found is None:
                continue
            c = found
            if not c.connected:
                if c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                    finish(c, ok=False)
                else:
                    c.connected = True
                    try:
                        c.sock.send(payload)
                    except OSError:
                        finish(c, ok=False)
                        continue
                    ep.modify(fd, select.EPOLLIN)
                    continue
            else:
                try:
                    data = c.sock.recv(READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    finish(c, ok=False)
                else:
                    if data:
                        c.got += len(data)
                        continue
                    finish(c, ok=c.got >= CRR_SIZE)
            if more():
                start()
    elapsed = time.perf_counter() - t0
    p50, p99 = percentiles(done, (50, 99))
    return {
        "concurrency": conc,
        "seconds": elapsed,
        "connections": len(done),
        "errors": errors,
        "cps": len(done) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": p50 * 1e3,
        "p99_ms": p99 * 1e3,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ambient.bench.loadgen", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--rr-port", type=int, default=8080)
    s.add_argument("--crr-port", type=int, default=8081)
    s.add_argument("--echo-port", type=int, default=0, help="also echo on this port")
    s.add_argument("--stream-port", type=int, default=0, help="also stream marker blocks on this port")
    rr = sub.add_parser("rr")
    rr.add_argument("host")
    rr.add_argument("port", type=int)
    rr.add_argument("--rate", type=float, default=1000.0)
    rr.add_argument("--conns", type=int, default=4)
    rr.add_argument("--seconds", type=float, default=10.0)
    rr.add_argument("--closed", action="store_true", help="no pacing: the generator's ceiling")
    crr = sub.add_parser("crr")
    crr.add_argument("host")
    crr.add_argument("port", type=int)
    crr.add_argument("--conc", type=int, default=4)
    crr.add_argument("--seconds", type=float, default=10.0)
    crr.add_argument("--count", type=int, default=0, help="stop after this many connections (0: --seconds)")
    args = p.parse_args(argv)
    if args.mode == "serve":
        serve(args.rr_port, args.crr_port, args.echo_port, args.stream_port)
        return 0
    if args.mode == "rr":
        out = run_rr(
            args.host, args.port, rate=args.rate, conns=args.conns, seconds=args.seconds, closed=args.closed
        )
    else:
        out = run_crr(args.host, args.port, conc=args.conc, seconds=args.seconds, count=args.count)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
