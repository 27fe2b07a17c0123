"""Sans-I/O HBONE cores: HTTP/2 CONNECT tunnels on h2, bytes in, events out, bytes out.

Theory of operation
-------------------
`ClientCore` and `ServerCore` wrap one `h2.connection.H2Connection` each and speak HBONE:

* the client opens a stream per tunnel with a classic CONNECT (`:method`, `:authority` only, no `:scheme` or
  `:path`) plus `forwarded`, `traceparent` and `baggage`, and accepts only a 200 answer;
* the server validates each request itself before the application sees it: anything but CONNECT, an
  unparsable authority, or a target IP that is not one of the connection's local IPs is answered 400 at once
  (`StreamRejected`); a valid request becomes `ConnectRequested` and the application answers it with
  `respond()` (401 deny, 503 upstream failure, 200 then bytes).

Neither core owns a socket or a clock. The caller feeds received bytes to `receive_data()`, gets a list of
events back, and writes whatever `data_to_send()` returns. Flow control is explicit, so memory stays bounded:

* outbound, `send_data()` takes only what the peer's stream and connection windows allow and returns how much
  it took; the caller keeps the rest and waits for `WindowOpened`;
* inbound, received DATA is not acknowledged until the application says it consumed it (`consumed()`), so a
  slow reader holds at most one stream window (4 MiB) per stream and one connection window (16 MiB) overall
  before the peer has to stop.

Half-close is END_STREAM each way (`end_stream()` / `StreamEnded`); errors reset the stream (`reset()`).
Settings follow upstream ztunnel: 4 MiB stream window, 16 MiB connection window, 1 MiB
frames, header lists of 16 KiB (client) / 64 KiB (server), 200 concurrent streams on the server. Frame and
header-block sizes are checked from each frame header before its payload is read (framebuffer.py).

A HEADERS frame that would open a stream past the advertised concurrency (SERVER_MAX_CONCURRENT_STREAMS) is
refused on its own, as upstream's h2 does: its header block is still decoded (the HPACK table both sides
share must stay in step) and the stream is reset with REFUSED_STREAM, so the peer may retry it; the
connection and its other streams carry on. A peer that makes us refuse more than LOCAL_RESET_COUNT_MAX
streams on one connection gets GOAWAY ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hpack
import hyperframe.frame

from services.ztunnel.hbone.errors import HboneProtocolError
from services.ztunnel.hbone.framebuffer import BoundedFrameBuffer
from shared.addr import Addr, format_host_port, parse_ip_port, unmapped_ip

Header = tuple[bytes, bytes]

STREAM_WINDOW: Final = 4 * 1024 * 1024
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
MAX_FRAME_SIZE: Final = 1024 * 1024
CLOSED_STREAMS_REMEMBERED: Final = 1000  # per connection, see _H2Connection
CLIENT_MAX_HEADER_LIST_SIZE: Final = 16 * 1024
SERVER_MAX_HEADER_LIST_SIZE: Final = 64 * 1024
SERVER_MAX_CONCURRENT_STREAMS: Final = 200  # upstream's HBONE server (h2 builder): hyper's default
LOCAL_RESET_COUNT_MAX: Final = 1024  # streams we may refuse per connection; upstream's h2 default
CLIENT_MAX_CONCURRENT_STREAMS: Final = 100  # the client accepts no pushed streams; h2's own default

ERROR_NO_ERROR: Final = int(h2.errors.ErrorCodes.NO_ERROR)
ERROR_PROTOCOL: Final = int(h2.errors.ErrorCodes.PROTOCOL_ERROR)
ERROR_INTERNAL: Final = int(h2.errors.ErrorCodes.INTERNAL_ERROR)
ERROR_CANCEL: Final = int(h2.errors.ErrorCodes.CANCEL)
ERROR_CONNECT: Final = int(h2.errors.ErrorCodes.CONNECT_ERROR)
ERROR_REFUSED_STREAM: Final = int(h2.errors.ErrorCodes.REFUSED_STREAM)
ERROR_ENHANCE_YOUR_CALM: Final = int(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

_FRAME_HEADER: Final = struct.Struct(">HBBBL")  # 24-bit length (as H + B), type, flags, stream id

# Plain DATA frames bypass h2's frame parsing (_Core._receive_plain_data), which reads h2 internals: only with
# the attributes it needs (checked once here), else every frame goes through h2.
_probe = h2.connection.H2Connection()
_probe.initiate_connection()
_probe.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")])
FAST_DATA: bool = (
    all(hasattr(_probe.incoming_buffer, name) for name in ("_data", "_preamble_len", "_headers_buffer"))
    and all(hasattr(_probe.streams[1], n) for n in ("_inbound_window_manager", "_expected_content_length"))
    and hasattr(_probe.streams[1].state_machine, "headers_received")
    and hasattr(getattr(_probe, "_inbound_flow_control_window_manager", None), "current_window_size")
)
del _probe
_SEND_DATA_CONN: Final = h2.connection.ConnectionInputs.SEND_DATA
_SEND_DATA_STREAM: Final = h2.stream.StreamInputs.SEND_DATA
_CONN_OPEN: Final = frozenset({h2.connection.ConnectionState.CLIENT_OPEN,
                               h2.connection.ConnectionState.SERVER_OPEN})
_STREAM_RECEIVING: Final = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL})
_FRAME_DATA: Final = 0x0


def _data_body_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


def _frame_repr(self: hyperframe.frame.Frame) -> str:
    return f"{type(self).__name__}(stream_id={self.stream_id}, flags={sorted(self.flags)!r})"


# h2 formats every received frame for a trace log even when nothing logs it (`repr(frame)` is an argument);
# for DATA that was a hex dump of the whole payload (3x receive CPU), and hyperframe's generic
# repr with its flag and body formatting still cost ~3 % of a request/response turn. Done once, at import.
hyperframe.frame.DataFrame._body_repr = _data_body_repr  # type: ignore[method-assign,assignment]
hyperframe.frame.Frame.__repr__ = _frame_repr  # type: ignore[method-assign]


# --- events ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """Server: a valid CONNECT to `target`; answer it with `ServerCore.respond`."""

    stream_id: int
    target: Addr
    headers: tuple[Header, ...]

    def header(self, name: bytes) -> bytes | None:
        return _find(self.headers, name)


@dataclass(frozen=True, slots=True)
class StreamRejected:
    """Server: the core already answered `status` (400) and ended the stream; for the log only."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class Responded:
    """Client: the server's answer to a CONNECT. Only 200 opens the tunnel."""

    stream_id: int
    status: int
    headers: tuple[Header, ...]


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Tunnel bytes. Call `consumed(stream_id, flow_controlled_length)` once the application took them."""

    stream_id: int
    data: bytes
    flow_controlled_length: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM): no more bytes will arrive on it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone (RST_STREAM from the peer). Nothing more can be sent or received on it."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """The peer opened a send window; `stream_id` None means the connection window (every stream)."""

    stream_id: int | None


@dataclass(frozen=True, slots=True)
class PingAcked:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer sent GOAWAY: no new streams; streams above `last_stream_id` were not processed."""

    error_code: int
    last_stream_id: int


