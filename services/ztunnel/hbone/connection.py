"""Trio glue for one HBONE connection: a TLS stream, an h2 core, and the tunnel streams multiplexed on it.

Theory of operation
-------------------
`HboneConnection.run()` owns the connection and runs three tasks in one nursery:

* the **reader** pulls batches of plaintext from the TLS stream (`receive_view`, the shared buffer), feeds
  them to the core *before any await*, and dispatches the events to `HboneStream`s (stream.py): data is
  queued on the stream, or written straight into the stream's sink socket when it has one
  (`HboneStream.set_sink`, what the relay uses), windows and resets wake the stream's waiters, and
  (server) each valid CONNECT starts a handler task in the same nursery;
* the **writer** is the only task that writes to the socket: it drains `core.data_to_send()` whenever someone
  woke it. Stream tasks only mutate the core and wake the writer, so a stream task being cancelled can never
  tear a frame; if the writer itself is cancelled mid-write the TLS stream marks itself broken;
* the **pinger** sends a PING every `ping_interval` seconds and ends the connection when no ACK arrives within
  `ping_timeout` (upstream: 10 s / 20 s);
* the **idler** (when `idle_timeout` is set) sends GOAWAY and ends the connection once it has carried no
  stream for that long; until the first stream the deadline is `first_stream_deadline` (server: the TLS
  handshake and the first CONNECT share one deadline from accept).

Rapid reset (CVE-2023-44487), server side: a stream the peer resets before we answered it cost us the
request's work for nothing. More than `REMOTE_RESET_STREAM_MAX` of them within `REMOTE_RESET_INTERVAL` get
GOAWAY ENHANCE_YOUR_CALM and end the connection (upstream's h2 has the same cap of 20 on streams reset
before the application took them). `cancel_on_reset` lets the request's handler abandon its work (the
connect to the app) the moment its stream is reset.

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
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import h2.exceptions
import trio

from services.ztunnel.hbone.core import (
    ERROR_CANCEL,
    ERROR_ENHANCE_YOUR_CALM,
    ERROR_NO_ERROR,
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
from services.ztunnel.hbone.stream import HboneStream
from services.ztunnel.hbone.tlsstream import TlsSocketStream
from shared.addr import Addr, format_host_port
from shared.identity import SpiffeId

log = logging.getLogger("ztunnel.hbone")

HIGH_WATER: Final = 1024 * 1024
PING_INTERVAL: Final = 10.0
PING_TIMEOUT: Final = 20.0
REMOTE_RESET_STREAM_MAX: Final = 20  # upstream h2's DEFAULT_REMOTE_RESET_STREAM_MAX
REMOTE_RESET_INTERVAL: Final = 1.0


# Trace ids need to be unique, not secret: a generator seeded once from the OS (random.Random() seeds from
# os.urandom) instead of two getrandom() system calls per connection.
_trace_ids = random.Random()


def new_traceparent() -> str:
    """`00-<32 hex trace id>-<16 hex parent id>-00`, random per connection (never the all-zero ids that
    W3C trace context declares invalid)."""
    trace_id = _trace_ids.getrandbits(128) or 1
    parent_id = _trace_ids.getrandbits(64) or 1
    return f"00-{trace_id:032x}-{parent_id:016x}-00"


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
                 ping_timeout: float = PING_TIMEOUT, idle_timeout: float | None = None,
                 first_stream_deadline: float | None = None,
                 remote_reset_max: int = REMOTE_RESET_STREAM_MAX,
                 remote_reset_interval: float = REMOTE_RESET_INTERVAL) -> None:
        self.tls = tls
        self.core = core
        self.peer_identity = peer_identity
        self.local_addr = local_addr
        self.peer_addr = peer_addr
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.idle_timeout = idle_timeout
        self.first_stream_deadline = first_stream_deadline
        self.remote_reset_max = remote_reset_max
        self.remote_reset_interval = remote_reset_interval
        self._early_resets: collections.deque[float] = collections.deque()
        self._reset_scopes: dict[int, trio.CancelScope] = {}
        self.streams_seen = 0
        self.streams: dict[int, HboneStream] = {}
        self.error: BaseException | None = None
        self.dead = False
        self.on_request: Callable[[HboneStream, ConnectRequested], None] | None = None
        self.on_rejected: Callable[[StreamRejected], None] | None = None
        self._activity = trio.lowlevel.ParkingLot()
        self._idler_lot = trio.lowlevel.ParkingLot()  # the idler, parked while the connection carries streams
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
                if self.idle_timeout is not None:
                    nursery.start_soon(self._idler)
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
                ("peer", format_host_port(*self.peer_addr)), ("identity", str(self.peer_identity)),
                ("error", str(exc))]})

    def _shutdown(self) -> None:
        self.dead = True
        reason = ConnectionClosedError(
            f"the HBONE connection to {format_host_port(*self.peer_addr)} ended"
            + (f": {self.error}" if self.error is not None else ""))
        for stream in list(self.streams.values()):
            stream._fail(reason)
        self.tls.close_nowait()
        self._drained_lot.unpark_all()
        self._activity.unpark_all()
        self._idler_lot.unpark_all()
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

    # --- idler ---

    def _idle_deadline(self) -> float:
        assert self.idle_timeout is not None
        if not self.streams_seen and self.first_stream_deadline is not None:
            return self.first_stream_deadline
        return self.last_activity + self.idle_timeout

    async def _idler(self) -> None:
        # Woken only when the last stream closes (or the connection ends), never per stream: while idle it
        # sleeps until the deadline it last saw, and a stream opened and closed meanwhile only moves the
        # deadline on, which it reads when it wakes. A short tunnel costs it no wake-up at all.
        while not self.dead:
            if self.streams:
                await self._idler_lot.park()
                continue
            await trio.sleep_until(self._idle_deadline())
            if not self.streams and trio.current_time() >= self._idle_deadline():
                break
        if self.dead:
            return
        waited = ("no stream opened" if not self.streams_seen
                  else f"no stream for {self.idle_timeout:g}s")
        self._set_error(ConnectionClosedError(f"the HBONE connection was idle ({waited})"))
        self.close(ERROR_NO_ERROR)

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
                unanswered = stream.status is None and isinstance(self.core, ServerCore)
                stream._fail(StreamResetError(f"the peer reset the stream (code {event.error_code})",
                                              error_code=event.error_code))
                if (scope := self._reset_scopes.get(event.stream_id)) is not None:
                    scope.cancel()
                if unanswered:
                    self._count_early_reset()
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

    def _count_early_reset(self) -> None:
        """A stream reset by the peer before we answered it: past the cap, GOAWAY ENHANCE_YOUR_CALM."""
        now = trio.current_time()
        resets = self._early_resets
        resets.append(now)
        while resets and resets[0] <= now - self.remote_reset_interval:
            resets.popleft()
        if len(resets) <= self.remote_reset_max:
            return
        self.core.close(ERROR_ENHANCE_YOUR_CALM)
        log.warning("HBONE connection closed: too many streams reset by the peer", extra={"fields": [
            ("peer", format_host_port(*self.peer_addr)), ("identity", str(self.peer_identity)),
            ("resets", len(resets)), ("interval", f"{self.remote_reset_interval:g}s")]})
        raise HboneProtocolError(
            f"the peer reset more than {self.remote_reset_max} streams before they were answered within "
            f"{self.remote_reset_interval:g}s (rapid reset)", error_code=ERROR_ENHANCE_YOUR_CALM)

    @contextlib.contextmanager
    def cancel_on_reset(self, stream: HboneStream) -> Iterator[trio.CancelScope]:
        """A cancel scope that is cancelled when the peer resets `stream` (at once if it already did)."""
        with trio.CancelScope() as scope:
            if not self.core.stream_open(stream.stream_id) or stream._error is not None:
                scope.cancel()
            self._reset_scopes[stream.stream_id] = scope
            try:
                yield scope
            finally:
                self._reset_scopes.pop(stream.stream_id, None)

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
        self.streams_seen += 1
        self.active_streams += 1
        self.last_activity = trio.current_time()
        self._activity.unpark_all()

    def _forget(self, stream: HboneStream) -> None:
        if self.streams.pop(stream.stream_id, None) is not None:
            self.active_streams -= 1
            self.last_activity = trio.current_time()
            self._activity.unpark_all()
            if not self.streams:
                self._idler_lot.unpark_all()

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
            raise HttpStatusError(stream.status, format_host_port(*target))
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
