"""`python -m ambient.bench.connload`: the connection-count and fault loads of `ambient bench`.

    connload hold HOST PORT --conns 10000                N idle connections; on a line on stdin, all echo
    connload probe HOST PORT --seconds 60 --interval 1   a new connection per interval (and one kept one)
    connload stream HOST PORT --marker M                 a download that carries a marker, until it ends

The servers are loadgen's (`loadgen serve --echo-port 8090 --stream-port 8091`). Like loadgen.py: plain
non-blocking sockets on one epoll loop per process, JSON on stdout. Every mode first lifts its
RLIMIT_NOFILE (the soft limit to the hard one, and as root the hard one up to what it needs) so 10,000
sockets fit in one process.

Theory of operation
-------------------
hold: opens `conns` connections with at most `--conc` connects in flight; each is proved end to end at
once (one byte sent, its echo read), then left idle. It prints `{"event": "held", ...}` and waits for a
line on stdin; then every connection sends 4 bytes and waits for their echo, and the outcome of each is
counted (ok, reset, eof, timeout, error) in `{"event": "echoed", ...}`. The bench samples both ztunnels'
RSS and fds between the two events, or restarts a ztunnel there.

probe: every `interval` a fresh connection sends one byte and reads its echo (deadline: the interval,
at least 1 s); with `--keep` one connection opened at the start echoes a byte at every interval too. Each
attempt is reported with its CLOCK_MONOTONIC time (the same clock in every netns), so the bench can tell
how long new connections failed after it did something.

stream: connects, sends a line with the marker, and reads what the server sends (blocks that each begin
with the marker) until `--bytes`, the end of the stream or an error; `{"event": "started"}` once the
first MiB arrived. The outcome says how it ended: `complete`, `reset` (ECONNRESET/EPIPE: the peer
aborted), `eof` (a clean end before `--bytes`: a truncated transfer that looks complete), `timeout` or
`error`. With `--retry-seconds` it then keeps opening new connections that send the marker, so a capture
shows whether any of them leaves the pod in clear text.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import select
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ambient.bench.loadgen import raise_nofile

ECHO_PORT = 8090  # loadgen serve --echo-port, in the server pod
STREAM_PORT = 8091  # loadgen serve --stream-port
READ_SIZE = 65536
PING = b"ping"
STARTED_AFTER = 1 << 20  # stream: `started` once this many bytes arrived
RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})


def classify(exc: OSError) -> str:
    """The outcome name of a socket error: reset, timeout or error."""
    if exc.errno in RESET_ERRNOS:
        return "reset"
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return "timeout"
    return "error"


def _emit(doc: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


# --- hold ------------------------------------------------------------------------------------------------


@dataclass
class _Held:
    sock: socket.socket
    phase: str = "connecting"  # connecting, hello, idle, ping, done
    got: int = 0
    outcome: str = ""


def _drive(ep: select.epoll, conns: dict[int, _Held], want: str, deadline: float) -> None:
    """Run the connections' state machines until every one is `want` or done, or `deadline` passes."""
    while any(c.phase not in (want, "done") for c in conns.values()):
        wait = deadline - time.monotonic()
        if wait <= 0:
            break
        for fd, _ in ep.poll(min(wait, 0.5)):
            c = conns.get(fd)
            if c is None or c.phase in ("idle", "done"):
                continue
            try:
                if c.phase == "connecting":
                    code = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise OSError(code, os.strerror(code))
                    c.sock.send(b"h")
                    c.phase = "hello"
                    ep.modify(fd, select.EPOLLIN)
                    continue
                data = c.sock.recv(READ_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                _finish(ep, c, classify(exc))
                continue
            if not data:
                _finish(ep, c, "eof")
                continue
            c.got += len(data)
            if c.phase == "hello" and c.got >= 1:
                c.phase, c.got = "idle", 0
                ep.unregister(fd)
            elif c.phase == "ping" and c.got >= len(PING):
                _finish(ep, c, "ok")


def _finish(ep: select.epoll, c: _Held, outcome: str) -> None:
    if c.phase not in ("idle", "done"):
        with contextlib.suppress(OSError, ValueError):
            ep.unregister(c.sock.fileno())
    c.phase, c.outcome = "done", outcome


def _counts(conns: Sequence[_Held], names: Sequence[str]) -> dict[str, int]:
    out = dict.fromkeys(names, 0)
    for c in conns:
        out[c.outcome or "timeout"] = out.get(c.outcome or "timeout", 0) + 1
    return out


def hold(host: str, port: int, *, conns: int, conc: int, timeout: float) -> None:
    """Open `conns` proved connections, report, wait for a line on stdin, echo on all, report, close."""
    soft, _ = raise_nofile(conns + 256)
    t0 = time.monotonic()
    ep = select.epoll()
    by_fd: dict[int, _Held] = {}
    everyone: list[_Held] = []
    deadline = t0 + timeout
    while len(everyone) < conns and time.monotonic() < deadline:
        for _ in range(min(conc, conns - len(everyone))):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            held = _Held(sock)
            code = sock.connect_ex((host, port))
            everyone.append(held)
            if code not in (0, errno.EINPROGRESS):
                held.phase, held.outcome = "done", "error"
                continue
            by_fd[sock.fileno()] = held
            ep.register(sock.fileno(), select.EPOLLOUT)
        _drive(ep, by_fd, "idle", deadline)
        by_fd = {fd: c for fd, c in by_fd.items() if c.phase not in ("idle", "done")}
    idle = [c for c in everyone if c.phase == "idle"]
    failed = [c for c in everyone if c.phase != "idle"]
    _emit({
        "event": "held", "held": len(idle), "failed": len(failed), "wanted": conns,
        "seconds": time.monotonic() - t0, "nofile": soft,
        "failures": _counts(failed, ("reset", "eof", "timeout", "error")),
    })  # fmt: skip
    sys.stdin.readline()
    t1 = time.monotonic()
    live: dict[int, _Held] = {}
    for c in idle:
        try:
            c.sock.send(PING)
        except OSError as exc:
            c.phase, c.outcome = "done", classify(exc)
            continue
        c.phase, c.got = "ping", 0
        live[c.sock.fileno()] = c
        ep.register(c.sock.fileno(), select.EPOLLIN)
    _drive(ep, live, "done", time.monotonic() + timeout)
    counts = _counts(idle, ("ok", "reset", "eof", "timeout", "error"))
    _emit({"event": "echoed", "held": len(idle), **counts, "seconds": time.monotonic() - t1})
    for c in everyone:
        c.sock.close()


# --- probe -----------------------------------------------------------------------------------------------


def _echo_once(sock: socket.socket, data: bytes) -> str:
    try:
        sock.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = sock.recv(READ_SIZE)
            if not chunk:
                return "eof"
            got += chunk
        return "ok"
    except OSError as exc:
        return classify(exc)


def probe(host: str, port: int, *, seconds: float, interval: float, keep: bool, until_stdin: bool) -> None:
    """A new echo connection every `interval` for `seconds` (and one kept connection's echo with --keep);
    with `until_stdin` it also stops at a line on stdin."""
    limit = max(1.0, interval)
    kept: socket.socket | None = None
    if keep:
        kept = socket.create_connection((host, port), timeout=limit)
    attempts: list[list[object]] = []
    kept_results: list[list[object]] = []
    end = time.monotonic() + seconds
    while True:
        started = time.monotonic()
        if started >= end:
            break
        try:
            with socket.create_connection((host, port), timeout=limit) as sock:
                outcome = _echo_once(sock, b"p")
        except OSError as exc:
            outcome = classify(exc)
        attempts.append([started, outcome])
        if kept is not None:
            kept_results.append([time.monotonic(), _echo_once(kept, b"k")])
        pause = max(0.0, started + interval - time.monotonic())
        if until_stdin:
            ready, _, _ = select.select([sys.stdin], [], [], pause)
            if ready:
                break
        else:
            time.sleep(pause)
    if kept is not None:
        kept.close()
    _emit({"event": "probed", "attempts": attempts, "kept": kept_results})


# --- stream ----------------------------------------------------------------------------------------------


def stream(host: str, port: int, *, marker: str, want: int, seconds: float, retry_seconds: float) -> None:
    """Download until `want` bytes, the end or an error; then (optionally) retry new connections."""
    line = marker.encode() + b"\n"
    received, outcome, why = 0, "timeout", ""
    started = False
    end = time.monotonic() + seconds
    try:
        with socket.create_connection((host, port), timeout=5.0) as sock:
            sock.sendall(line)
            while received < want:
                left = end - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(min(left, 5.0))
                try:
                    data = sock.recv(READ_SIZE)
                except TimeoutError:
                    continue
                if not data:
                    outcome = "eof"
                    break
                received += len(data)
                if not started and received >= STARTED_AFTER:
                    started = True
                    _emit({"event": "started", "received": received})
            else:
                outcome = "complete"
    except OSError as exc:
        outcome, why = classify(exc), f"{type(exc).__name__}: {exc}"
    retries: dict[str, int] = {}
    retry_end = time.monotonic() + retry_seconds
    while time.monotonic() < retry_end:
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                result = _echo_once(sock, line)
        except OSError as exc:
            result = classify(exc)
        retries[result] = retries.get(result, 0) + 1
        time.sleep(0.1)
    _emit({"event": "ended", "received": received, "outcome": outcome, "error": why, "retries": retries})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ambient.bench.connload", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    h = sub.add_parser("hold")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("--conns", type=int, default=10000)
    h.add_argument("--conc", type=int, default=200, help="connects in flight while opening")
    h.add_argument("--timeout", type=float, default=300.0, help="seconds for opening, and for echoing")
    pr = sub.add_parser("probe")
    pr.add_argument("host")
    pr.add_argument("port", type=int)
    pr.add_argument("--seconds", type=float, default=60.0)
    pr.add_argument("--interval", type=float, default=1.0)
    pr.add_argument("--keep", action="store_true", help="also echo on one connection kept open throughout")
    pr.add_argument("--until-stdin", action="store_true", help="also stop at a line on stdin")
    st = sub.add_parser("stream")
    st.add_argument("host")
    st.add_argument("port", type=int)
    st.add_argument("--marker", required=True)
    st.add_argument("--bytes", type=int, default=1 << 40)
    st.add_argument("--seconds", type=float, default=60.0)
    st.add_argument("--retry-seconds", type=float, default=0.0)
    args = p.parse_args(argv)
    if args.mode == "hold":
        hold(args.host, args.port, conns=args.conns, conc=args.conc, timeout=args.timeout)
    elif args.mode == "probe":
        probe(
            args.host,
            args.port,
            seconds=args.seconds,
            interval=args.interval,
            keep=args.keep,
            until_stdin=args.until_stdin,
        )
    else:
        stream(args.host, args.port, marker=args.marker, want=args.bytes, seconds=args.seconds,
               retry_seconds=args.retry_seconds)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
