"""Copy bytes both ways between an HBONE stream and a plain TCP socket, with half-close.

Theory of operation
-------------------
Socket -> stream reads into the process-wide receive buffer (the one the TLS reader uses) and hands the bytes
to the h2 core synchronously (`send_nowait`), which copies what the flow-control windows allow into frames;
only a tail the windows did not take is copied out before awaiting. Then it waits for the connection's
writer to drain (`wait_drained`): that is the back-pressure from a slow peer.

Stream -> socket: the connection's reader writes arriving bytes straight into the socket (the stream's
sink), returning the window to the peer, so a request/response turn costs no extra task switch; it also
turns END_STREAM into `shutdown(SHUT_WR)`. This direction gets a task of its own only when the reader
cannot go on alone (most short connections never need one): what the kernel buffer did not take is queued,
and the task takes it (`receive_chunk`) and writes it, waiting for the socket, with the sink off meanwhile,
so a slow application holds back the peer through HTTP/2 flow control.

EOF on the socket becomes END_STREAM; END_STREAM becomes `shutdown(SHUT_WR)`. The relay ends when both
directions ended, or when the peer, after its END_STREAM, resets with NO_ERROR (it wants nothing more).
The first error of either direction (reset, socket error, connection loss) ends both, the stream is reset
if it is still open, and that error is raised as is. A relay that ends that way, or is cancelled, leaves the
socket to be reset when its owner closes it (`abort_on_close`: SO_LINGER 0, so the close sends RST): the
application sees ECONNRESET, never a FIN that would pass a truncated transfer off as complete. Only the
peer's clean END_STREAM becomes a FIN.
"""

from __future__ import annotations

import contextlib
import socket
import struct

import trio

from services.ztunnel.hbone.core import ERROR_CONNECT, ERROR_NO_ERROR
from services.ztunnel.hbone.errors import StreamResetError
from services.ztunnel.hbone.stream import HboneStream
from services.ztunnel.rxbuf import receive_view as _shared_view


async def _sock_send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


async def socket_to_stream(sock: socket.socket, stream: HboneStream, *, fresh: bool = False) -> None:
    """Copy until EOF on `sock`, then END_STREAM. `fresh`: the socket was connected just now, so it waits for
    the app's first bytes instead of starting with a recv that would fail with EAGAIN."""
    size = len(_shared_view)
    first = True
    if fresh:
        await trio.lowlevel.wait_readable(sock)
    while True:
        try:
            n = sock.recv_into(_shared_view)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if n == 0:
            stream.send_eof_nowait()
            if stream.conn.above_high_water:
                await stream.wait_drained()
            return
        eof = False
        failed: OSError | None = None
        if first and n < size:
            # A short first read: an app that writes and closes at once (an answer with `Connection: close`,
            # TCP_CRR) has usually sent its FIN with it. One more recv finds it, and the data and END_STREAM
            # leave in one TLS record (one write here, one read turn at the peer) instead of two. Only on
            # the first read, so a long-lived connection never pays the extra EAGAIN.
            try:
                more = sock.recv_into(_shared_view[n:])
            except BlockingIOError:
                more = -1
            except OSError as exc:  # a reset: deliver what came before it first, as the next read would
                failed, more = exc, -1
            if more == 0:
                eof = True
            elif more > 0:
                n += more
        first = False
        taken = stream.send_nowait(_shared_view[:n], eof=eof)
        if taken < n:
            await stream.send_all(bytes(_shared_view[taken:n]))  # leave the shared buffer before awaiting
        if failed is not None:
            raise failed
        if eof:
            stream.send_eof_nowait()  # a no-op unless the windows held part of the data back
            if stream.conn.above_high_water:
                await stream.wait_drained()
            return
        if taken < n:
            continue
        if n < size and not stream.conn.above_high_water:
            # The kernel gave us all it had: wait for more instead of a recv that fails with EAGAIN (a syscall
            # and an exception per request/response turn). The wait is the checkpoint.
            await trio.lowlevel.wait_readable(sock)
        else:
            await stream.wait_drained()


async def stream_to_socket(stream: HboneStream, sock: socket.socket) -> None:
    """Copy until END_STREAM, then shut down the socket's write side.

    While this waits, the connection's reader writes arriving bytes into `sock` itself (`set_sink`): this
    task only sees what the socket did not take at once, and writes that, waiting for the socket.
    """
    try:
        while True:
            stream.set_sink(sock)
            # No checkpoint of its own when bytes are queued: the send below waits whenever the socket is
            # full, and the queue empties (then this waits) since only the reader task fills it.
            data = await stream.receive_chunk()
            if not data:
                if not stream.eof_delivered:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                return
            stream.set_sink(None)  # until this chunk is out: later bytes queue behind it
            await _sock_send_all(sock, data)
    finally:
        stream.set_sink(None)


_LINGER_ABORT = struct.pack("ii", 1, 0)


def abort_on_close(sock: socket.socket) -> None:
    """SO_LINGER {on, 0}: closing `sock` sends RST (the peer's reads fail with ECONNRESET) instead of FIN."""
    with contextlib.suppress(OSError):  # already closed or reset by the peer: nothing to tell it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)


def _peer_done(stream: HboneStream, exc: BaseException) -> bool:
    """The peer ended its side and then reset with NO_ERROR: "stop sending, I am done" (RFC 9113 §8.1)."""
    cause = exc.__cause__
    return (stream.eof_received and isinstance(cause, StreamResetError)
            and cause.error_code == ERROR_NO_ERROR)


async def relay(stream: HboneStream, sock: socket.socket, *, fresh: bool = False) -> None:
    """Copy both ways until both directions ended. Byte counts are on `stream.bytes_sent/_received`.
    `fresh`: `sock` was connected just now (the server's socket to the app): see `socket_to_stream`.

    Raises:
        OSError: the socket failed.
        trio.BrokenResourceError: the HBONE stream or connection failed (`__cause__` says how).
    """
    errors: list[BaseException] = []
    try:
        await _relay(stream, sock, errors, fresh)
    except BaseException:
        abort_on_close(sock)  # cancelled (drain deadline, the pod going away): the tunnel did not end
        raise
    if errors:
        abort_on_close(sock)
        if not stream.finished:
            stream.reset(ERROR_CONNECT)
        raise errors[0]


async def _relay(stream: HboneStream, sock: socket.socket, errors: list[BaseException], fresh: bool) -> None:
    """Both directions; the first error of either goes to `errors` and ends both."""
    async def one_way(direction: str, scope: trio.CancelScope) -> None:
        try:
            if direction == "up":
                await socket_to_stream(sock, stream, fresh=fresh)
            else:
                await stream_to_socket(stream, sock)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if direction == "up" and _peer_done(stream, exc):
                return
            errors.append(exc)
            scope.cancel()

    async with trio.open_nursery() as nursery:
        down_started = False

        def start_down() -> None:
            nonlocal down_started
            if not down_started:
                down_started = True
                nursery.start_soon(one_way, "down", nursery.cancel_scope)

        # The down direction starts inline (the reader writes into `sock` itself) and gets its own task
        # only when it needs one: most short connections never do, which saves a task per connection.
        try:
            stream.set_sink(sock, attention=start_down)
            if stream.needs_receiver:
                start_down()
            await one_way("up", nursery.cancel_scope)
        finally:
            if not down_started:
                stream.set_sink(None)  # no attention call may reach this nursery once it is closing
        if not down_started:  # upstream done, downstream still inline: finish it in this task
            down_started = True
            await one_way("down", nursery.cancel_scope)
