"""One CONNECT tunnel of an HBONE connection, as a Trio half-closeable byte stream.

Theory of operation
-------------------
An `HboneStream` holds no socket: its `HboneConnection` (connection.py) owns the TLS stream and the h2 core.
The connection's reader task calls the stream's underscore methods (`_on_data`, `_on_response`, `_on_end`,
`_on_window`, `_fail`) as events come out of the core; the stream's own callers only mutate the core
(`send_data`, `end_stream`, `reset`) and wake the connection's writer, so no stream task ever writes to the
socket. Received data is queued (and acknowledged to the peer only when taken by `receive_some`), or, once a
sink socket is set (`set_sink`, the relay's fast path), written straight into that socket by the reader.
When the stream is done it tells its connection (`_forget`), which releases its slot.
"""

from __future__ import annotations

import collections
import contextlib
import socket
from collections.abc import Callable
from typing import Protocol

import h2.exceptions
import trio

from services.ztunnel.hbone.core import (
    ERROR_CANCEL,
    ERROR_NO_ERROR,
    ClientCore,
    Header,
    Responded,
    ServerCore,
)
from services.ztunnel.hbone.errors import ConnectionClosedError, HboneError, StreamResetError
from shared.addr import Addr


class StreamOwner(Protocol):
    """What a stream needs from its connection; `connection.HboneConnection` is the one implementation."""

    core: ClientCore | ServerCore

    @property
    def above_high_water(self) -> bool:
        """The connection's writer is behind: HIGH_WATER bytes or more wait unwritten."""
        ...

    def wake_writer(self) -> None:
        """Frames were queued in the core: the writer task should send them."""
        ...

    async def wait_drained(self) -> None:
        """Return once the writer is below its high-water mark again."""
        ...

    def _forget(self, stream: HboneStream) -> None:
        """The stream is done: release its slot."""
        ...


def _check_max_bytes(max_bytes: int | None) -> None:
    if max_bytes is None:
        return
    if not isinstance(max_bytes, int):
        raise TypeError("max_bytes must be an int or None")
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")


