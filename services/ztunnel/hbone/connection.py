"""Trio glue for one HBONE connection: a TLS stream, an h2 core, and the tunnel streams multiplexed on it.

Theory of operation
-------------------
`HboneConnection.run()` owns the connection and runs three tasks in one nursery:

* the **reader** pulls batches of plaintext from the TLS stream (`receive_view`, the shared buffer), feeds
  them to the core *before any await*, and dispatches the events to `HboneStream`s: data is queued on the
  stream, or written straight into the stream's sink socket when it has one (`HboneStream.set_sink`, what
  the relay uses), windows and resets wake the stream's waiters, and (server) each valid CONNECT starts a
  handler task in the same nursery;
* the **writer** is the only task that writes to the socket: it drains `core.data_to_send()` whenever someone
  woke it. Stream tasks only mutate the core and wake the writer, so a stream task being cancelled can never
  tear a frame; if the writer itself is cancelled mid-write the TLS stream marks itself broken;
* the **pinger** sends a PING every `ping_interval` seconds and ends the connection when no ACK arrives within
  `ping_timeout` (upstream: 10 s / 20 s).

Memory stays bounded both ways. Inbound, a stream's queued bytes are acknowledged to the peer (WINDOW_UPDATE)
only when the application takes them from `receive_some`, so a slow consumer holds at most a stream window.
Outbound, `send_all` takes only what the peer's windows allow, and waits while more than `HIGH_WATER` bytes
sit in the core unwritten: a peer that stops reading stops the writer, which stops the senders.

When the connection ends (EOF, GOAWAY drained, protocol error, PING timeout, TLS error, cancellation) every
stream still open is failed with `ConnectionClosedError`, so their tasks see `BrokenResourceError`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Final

import h2.exceptions
import trio

from services.ztunnel.hbone.core import (
    ERROR_CANCEL,
    ERROR_NO_ERROR,
    Addr,
    ClientCore,
    ConnectionClosed,
    ConnectRequested,
    DataReceived,
    Event,
    Header,
    PingAcked,
    Responded,
    ServerCore,
    StreamEnded,
    StreamRejected,
    StreamReset,
    WindowOpened,
)
from services.ztunnel.hbone.errors import (
    ConnectionClosedError,
    HboneError,
    HboneProtocolError,
    HttpStatusError,
    StreamResetError,
)
from services.ztunnel.hbone.tlsstream import TlsSocketStream
from shared.identity import SpiffeId

log = logging.getLogger("ztunnel.hbone")

HIGH_WATER: Final = 1024 * 1024
PING_INTERVAL: Final = 10.0
PING_TIMEOUT: Final = 20.0


def new_traceparent() -> str:
    """`00-<32 hex trace id>-<16 hex parent id>-00`, random per connection (SPEC §5)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"


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

    def __init__(self, conn: HboneConnection, stream_id: int, target: Addr,
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

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of `data` as the flow-control windows allow, right now; returns how much was taken.

        The bytes taken are copied into frames, so `data` may be reused at once (the shared-buffer copy loop
        relies on this).
        """
        self._check_send()
        try:
            taken = self.conn.core.send_data(self.stream_id, data)
        except h2.exceptions.ProtocolError as exc:
            raise self._refused(exc) from self._error
        if taken:
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


class HboneConnection:
    """One HBONE (mTLS + HTTP/2) connection, either role. Create, then `await nursery.start(conn.run)`.

    Args:
        tls: a handshaken TLS stream (owned: closed when `run` ends).
        core: `ClientCore()` or `ServerCore(local_ips)`.
        peer_identity: the verified SPIFFE id of the peer.
        local_addr / peer_addr: the TCP endpoints (for logs).
    """

    def __init__(self, tls: TlsSocketStream, core: ClientCore | ServerCore, *, peer_identity: SpiffeId,
                 local_addr: Addr, peer_addr: Addr, ping_interval: float | None = PING_INTERVAL,
                 ping_timeout: float = PING_TIMEOUT) -> None:
        self.tls = tls
        self.core = core
        self.peer_identity = peer_identity
        self.local_addr = local_addr
        self.peer_addr = peer_addr
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.streams: dict[int, HboneStream] = {}
        self.error: BaseException | None = None
        self.dead = False
        self.on_request: Callable[[HboneStream, ConnectRequested], None] | None = None
        self.on_rejected: Callable[[StreamRejected], None] | None = None
        self._activity = trio.lowlevel.ParkingLot()
        self._writer_parks = 0
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._writing = False  # the writer task is in tls.send_all
        self._pending: memoryview | None = None  # the rest of an inline write, for the writer to send first
        self._drained_lot = trio.lowlevel.ParkingLot()
        self._ping_acked: trio.Event | None = None
        self._pings = 0
        self._nursery: trio.Nursery | None = None
        self._closed = trio.Event()
        self.active_streams = 0
        self.last_activity = trio.current_time()  # a stream opened or closed (Trio clock), for idle release

    # --- lifetime ---

    async def run(self, *, task_status: trio.TaskStatus[HboneConnection] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it ends; never raises for peer or network failures (see `.error`)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                if self.ping_interval is not None:
                    nursery.start_soon(self._pinger)
                task_status.started(self)
                try:
                    await self._reader()
                except (HboneError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._set_error(exc)
                # Give the writer a moment to flush a GOAWAY (ours or h2's after a protocol error).
                with trio.move_on_after(1):
                    await self._flushed()
                nursery.cancel_scope.cancel()
        finally:
            self._shutdown()

    def _set_error(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            log.debug("HBONE connection ended", extra={"fields": [
                ("peer", f"{self.peer_addr[0]}:{self.peer_addr[1]}"), ("identity", str(self.peer_identity)),
                ("error", str(exc))]})

    def _shutdown(self) -> None:
        self.dead = True
        reason = ConnectionClosedError(
            f"the HBONE connection to {self.peer_addr[0]}:{self.peer_addr[1]} ended"
            + (f": {self.error}" if self.error is not None else ""))
        for stream in list(self.streams.values()):
            stream._fail(reason)
        self.tls.close_nowait()
        self._drained_lot.unpark_all()
        self._activity.unpark_all()
        self._closed.set()

    def close(self, error_code: int = ERROR_NO_ERROR) -> None:
        """GOAWAY, then end the connection once it is flushed (at most 1 s later). Streams still open are
        failed: callers close their streams first (the pool closes only idle connections)."""
        if self.dead:
            return
        self.core.close(error_code)
        self.wake_writer()
        if self._nursery is not None:
            self._nursery.start_soon(self._close_after_flush)

    async def _close_after_flush(self) -> None:
        with trio.move_on_after(1):
            await self._flushed()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def aclose(self) -> None:
        """Close now (GOAWAY if possible) and wait for `run` to finish; closes the TLS stream if `run` was
        never started."""
        if self.dead:
            await trio.lowlevel.checkpoint()
        elif self._nursery is None:
            self._shutdown()
            await trio.lowlevel.checkpoint()
        else:
            self.close()
            await self._closed.wait()

    # --- writer ---

    def wake_writer(self) -> None:
        """Get queued output moving: written inline when the writer is idle, else the writer is woken.

        Inline, the calling task SSL_writes without waiting (synchronously: it cannot be cancelled half-way);
        whatever the socket did not take is handed to the writer, which sends exactly that rest first. This
        saves the writer's wake/park task switches on every request/response turn.
        """
        if not self.core.has_output:
            return
        if self._writing or self._pending is not None or self._nursery is None or self.dead:
            self._writer_lot.unpark_all()
            return
        data = self.core.data_to_send()
        self._drained_lot.unpark_all()
        try:
            sent = self.tls.send_nowait(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            sent = 0  # the writer meets the same error and ends the connection
        if sent < len(data):
            self._pending = memoryview(data)[sent:]
            self._writer_lot.unpark_all()

    async def _writer(self) -> None:
        try:
            while True:
                if self._pending is not None:
                    data: bytes | bytearray | memoryview = self._pending
                    self._pending = None
                else:
                    data = self.core.data_to_send()
                if data:
                    self._drained_lot.unpark_all()
                    self._writing = True
                    try:
                        await self.tls.send_all(data)
                    finally:
                        self._writing = False
                    continue
                self._writer_parks += 1
                self._drained_lot.unpark_all()
                await self._writer_lot.park()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._set_error(exc)
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()

    @property
    def above_high_water(self) -> bool:
        """`wait_drained` would block: HIGH_WATER bytes or more wait unwritten in the core."""
        return self.core.buffered >= HIGH_WATER and not self.dead

    async def wait_drained(self) -> None:
        """Return once fewer than HIGH_WATER bytes wait unwritten in the core (a checkpoint either way)."""
        await trio.lowlevel.checkpoint()
        while self.core.buffered >= HIGH_WATER and not self.dead:
            await self._drained_lot.park()

    async def _flushed(self) -> None:
        """Return once everything queued before the call is written (the writer parked again since)."""
        parks = self._writer_parks
        self._writer_lot.unpark_all()  # even with nothing queued: it must park again to count
        while not self.dead and self._writer_parks == parks:
            await self._drained_lot.park()

    # --- pinger ---

    async def _pinger(self) -> None:
        assert self.ping_interval is not None
        while True:
            await trio.sleep(self.ping_interval)
            self._pings += 1
            acked = self._ping_acked = trio.Event()
            self.core.ping(self._pings.to_bytes(8, "big"))
            self.wake_writer()
            with trio.move_on_after(self.ping_timeout):
                await acked.wait()
            if not acked.is_set():
                self._set_error(ConnectionClosedError(
                    f"no PING acknowledgement within {self.ping_timeout:g}s, the peer is unresponsive"))
                if self._nursery is not None:
                    self._nursery.cancel_scope.cancel()
                return

    # --- reader ---

    async def _reader(self) -> None:
        while True:
            view = await self.tls.receive_view()
            if not view:
                if self.core.goaway_received or self.core.closed:
                    return
                raise ConnectionClosedError("the peer closed the connection")
            try:
                events = self.core.receive_data(view)
            except HboneProtocolError:
                self.wake_writer()
                raise
            for event in events:
                self._dispatch(event)
            self.wake_writer()
            if self.core.goaway_received and not self.streams:
                return

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.core.consumed(event.stream_id, event.flow_controlled_length)
            else:
                stream._on_data(event.data, event.flow_controlled_length)
        elif isinstance(event, WindowOpened):
            if event.stream_id is None:
                for stream in self.streams.values():
                    stream._on_window()
            elif (stream := self.streams.get(event.stream_id)) is not None:
                stream._on_window()
        elif isinstance(event, StreamEnded):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream._on_end()
        elif isinstance(event, StreamReset):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream._fail(StreamResetError(f"the peer reset the stream (code {event.error_code})",
                                              error_code=event.error_code))
        elif isinstance(event, Responded):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream._on_response(event)
        elif isinstance(event, ConnectRequested):
            self._on_connect(event)
        elif isinstance(event, StreamRejected):
            if self.on_rejected is not None:
                self.on_rejected(event)
        elif isinstance(event, PingAcked):
            if self._ping_acked is not None:
                self._ping_acked.set()
        elif isinstance(event, ConnectionClosed):
            for sid, stream in list(self.streams.items()):
                if sid > event.last_stream_id:
                    stream._fail(ConnectionClosedError("the server is going away and did not process this "
                                                       "stream (GOAWAY)"))

    def _on_connect(self, event: ConnectRequested) -> None:
        if self.on_request is None or self.core.closed:
            assert isinstance(self.core, ServerCore)
            self.core.respond(event.stream_id, 503)
            return
        stream = HboneStream(self, event.stream_id, event.target, event.headers)
        self._adopt(stream)
        self.on_request(stream, event)

    # --- streams ---

    def _adopt(self, stream: HboneStream) -> None:
        self.streams[stream.stream_id] = stream
        self.active_streams += 1
        self.last_activity = trio.current_time()
        self._activity.unpark_all()

    def _forget(self, stream: HboneStream) -> None:
        if self.streams.pop(stream.stream_id, None) is not None:
            self.active_streams -= 1
            self.last_activity = trio.current_time()
            self._activity.unpark_all()

    async def wait_activity(self) -> None:
        """Return at the next stream opened or closed (or when the connection ends)."""
        if self.dead:
            await trio.lowlevel.checkpoint()
            return
        await self._activity.park()

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run a task in the connection's nursery (cancelled when the connection ends)."""
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def open_stream(self, target: Addr, *, forwarded_for: Addr, traceparent: str | None = None,
                          baggage: str | None = None, host: str | None = None) -> HboneStream:
        """Client: CONNECT `target` on a new stream and wait for the answer.

        Raises:
            HttpStatusError: the server answered anything but 200 (400, 401, 503, ...).
            ConnectionClosedError / StreamResetError: the connection or stream failed first.
        """
        assert isinstance(self.core, ClientCore)
        if self.dead or self.core.closed:
            raise ConnectionClosedError("the HBONE connection is closed")
        try:
            sid = self.core.open_stream(target, forwarded_for=forwarded_for,
                                        traceparent=traceparent or new_traceparent(), baggage=baggage,
                                        host=host)
        except h2.exceptions.TooManyStreamsError:
            raise ConnectionClosedError("the HBONE connection has no stream left (peer's limit)") from None
        stream = HboneStream(self, sid, target)
        self._adopt(stream)
        self.wake_writer()
        try:
            while stream.status is None:
                if stream._error is not None:
                    raise stream._error
                await stream._readable.park()
        except BaseException:
            stream.reset(ERROR_CANCEL)
            stream.close_nowait()
            raise
        if stream.status != 200:
            stream.close_nowait()
            raise HttpStatusError(stream.status, f"{target[0]}:{target[1]}")
        return stream

    def respond(self, stream: HboneStream, status: int, headers: tuple[Header, ...] = ()) -> None:
        """Server: answer a CONNECT (200 opens the tunnel; any other status also ends the stream)."""
        assert isinstance(self.core, ServerCore)
        try:
            self.core.respond(stream.stream_id, status, headers)
        except h2.exceptions.ProtocolError as exc:
            stream._refused(exc)
            return
        stream.status = status
        self.wake_writer()
        if status != 200:
            stream._eof_sent = True  # the status ended our side
            stream.close_nowait()