_HeadersEvent = h2.events.RequestReceived | h2.events.ResponseReceived

Event = (ConnectRequested | StreamRejected | Responded | DataReceived | StreamEnded | StreamReset
         | WindowOpened | PingAcked | ConnectionClosed)


# --- helpers -----------------------------------------------------------------------------------------------


def _find(headers: Iterable[Header], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


@functools.lru_cache(maxsize=1024)
def parse_authority(value: bytes) -> Addr | None:
    """`ip:port` (IPv6 bracketed) -> (canonical ip, port); None when it is not an IP literal and a port."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    return parse_ip_port(text)


def _settings(client: bool) -> h2.settings.Settings:
    codes = h2.settings.SettingCodes
    values = {
        codes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        codes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        codes.MAX_HEADER_LIST_SIZE: CLIENT_MAX_HEADER_LIST_SIZE if client else SERVER_MAX_HEADER_LIST_SIZE,
        codes.MAX_CONCURRENT_STREAMS: (CLIENT_MAX_CONCURRENT_STREAMS if client
                                       else SERVER_MAX_CONCURRENT_STREAMS),
        codes.ENABLE_PUSH: 0,
    }
    return h2.settings.Settings(client=client, initial_values=values)


# --- the cores ---------------------------------------------------------------------------------------------


class TooManyRefusedStreamsError(h2.exceptions.ProtocolError):
    """The peer kept opening streams past our concurrency limit after being refused."""

    error_code = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


class _H2Connection(h2.connection.H2Connection):
    # h2 remembers how each closed stream ended, so that frames still in flight on a stream it reset are
    # ignored rather than taken for a protocol error, for the last 65,536 streams: ~105 bytes each, ~7 MB on
    # a long-lived pooled connection that carried many short tunnels. Frames in flight only concern streams
    # closed a round trip ago; the last thousand cover that.
    MAX_CLOSED_STREAMS = CLOSED_STREAMS_REMEMBERED

    refused_streams = 0

    def _receive_headers_frame(self, frame: hyperframe.frame.HeadersFrame,
                               ) -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        # h2 raises TooManyStreamsError (a connection error: GOAWAY) before it decodes the header block.
        # Past the limit the stream alone is refused here: the block is decoded first (HPACK state), then
        # the new stream is opened in h2's books and reset at once with REFUSED_STREAM, its request dropped.
        if (frame.stream_id in self.streams
                or self.open_inbound_streams < self.local_settings.max_concurrent_streams):
            return super()._receive_headers_frame(frame)
        self.refused_streams += 1
        if self.refused_streams > LOCAL_RESET_COUNT_MAX:
            raise TooManyRefusedStreamsError(
                f"the peer opened {self.refused_streams} streams past the limit of "
                f"{self.local_settings.max_concurrent_streams} concurrent streams")
        headers = h2.connection._decode_headers(self.decoder, frame.data)
        events = self.state_machine.process_input(h2.connection.ConnectionInputs.RECV_HEADERS)
        stream = self._get_or_create_stream(frame.stream_id,
                                            h2.connection.AllowedStreamIDs(not self.config.client_side))
        frames, _request = stream.receive_headers(headers, "END_STREAM" in frame.flags,
                                                  self.config.header_encoding)
        self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_RST_STREAM)
        frames.extend(stream.reset_stream(ERROR_REFUSED_STREAM))
        return frames, events

    def _receive_rst_stream_frame(self, frame: hyperframe.frame.RstStreamFrame,
                                  ) -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        # On a stream we already reset (a refused one, say) h2 would answer with another RST_STREAM, which
        # RFC 9113 section 5.4.2 forbids; nothing is owed for it.
        try:
            return super()._receive_rst_stream_frame(frame)
        except h2.exceptions.StreamClosedError:
            return [], []


class _Core:
    """What both roles share: settings, flow control, half-close, reset, PING, GOAWAY."""

    def __init__(self, *, client: bool) -> None:
        # Our own header lists are built well-formed here (lower-case names, pseudo-headers first), so h2's
        # outbound validation (a third of a CONNECT's header cost) is off; what the peer sends is validated.
        config = h2.config.H2Configuration(client_side=client, header_encoding=None,
                                           validate_inbound_headers=True, normalize_inbound_headers=True,
                                           validate_outbound_headers=False, normalize_outbound_headers=False)
        conn = _H2Connection(config=config)
        # Replacing local_settings before the preamble: h2 reads max_inbound_frame_size and the frame buffer's
        # limit once at construction, so both are set by hand, and the HPACK decoder's limit too.
        conn.local_settings = _settings(client)
        conn.max_inbound_frame_size = MAX_FRAME_SIZE
        conn.incoming_buffer = BoundedFrameBuffer(
            server=not client, max_frame_size=MAX_FRAME_SIZE,
            max_header_block=CLIENT_MAX_HEADER_LIST_SIZE if client else SERVER_MAX_HEADER_LIST_SIZE)
        conn.decoder.max_header_list_size = (CLIENT_MAX_HEADER_LIST_SIZE if client
                                             else SERVER_MAX_HEADER_LIST_SIZE)
        # hpack's Huffman coder is a per-byte Python loop (both ways): a CONNECT's traceparent, forwarded and
        # baggage values cost tens of microseconds each to encode and again to decode. Literal strings cost
        # a few more bytes on the wire once per stream.
        conn.encoder.encode = functools.partial(conn.encoder.encode, huffman=False)  # type: ignore[method-assign]
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._h2 = conn
        self._out = bytearray()  # DATA frames we framed ourselves, after everything h2 queued before them
        self._buffered = 0
        self.closed = False
        self.goaway_received = False

    # --- bytes in / out ---

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer. Raises HboneProtocolError (a GOAWAY is then queued to send)."""
        events: list[Event] = []
        view = memoryview(data)
        if FAST_DATA:
            used = self._receive_plain_data(view, events)
            if used == len(view):
                return events
            view = view[used:]
        try:
            h2_events = self._h2.receive_data(view)
        except h2.exceptions.ProtocolError as exc:
            self.closed = True
            code = int(getattr(exc, "error_code", ERROR_PROTOCOL) or ERROR_PROTOCOL)
            raise HboneProtocolError(f"HTTP/2 protocol error from the peer: {exc}", error_code=code) from None
        for ev in h2_events:
            self._translate(ev, events)
        return events

    def _receive_plain_data(self, view: memoryview, out: list[Event]) -> int:
        """Take the leading run of plain DATA frames off `view` without h2's frame machinery; returns the
        bytes consumed (the rest goes to h2).

        "Plain": no flags (END_STREAM and padding go to h2), whole in `view`, within the frame size limit and
        both receive windows, on a stream that is open for receiving and got its headers, with h2 between
        frames (nothing buffered, no preamble or header block pending). For such a frame h2's bookkeeping is
        exactly the two window decrements done here: its state machines stay where they are and emit only
        the DataReceived event (h2 spent ~9 us per 1 KB DATA frame, a sixth of a relayed request).
        Anything else ends the run, and h2 handles it and everything after it as before.
        """
        h2c = self._h2
        buffer = h2c.incoming_buffer
        if (buffer._data or buffer._preamble_len or buffer._headers_buffer
                or h2c.state_machine.state not in _CONN_OPEN):
            return 0
        conn_window = h2c._inbound_flow_control_window_manager
        max_frame = h2c.max_inbound_frame_size
        streams = h2c.streams
        pos, end = 0, len(view)
        while end - pos >= 9:
            high, low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(view, pos)
            length = high << 8 | low
            if kind != _FRAME_DATA or flags or length > max_frame or end - pos - 9 < length:
                break
            stream = streams.get(stream_id & 0x7FFFFFFF)
            if stream is None:
                break
            machine = stream.state_machine
            window = stream._inbound_window_manager
            if (machine.state not in _STREAM_RECEIVING or not machine.headers_received
                    or stream._expected_content_length is not None or length > window.current_window_size
                    or length > conn_window.current_window_size):
                break
            conn_window.window_consumed(length)
            window.window_consumed(length)
            start = pos + 9
            pos = start + length
            out.append(DataReceived(stream.stream_id, bytes(view[start:pos]), length))
        return pos

    def data_to_send(self) -> bytes | bytearray:
        """Everything queued for the wire (possibly b""). The caller owns the object returned."""
        self._buffered = 0
        pending = self._h2.data_to_send()
        out = self._out
        if not out:
            return pending
        if pending:
            out += pending
        self._out = bytearray()
        return out

    @property
    def has_output(self) -> bool:
        """Something is queued for the wire (a frame of ours or of h2's)."""
        return bool(self._out) or bool(self._h2._data_to_send)

    @property
    def buffered(self) -> int:
        """Payload bytes queued by `send_data` since the last `data_to_send()` (for back-pressure)."""
        return self._buffered

    # --- per stream ---

    def send_window(self, stream_id: int) -> int:
        """How many bytes `send_data` would take right now (0 on a closed stream)."""
        try:
            return self._h2.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError, KeyError):
            return 0

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of `data` as the send windows allow, in frames of up to 1 MiB; returns how much.

        Raises:
            StreamClosedError (h2): the stream was reset or already half-closed locally.
        """
        h2c = self._h2
        window = min(len(data), h2c.local_flow_control_window(stream_id))
        if window <= 0:
            return 0
        # h2's own send_data copies the payload about five times (memoryview.tobytes, the frame body, header +
        # body, its output bytearray, bytes() of that). Here h2 does the bookkeeping (state machines, both
        # flow-control windows) and the frame is written once into our output buffer, behind whatever h2
        # queued before it (its own frames keep their order relative to ours: see `data_to_send`).
        stream = h2c.streams[stream_id]
        max_frame = h2c.max_outbound_frame_size
        view = memoryview(data)
        pending = h2c.data_to_send()
        out = self._out
        if pending:
            out += pending
        sent = 0
        while sent < window:
            chunk = min(max_frame, window - sent)
            h2c.state_machine.process_input(_SEND_DATA_CONN)
            stream.state_machine.process_input(_SEND_DATA_STREAM)
            stream.outbound_flow_control_window -= chunk
            h2c.outbound_flow_control_window -= chunk
            out += _FRAME_HEADER.pack(chunk >> 8, chunk & 0xFF, 0, 0, stream_id)
            out += view[sent:sent + chunk]
            sent += chunk
        self._buffered += sent
        return sent

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side of the stream (END_STREAM)."""
        self._h2.end_stream(stream_id)
        self._forget_if_closed(stream_id)

    def consumed(self, stream_id: int, flow_controlled_length: int) -> None:
        """The application took received bytes: hand the window back (WINDOW_UPDATE when worthwhile)."""
        if flow_controlled_length and not self.closed:
            self._h2.acknowledge_received_data(flow_controlled_length, stream_id)

    def reset(self, stream_id: int, error_code: int = ERROR_CANCEL) -> None:
        """RST_STREAM; a no-op on a stream that is already closed."""
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError,
                                 h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, error_code)
        self._forget_if_closed(stream_id)

    def _forget_if_closed(self, stream_id: int) -> None:
        """Drop a stream that has closed both ways from h2's books at once, keeping only how it ended.

        h2 drops closed streams only when it next counts the open ones (a new stream), so after a peak every
        stream that closed since the last one opened stayed whole (its state machine and window managers,
        ~2.5 KiB): 10,000 closed tunnels kept ~25 MiB on each side until the connection carried another
        stream or closed. The same two steps as h2's own clean-up (`_open_streams`)."""
        h2c = self._h2
        stream = h2c.streams.get(stream_id)
        if stream is not None and stream.closed:
            del h2c.streams[stream_id]
            h2c._closed_streams[stream_id] = stream.closed_by

    def stream_open(self, stream_id: int) -> bool:
        stream = self._h2.streams.get(stream_id)
        return stream is not None and not stream.closed

    # --- connection ---

    def ping(self, opaque: bytes) -> None:
        """Queue a PING (nothing once the connection is closing)."""
        if not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.ping(opaque)

    def close(self, error_code: int = ERROR_NO_ERROR) -> None:
        """Queue a GOAWAY; the connection takes no new streams after it."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection(error_code)

    @property
    def open_streams(self) -> int:
        return int(self._h2.open_outbound_streams + self._h2.open_inbound_streams)

    @property
    def refused_streams(self) -> int:
        """Streams refused (REFUSED_STREAM) because the peer opened them past our concurrency limit."""
        return self._h2.refused_streams

    @property
    def peer_max_concurrent_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    # --- h2 events -> ours ---

    def _translate(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            assert ev.stream_id is not None and ev.data is not None and ev.flow_controlled_length is not None
            out.append(DataReceived(ev.stream_id, ev.data, ev.flow_controlled_length))
        elif isinstance(ev, h2.events.WindowUpdated):
            out.append(WindowOpened(ev.stream_id or None))
        elif isinstance(ev, h2.events.StreamEnded):
            assert ev.stream_id is not None
            out.append(StreamEnded(ev.stream_id))
            self._forget_if_closed(ev.stream_id)
        elif isinstance(ev, h2.events.StreamReset):
            assert ev.stream_id is not None
            out.append(StreamReset(ev.stream_id, int(ev.error_code or 0)))
            self._forget_if_closed(ev.stream_id)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            # A new INITIAL_WINDOW_SIZE changes every stream's window.
            out.append(WindowOpened(None))
        elif isinstance(ev, h2.events.PingAckReceived):
            out.append(PingAcked(bytes(ev.ping_data or b"")))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway_received = True
            self.closed = True
            out.append(ConnectionClosed(int(ev.error_code or 0), int(ev.last_stream_id or 0)))
        elif isinstance(ev, h2.events.RequestReceived | h2.events.ResponseReceived):
            self._on_headers(ev, out)
        # Trailers, informational responses, priority and unknown frames mean nothing to a tunnel.

    def _on_headers(self, ev: _HeadersEvent, out: list[Event]) -> None:
        # A request on a client or a response on a server cannot get past h2's state machine.
        raise NotImplementedError


class ClientCore(_Core):
    """The initiating side of an HBONE connection: opens CONNECT streams, requires 200."""

    def __init__(self) -> None:
        super().__init__(client=True)

    def open_stream(self, target: Addr, *, forwarded_for: Addr, traceparent: str,
                    baggage: str | None = None, host: str | None = None,
                    extra_headers: Sequence[Header] = ()) -> int:
        """Send `CONNECT target` on a new stream and return its id.

        Args:
            target: the real destination ip:port (the `:authority`).
            forwarded_for: the original client's ip:port (`forwarded: for="..."`).
            traceparent: `00-<32 hex>-<16 hex>-00`, see `new_traceparent()` in the glue.
            baggage: upstream's comma-joined `k=v` list, omitted when None or empty.
            host: the service hostname, added to `forwarded` as `;host=` when known.
        """
        forwarded = f'for="{format_host_port(*forwarded_for)}"'
        if host:
            forwarded += f";host={host}"
        headers: list[Header] = [
            (b":method", b"CONNECT"),
            (b":authority", format_host_port(*target).encode()),
            # Unique per stream (the client's port, a random trace id): never indexed, so they do not churn
            # the HPACK dynamic table, whose look-up is a linear scan of every entry on each header encoded.
            hpack.NeverIndexedHeaderTuple(b"forwarded", forwarded.encode()),
            hpack.NeverIndexedHeaderTuple(b"traceparent", traceparent.encode()),
        ]
        if baggage:
            headers.append((b"baggage", baggage.encode()))
        headers.extend(extra_headers)
        stream_id = self._h2.get_next_available_stream_id()
        self._h2.send_headers(stream_id, headers, end_stream=False)
        return stream_id

    def _on_headers(self, ev: _HeadersEvent, out: list[Event]) -> None:
        assert isinstance(ev, h2.events.ResponseReceived) and ev.stream_id is not None
        headers = tuple((bytes(k), bytes(v)) for k, v in ev.headers or ())
        raw = _find(headers, b":status")
        status = int(raw) if raw is not None and raw.isdigit() else 0
        if status != 200:
            # The tunnel never opened: nothing else will be accepted on this stream.
            self.reset(ev.stream_id, ERROR_CANCEL)
        out.append(Responded(ev.stream_id, status, headers))


class ServerCore(_Core):
    """The accepting side: validates CONNECT requests, the application answers the valid ones.

    Args:
        local_ips: the IPs this connection was accepted on (the pod's IP); a CONNECT to any other IP is 400.
            None: any ip:port target is passed on, for the application to decide (a waypoint, whose targets
            are service VIPs and the workloads it serves).
    """

    def __init__(self, local_ips: Collection[str] | None) -> None:
        super().__init__(client=False)
        self.local_ips = frozenset(unmapped_ip(ip) for ip in local_ips) if local_ips is not None else None

    def respond(self, stream_id: int, status: int, headers: Sequence[Header] = ()) -> None:
        """Answer a CONNECT. Any status but 200 also ends the stream."""
        self._h2.send_headers(stream_id, [(b":status", str(status).encode()), *headers],
                              end_stream=status != 200)

    def _reject(self, stream_id: int, status: int, reason: str, out: list[Event]) -> None:
        self.respond(stream_id, status)
        out.append(StreamRejected(stream_id, status, reason))

    def _on_headers(self, ev: _HeadersEvent, out: list[Event]) -> None:
        assert isinstance(ev, h2.events.RequestReceived) and ev.stream_id is not None
        headers = tuple((bytes(k), bytes(v)) for k, v in ev.headers or ())
        method = _find(headers, b":method")
        if method != b"CONNECT":
            self._reject(ev.stream_id, 400, f"method {method!r} is not CONNECT", out)
            return
        authority = _find(headers, b":authority") or b""
        target = parse_authority(authority)
        if target is None:
            self._reject(ev.stream_id, 400, f"authority {authority!r} is not ip:port", out)
            return
        if self.local_ips is not None and unmapped_ip(target[0]) not in self.local_ips:
            self._reject(ev.stream_id, 400,
                         f"target {target[0]} is not this workload's IP "
                         f"({', '.join(sorted(self.local_ips))})", out)
            return
        out.append(ConnectRequested(ev.stream_id, target, headers))