class HboneStream(trio.abc.HalfCloseableStream):
    """One CONNECT tunnel: a byte stream with half-close (`send_eof`) over an HBONE connection.

    `aclose()` is graceful (END_STREAM, then RST_STREAM NO_ERROR if the peer is still sending); `reset(code)`
    aborts (RST_STREAM with that code, CANCEL by default). Errors from the peer or the connection surface as
    `trio.BrokenResourceError` whose `__cause__` is a `StreamResetError` or `ConnectionClosedError`.
    `bytes_sent` / `bytes_received` count payload bytes handed to / taken from the tunnel.
    """

    def __init__(self, conn: StreamOwner, stream_id: int, target: Addr,
                 request_headers: tuple[Header, ...] = ()) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.target = target
        self.request_headers = request_headers
        self.status: int | None = None
        self.response_headers: tuple[Header, ...] = ()
        self.bytes_sent = 0
        self.bytes_received = 0
        self._queue: collections.deque[bytes] = collections.deque()
        self._eof_received = False
        self._eof_sent = False
        self._error: HboneError | None = None
        self._closed = False
        self._readable = trio.lowlevel.ParkingLot()
        self._writable = trio.lowlevel.ParkingLot()
        self._send_busy = False
        self._receive_busy = False
        self._sink: socket.socket | None = None
        self._sink_error: OSError | None = None
        self._attention: Callable[[], None] | None = None
        self._eof_delivered = False  # END_STREAM became shutdown(SHUT_WR) of the sink, inline

    # --- called by the connection (reader task) ---

    def _on_data(self, data: bytes, flow_controlled_length: int) -> None:
        padding = flow_controlled_length - len(data)
        if padding:
            self.conn.core.consumed(self.stream_id, padding)
        if not data:
            return
        if self._sink is not None and not self._queue and self._error is None:
            data = self._write_sink(data)
            if not data:
                return
        self._queue.append(data)
        self._readable.unpark_all()
        self._call_attention()

    def _call_attention(self) -> None:
        """Inline delivery cannot go on (bytes queued, an error, ...): the sink's owner must start a task."""
        attention = self._attention
        if attention is not None:
            self._attention = None
            attention()

    def _write_sink(self, data: bytes) -> bytes:
        """Write to the sink socket right away (see `set_sink`); returns what it did not take."""
        assert self._sink is not None
        try:
            sent = self._sink.send(data)
        except BlockingIOError:
            return data
        except OSError as exc:
            # The sink's consumer raises this; the bytes are dropped, as a failed send would drop them.
            self._sink_error = exc
            self._sink = None
            self.conn.core.consumed(self.stream_id, len(data))
            self._readable.unpark_all()
            self._call_attention()
            return b""
        self.conn.core.consumed(self.stream_id, sent)
        self.bytes_received += sent
        return data[sent:]

    def _on_response(self, event: Responded) -> None:
        self.status = event.status
        self.response_headers = event.headers
        if event.status != 200:
            self._fail(StreamResetError(f"the server answered {event.status}", error_code=ERROR_CANCEL))
        self._readable.unpark_all()

    def _on_end(self) -> None:
        self._eof_received = True
        if self._attention is not None and self._sink is not None and not self._queue:
            # Inline delivery with nothing left behind: the half-close is delivered here too.
            with contextlib.suppress(OSError):
                self._sink.shutdown(socket.SHUT_WR)
            self._eof_delivered = True
            return
        self._readable.unpark_all()
        self._call_attention()

    def _fail(self, error: HboneError) -> None:
        if self._error is None:
            self._error = error
        self._readable.unpark_all()
        self._writable.unpark_all()
        self._call_attention()

    def _on_window(self) -> None:
        self._writable.unpark_all()

    def _refused(self, exc: h2.exceptions.ProtocolError) -> trio.BrokenResourceError:
        """h2 refused to send on this stream: fail it with the reason; the error for the caller to raise."""
        if isinstance(exc, h2.exceptions.StreamClosedError):
            self._fail(StreamResetError("the stream was closed by the peer", error_code=ERROR_CANCEL))
        else:
            # h2 sends nothing more once a GOAWAY went either way, not even on streams already open.
            self._fail(ConnectionClosedError("the HBONE connection is going away (GOAWAY)"))
        return trio.BrokenResourceError(str(self._error))

    # --- application API ---

    @property
    def eof_received(self) -> bool:
        """The peer's END_STREAM arrived (all its bytes are in)."""
        return self._eof_received

    @property
    def finished(self) -> bool:
        """Both directions ended cleanly (END_STREAM sent and received)."""
        return self._eof_sent and self._eof_received and self._error is None

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the HBONE stream is closed")
        if self._error is not None:
            raise trio.BrokenResourceError(str(self._error)) from self._error
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was already called on this HBONE stream")

    def send_nowait(self, data: bytes | bytearray | memoryview, *, eof: bool = False) -> int:
        """Queue as much of `data` as the flow-control windows allow, right now; returns how much was taken.

        The bytes taken are copied into frames, so `data` may be reused at once (the shared-buffer copy loop
        relies on this). With `eof`, END_STREAM follows in the same write when all of `data` was taken
        (`send_eof_nowait` is then a no-op); otherwise the caller sends the rest and the EOF itself.
        """
        self._check_send()
        core = self.conn.core
        try:
            taken = core.send_data(self.stream_id, data)
            if eof and taken == len(data) and not self._eof_sent:
                core.end_stream(self.stream_id)
                self._eof_sent = True
        except h2.exceptions.ProtocolError as exc:
            raise self._refused(exc) from self._error
        if taken or eof:
            self.bytes_sent += taken
            self.conn.wake_writer()
        return taken

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is already sending on this HBONE stream")
        self._send_busy = True
        try:
            view = memoryview(data)
            while True:
                view = view[self.send_nowait(view):]
                if not view:
                    break
                await self._writable.park()
            await self.conn.wait_drained()
        finally:
            self._send_busy = False

    async def wait_send_all_might_not_block(self) -> None:
        while True:
            self._check_send()
            if self.conn.core.send_window(self.stream_id) > 0:
                break
            await self._writable.park()
        await self.conn.wait_drained()

    async def wait_drained(self) -> None:
        """Back-pressure after `send_nowait`: return once the connection's unwritten output is small."""
        await self.conn.wait_drained()

    async def send_eof(self) -> None:
        """Half-close: END_STREAM; the peer can keep sending."""
        if self._eof_sent and self._error is None and not self._closed:
            await trio.lowlevel.checkpoint()
            return
        self.send_eof_nowait()
        await self.conn.wait_drained()

    def send_eof_nowait(self) -> None:
        """`send_eof` without waiting for the connection's output to drain (for copy loops that wait for
        back-pressure themselves); a no-op when END_STREAM was already sent."""
        if self._eof_sent and self._error is None and not self._closed:
            return
        self._check_send()
        try:
            self.conn.core.end_stream(self.stream_id)
        except h2.exceptions.ProtocolError as exc:
            raise self._refused(exc) from self._error
        self._eof_sent = True
        self.conn.wake_writer()

    def set_sink(self, sock: socket.socket | None, *, attention: Callable[[], None] | None = None) -> None:
        """Deliver received bytes straight into `sock` (non-blocking) from the connection's reader.

        This saves a task switch per received chunk. Only bytes the socket does not take at once are queued
        for `receive_some`, whose caller must then write them to the same socket, in order, before calling
        it again. If writing to the socket fails, the next `receive_some` raises that `OSError`.

        With `attention`, nobody is waiting in `receive_some` yet: the reader also turns END_STREAM into
        `shutdown(SHUT_WR)` of `sock` itself, and calls `attention()` (once, synchronously) as soon as a task
        is needed: bytes had to be queued, the socket or the stream failed, or the peer ended while bytes
        were queued. See `needs_receiver`.
        """
        self._sink = sock
        self._attention = attention if sock is not None else None

    @property
    def needs_receiver(self) -> bool:
        """Something only a task in `receive_some` can handle is already there (bytes queued, an error, an
        END_STREAM not yet delivered)."""
        return (bool(self._queue) or self._error is not None or self._sink_error is not None
                or (self._eof_received and not self._eof_delivered))

    @property
    def eof_delivered(self) -> bool:
        """END_STREAM was already turned into `shutdown(SHUT_WR)` of the sink by the reader."""
        return self._eof_delivered

    def receive_nowait(self, max_bytes: int | None = None) -> bytes | None:
        """Queued bytes (b"" at the peer's END_STREAM), or None when nothing is there yet."""
        if self._closed:
            raise trio.ClosedResourceError("the HBONE stream is closed")
        if self._sink_error is not None:
            raise self._sink_error
        if self._queue:
            chunk = self._queue.popleft()
            if max_bytes is not None and len(chunk) > max_bytes:
                self._queue.appendleft(chunk[max_bytes:])
                chunk = chunk[:max_bytes]
            self.conn.core.consumed(self.stream_id, len(chunk))
            self.conn.wake_writer()
            self.bytes_received += len(chunk)
            return chunk
        if self._eof_received:  # everything arrived; a reset after that loses nothing
            return b""
        if self._error is not None:
            raise trio.BrokenResourceError(str(self._error)) from self._error
        return None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return await self.receive_chunk(max_bytes)

    async def receive_chunk(self, max_bytes: int | None = None) -> bytes:
        """`receive_some` without its first checkpoint: returns at once when bytes are queued, so it is a
        checkpoint only when it waits. For copy loops that reach a checkpoint elsewhere on every turn."""
        _check_max_bytes(max_bytes)
        if self._receive_busy:
            raise trio.BusyResourceError("another task is already receiving on this HBONE stream")
        self._receive_busy = True
        try:
            while True:
                data = self.receive_nowait(max_bytes)
                if data is not None:
                    return data
                await self._readable.park()
        finally:
            self._receive_busy = False

    def reset(self, error_code: int = ERROR_CANCEL) -> None:
        """RST_STREAM now; later calls on this stream raise."""
        if self._error is None:
            self._error = StreamResetError(f"the stream was reset locally (code {error_code})",
                                           error_code=error_code)
        self.conn.core.reset(self.stream_id, error_code)
        self.conn.wake_writer()
        self._release()

    def _release(self) -> None:
        # Hand the window of anything still queued back to the connection: the peer may keep other streams.
        queued = sum(len(chunk) for chunk in self._queue)
        self._queue.clear()
        if queued:
            self.conn.core.consumed(self.stream_id, queued)
        self._readable.unpark_all()
        self._writable.unpark_all()
        self.conn._forget(self)

    def close_nowait(self) -> None:
        """Graceful close: END_STREAM if not sent yet, then, if the peer is still sending, RST_STREAM
        NO_ERROR, which only asks it to stop (RFC 9113 §8.1), like a TCP close with the peer still talking.

        To abort instead (the peer must not take what it got as complete), call `reset()` first.
        """
        if self._closed:
            return
        core = self.conn.core
        if self._error is None and core.stream_open(self.stream_id):
            if not self._eof_sent:
                try:
                    core.end_stream(self.stream_id)
                    self._eof_sent = True
                except h2.exceptions.ProtocolError:  # closed by the peer, or the connection is going away
                    pass
            if not self._eof_received:
                core.reset(self.stream_id, ERROR_NO_ERROR)
            self.conn.wake_writer()
        self._closed = True
        self._release()

    async def aclose(self) -> None:
        self.close_nowait()
        await trio.lowlevel.checkpoint()
