"""Plain TCP for a pod's connections: the upstream sockets, and the bidirectional copy between two sockets.

Theory of operation
-------------------
`proxy_tcp` is the whole plain-TCP half of every direction (outbound passthrough, inbound plaintext): connect
the upstream socket (made in the pod's namespace, marked, so not captured again; `app_socket` makes the
inbound one from the client's own address when the kernel allows), copy both ways with half-close, and
write the connection's one `ConnectionOutcome`. Cancellation (the pod being removed) interrupts the copy;
the caller's finally closes the client socket, which is upstream's "Immediate" drain.

Every connection reads into the process's one 256 KiB receive buffer (rxbuf.py: a buffer per
connection would cost 300 KiB each). That is only safe if no task can run between filling the buffer and
emptying it, so each step is:
`recv_into(shared)` then an immediate non-blocking `send` — both synchronous, no await between them. Only if
the kernel does not take everything does the unsent tail get *copied out* into a bytes object owned by this
direction, which is then awaited onto the socket. Reads are as large as the kernel offers, so a busy
connection moves up to 256 KiB per loop turn.

With `splice=True` (the default for plaintext passthrough) each direction instead moves bytes
socket -> pipe -> socket with `os.splice` (no copy through user space at all). Pipes (1 MiB when allowed)
come from a process-wide pool and are held only while bytes are in them, so an idle connection costs no
extra fds. benchmarks/passthrough.py measured about half the CPU per GB of the shared-buffer loop on this
machine class.

EOF on one side is propagated as `shutdown(SHUT_WR)` on the other (half-close), and the copy ends when both
directions have. An OSError (reset, broken pipe) on either direction ends both; the first error is raised
as is (never wrapped in an ExceptionGroup) so callers can log it. A copy that ends that way, or is
cancelled, resets both sockets when they are closed (SO_LINGER 0, the same `abort_on_close` the HBONE
relay uses): the application sees ECONNRESET, never a FIN that would make a cut-off transfer look whole.
Only an EOF from the other side becomes a FIN. An upstream that cannot be reached (refused, timed out, no
socket) resets the client too: the app's own connect was accepted by ztunnel, so a FIN would read as the
destination's clean answer.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Callable
from typing import Final

import trio

from services.ztunnel.errors import ConnectError
from services.ztunnel.hbone.relay import abort_on_close
from services.ztunnel.net import connect, describe_os_error
from services.ztunnel.proxy.context import PodContext
from services.ztunnel.rxbuf import receive_view as _view
from services.ztunnel.telemetry.access_log import ConnectionOutcome
from shared.addr import Addr, ip_family
from shared.netns import NetnsError

log = logging.getLogger("ztunnel.proxy")


async def _send_all(sock: socket.socket, data: memoryview) -> None:
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    rest = memoryview(bytes(data[sent:]))  # leave the shared buffer before awaiting
    while rest:
        await trio.lowlevel.wait_writable(sock)
        try:
            sent = sock.send(rest)
        except BlockingIOError:
            continue
        rest = rest[sent:]


async def pump(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> None:
    """Copy src -> dst until EOF on src, then half-close dst. `count(n)` after each chunk is delivered."""
    while True:
        try:
            n = src.recv_into(_view)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(src)
            continue
        if n == 0:
            break
        await _send_all(dst, _view[:n])
        count(n)
        await trio.lowlevel.checkpoint()  # fairness between connections, and a cancellation point
    with contextlib.suppress(OSError):  # peer already gone: the other direction will notice
        dst.shutdown(socket.SHUT_WR)


_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ: Final = 1031
PIPE_SIZE: Final = 1024 * 1024


class PipePool:
    """Empty pipes shared by every splicing connection of the process.

    A direction holds a pipe only while bytes are inside it (between splicing in and finishing splicing
    out), so idle connections cost no pipe fds; at most `keep` spare pipes are kept open.
    """

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._free: list[tuple[int, int]] = []

    def acquire(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default 64 KiB
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        return r, w

    def release(self, pipe: tuple[int, int]) -> None:
        """Give back an *empty* pipe."""
        if len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        """Close a pipe that may still hold bytes (the connection failed half-way)."""
        os.close(pipe[0])
        os.close(pipe[1])


_pipes = PipePool()


async def pump_splice(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> None:
    """Like `pump`, with the bytes moved by the kernel through a pooled pipe (os.splice)."""
    src_fd, dst_fd = src.fileno(), dst.fileno()
    while True:
        pipe = _pipes.acquire()
        try:
            n = os.splice(src_fd, pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            _pipes.release(pipe)
            await trio.lowlevel.wait_readable(src)
            continue
        except BaseException:
            _pipes.release(pipe)  # nothing went in
            raise
        if n == 0:
            _pipes.release(pipe)
            break
        left = n
        try:
            while left:
                try:
                    left -= os.splice(pipe[0], dst_fd, left, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst)
        except BaseException:
            _pipes.discard(pipe)  # may hold undelivered bytes: never reuse
            raise
        _pipes.release(pipe)
        count(n)
        await trio.lowlevel.checkpoint()
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


async def copy_bidirectional(client: socket.socket, upstream: socket.socket,
                             sent: Callable[[int], None], received: Callable[[int], None], *,
                             splice: bool = False) -> None:
    """Copy both ways until both sides reached EOF. `sent` counts client->upstream, `received` the reverse.
    Ended by an error or cancelled: both sockets are left to send RST when their owners close them.

    Raises:
        OSError: the first socket error of either direction (the other direction is cancelled).
    """
    errors: list[OSError] = []

    move = pump_splice if splice else pump

    async def one_way(src: socket.socket, dst: socket.socket, count: Callable[[int], None],
                      scope: trio.CancelScope) -> None:
        try:
            await move(src, dst, count)
        except OSError as exc:
            errors.append(exc)
            scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one_way, client, upstream, sent, nursery.cancel_scope)
            nursery.start_soon(one_way, upstream, client, received, nursery.cancel_scope)
    except BaseException:
        abort_on_close(client)  # cancelled (the pod going away, the drain deadline): the copy did not end
        abort_on_close(upstream)
        raise
    if errors:
        abort_on_close(client)
        abort_on_close(upstream)
        raise errors[0]


async def proxy_tcp(ctx: PodContext, client: socket.socket, dst: Addr, outcome: ConnectionOutcome, *,
                    as_client: Addr | None = None) -> None:
    """Plain TCP from the pod's netns to `dst`: make the upstream socket, connect, copy both ways, write
    `outcome`. Marked, so not captured again; `as_client` (inbound): from the client's address when the
    kernel allows (`app_socket`)."""
    tel = ctx.telemetry
    connections = ctx.connections
    refusal = connections.acquire()  # the upstream connection counts as one more (proxy/limits.py)
    if refusal is not None:
        abort_on_close(client)
        connections.log_refusal(refusal, [("pod", ctx.uid), ("src.addr", outcome.src_addr),
                                          ("dst.addr", outcome.dst_addr), ("direction", outcome.direction)])
        return
    try:
        upstream = (app_socket(ctx, as_client, dst) if as_client is not None
                    else ctx.sockets.upstream(ctx.netns_fd, ip_family(dst[0])))
    except (OSError, NetnsError) as exc:
        connections.release()
        abort_on_close(client)
        error = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        tel.connection_failed(src_addr=outcome.src_addr, dst_addr=outcome.dst_addr,
                              direction=outcome.direction, outcome=outcome,
                              error=f"cannot create the upstream socket: {error}")
        return
    counters = ctx.counters
    tel.connection_opened(outcome)
    outcome.error = "connection drained"
    counters.active_connections += 1
    try:
        await connect(upstream, dst, connect_timeout=ctx.config.connect_timeout)

        def sent(n: int) -> None:
            outcome.bytes_sent += n

        def received(n: int) -> None:
            outcome.bytes_recv += n

        await copy_bidirectional(client, upstream, sent, received, splice=ctx.config.splice)
        outcome.error = None
    except ConnectError as exc:
        abort_on_close(client)  # the upstream refused or never answered: RST, as a direct connect would get
        outcome.error = str(exc)
    except OSError as exc:
        outcome.error = describe_os_error(exc)
    finally:
        counters.active_connections -= 1
        upstream.close()
        connections.release()
        tel.connection_complete(outcome)


def app_socket(ctx: PodContext, src: Addr, dst: Addr) -> socket.socket:
    """A socket in the pod's netns for delivering to the app at `dst`, bound to the client's IP `src` when
    the kernel allows (IP_TRANSPARENT), so the app sees who really called; if it refuses, a plain socket,
    unless ENABLE_ORIG_SRC=true demands the client's address.

    Raises:
        OSError, NetnsError: the socket could not be made (or ENABLE_ORIG_SRC=true and spoofing failed).
    """
    family = ip_family(dst[0])
    if ctx.config.orig_src is False or src[0] == dst[0] or ip_family(src[0]) != family:
        return ctx.sockets.upstream(ctx.netns_fd, family)
    try:
        return ctx.sockets.upstream(ctx.netns_fd, family, bind_source=src[0])
    except OSError as exc:
        if ctx.config.orig_src:
            raise
        log.debug("cannot preserve source address, using a plain connect",
                  extra={"fields": [("src", src[0]), ("error", describe_os_error(exc))]})
        return ctx.sockets.upstream(ctx.netns_fd, family)
