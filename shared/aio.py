"""The one bridge between Trio and asyncio: gRPC (grpclib) servers and clients driven from Trio code.

Theory of operation
-------------------
grpclib is an asyncio library. trio_asyncio runs an asyncio event loop *inside* a Trio run
(`open_aio_loop()`), so asyncio tasks and Trio tasks share one thread and one scheduler. This module is the
only place that imports asyncio, trio_asyncio or grpclib; everything else sees Trio-flavoured objects:

* Server: `serve_grpc(services, host=..., port=...)` runs a grpclib `Server` until cancelled. A service is a
  generated grpclib base class (e.g. `discovery_grpc.AggregatedDiscoveryServiceBase`) plus a plain object with
  *Trio* async methods of the same names: `trio_service(Base, impl)`. grpclib calls an asyncio handler, which
  runs the Trio method through `trio_as_aio` and hands it a `ServerCall` whose `recv_message`/`send_message`
  run the asyncio stream operations through `aio_as_trio`. A handler ends a call with a status by raising
  `RpcError`; any other exception becomes UNKNOWN (and is logged by grpclib).
* Client: `open_channel(host, port, ssl_context=...)` (or `open_target(GrpcTarget)`, which adds TLS from a
  root PEM and the bearer token) yields a `Channel`; `await channel.unary(...)` makes a unary call and
  `async with channel.stream(...) as call:` opens a streaming call. Transport failures and non-OK statuses
  surface as `RpcError` (status UNAVAILABLE for a lost or refused connection).

Size: every message read, on either side, is bounded (`max_message_size`, 4 MiB unless the opener says
otherwise): the length prefix is checked before the body is read, and a message over the bound ends its
call with RESOURCE_EXHAUSTED ("received message larger than max (N vs. M bytes)"). grpclib has no bound of
its own; this module puts one into the read both of its Stream classes use.

Liveness: both sides PING while calls are open (client every 10 s, server every 30 s) and drop a peer that
does not answer within 20 s; dropped and closed connections are aborted rather than TLS-closed, so a silent
peer cannot keep a call hanging for the 30 s a TLS close waits for close_notify.

Cancellation crosses the bridge both ways: cancelling the Trio caller cancels the asyncio future (and the gRPC
call); grpclib cancelling a handler (client gone, server closing) cancels the Trio method.

Importing this module imports trio_asyncio, after which pyroute2's sync IPRoute refuses to run on the Trio
thread (it must go to a worker thread): import it only from modules that talk gRPC.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import enum
import logging
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, Literal

import grpclib.client
import grpclib.server
import trio
import trio_asyncio
from grpclib.client import Channel as _GrpcChannel
from grpclib.config import Configuration as _GrpcConfiguration
from grpclib.const import Status as _GrpcStatus
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.server import Server as _GrpcServer

from shared.addr import format_host_port
from shared.errors import AmbientError
from shared.grpc_target import GrpcTarget, client_tls_context

log = logging.getLogger(__name__)

# asyncio's TLS transport keeps a receive buffer of SSLProtocol.max_size (256 KiB, zero-filled, so resident)
# for every connection, and reads up to that much per call. Control-plane gRPC messages are small: 64 KiB
# (four TLS records) per read is plenty and saves 192 KiB per xDS/CA connection (and per node agent and
# ztunnel connected to istiod).
GRPC_TLS_READ_BUFFER: Final = 64 * 1024
asyncio.sslproto.SSLProtocol.max_size = GRPC_TLS_READ_BUFFER

DEFAULT_MAX_MESSAGE_SIZE: Final = 4 * 1024 * 1024
"""The largest gRPC message a connection accepts unless its opener says otherwise (gRPC's usual default)."""
_MAX_MESSAGE_ATTR: Final = "_ambient_max_message_size"


async def _recv_bounded_message(stream: Any, codec: Any, message_type: Any) -> Any:
    """grpclib's message read with a size bound: the 5-byte prefix (compressed flag, length) is checked
    against the connection's bound *before* any of the body is read, so a peer that declares a huge message
    costs nothing but this error. grpclib has no such bound of its own (it reads whatever length the
    prefix declares, acknowledging the flow-control window as it goes).

    Raises:
        GRPCError: RESOURCE_EXHAUSTED (over the bound) or INTERNAL (a compressed message: not negotiated).
    """
    prefix = await stream.recv_data(5)
    if not prefix:
        return None
    if len(prefix) != 5:
        raise GRPCError(_GrpcStatus.INTERNAL, "the stream ended inside a message's length prefix")
    if prefix[0]:
        raise GRPCError(_GrpcStatus.INTERNAL, "received a compressed message, but no compression was agreed")
    length = int.from_bytes(prefix[1:], "big")
    limit: int = getattr(stream.connection, _MAX_MESSAGE_ATTR, DEFAULT_MAX_MESSAGE_SIZE)
    if length > limit:
        raise GRPCError(_GrpcStatus.RESOURCE_EXHAUSTED,
                        f"received message larger than max ({length} vs. {limit} bytes)")
    body = await stream.recv_data(length)
    if len(body) != length:
        raise GRPCError(_GrpcStatus.INTERNAL, f"the stream ended inside a message ({len(body)} of {length} "
                        "bytes)")
    return codec.decode(body, message_type)


# Both of grpclib's Stream classes call the module-level name they imported: replaced by the bounded read.
grpclib.client.recv_message = _recv_bounded_message  # type: ignore[attr-defined]
grpclib.server.recv_message = _recv_bounded_message  # type: ignore[attr-defined]

__all__ = [
    "Channel",
    "ClientCall",
    "GrpcTarget",
    "RpcError",
    "RpcStatus",
    "ServerCall",
    "client_tls_context",
    "open_aio_loop",
    "open_channel",
    "open_target",
    "serve_grpc",
    "trio_service",
]


class RpcStatus(enum.IntEnum):
    """gRPC status codes (numbers are the wire values)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(AmbientError):
    """A gRPC call ended with a non-OK status (client side), or should (raised by a server handler)."""

    def __init__(self, status: RpcStatus, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.message = message


# --- the loop --------------------------------------------------------------------------------------------


@asynccontextmanager
async def open_aio_loop() -> AsyncIterator[None]:
    """Make asyncio (and so grpclib) usable inside this Trio run; re-entrant (a no-op when already open).

    trio_asyncio runs the loop in nurseries of its own; an exception leaving the block therefore arrives
    wrapped in exception groups. A single exception is unwrapped so callers can `except RpcError` as usual.
    """
    if trio_asyncio.current_loop.get() is not None:
        yield
        return
    try:
        async with trio_asyncio.open_loop():
            yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


# --- server ----------------------------------------------------------------------------------------------


class ServerCall:
    """The Trio view of one incoming call (unary or streaming)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.metadata: Mapping[str, str] = {k: v for k, v in (stream.metadata or {}).items()}
        addr = stream.peer.addr() if stream.peer is not None else None
        self.peer = format_host_port(addr[0], addr[1]) if addr else "unknown"

    async def recv_message(self) -> Any | None:
        """The next request message, or None once the client has finished sending."""
        with _translate_errors("receive from client"):
            return await trio_asyncio.aio_as_trio(self._stream.recv_message)()

    async def send_message(self, message: Any) -> None:
        with _translate_errors("send to client"):
            await trio_asyncio.aio_as_trio(self._stream.send_message)(message)


TrioHandler = Callable[[ServerCall], Awaitable[None]]


def trio_service(base: type, impl: object) -> object:
    """Adapt `impl` (Trio methods named like `base`'s abstract methods) into a grpclib service object.

    Args:
        base: a generated grpclib service base class, e.g. `ca_grpc.IstioCertificateServiceBase`.
        impl: an object with `async def <Method>(self, call: ServerCall) -> None` for every RPC of `base`.
    Raises:
        TypeError: if `impl` lacks a method.
    """
    namespace: dict[str, Any] = {}
    for name in sorted(getattr(base, "__abstractmethods__", ())):
        trio_fn = getattr(impl, name, None)
        if trio_fn is None:
            raise TypeError(f"{type(impl).__name__} does not implement {base.__name__}.{name}")
        namespace[name] = _make_aio_handler(trio_fn)
    return type(f"Trio{base.__name__}", (base,), namespace)()


def _make_aio_handler(trio_fn: TrioHandler) -> Callable[[Any, Any], Awaitable[None]]:
    async def handler(_self: Any, stream: Any) -> None:
        try:
            await trio_asyncio.trio_as_aio(trio_fn)(ServerCall(stream))
        except BaseException as exc:
            rpc = _find_rpc_error(exc)
            if rpc is None:
                raise
            raise GRPCError(_GrpcStatus(int(rpc.status)), rpc.message) from None

    return handler


def _find_rpc_error(exc: BaseException) -> RpcError | None:
    """The RpcError a handler raised, also when a nursery wrapped it in an exception group."""
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find_rpc_error(inner)
            if found is not None:
                return found
    return None


async def serve_grpc(
    services: Sequence[object],
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `services` (from `trio_service`) on host:port until cancelled.

    Calls `task_status.started(bound_port)` once listening (port 0 picks a free port). On cancellation stops
    accepting, cancels running calls and waits (at most 5 s) for them to finish. A request message over
    `max_message_size` bytes ends its call with RESOURCE_EXHAUSTED before its body is read.
    Raises:
        OSError: the address cannot be bound.
    """
    async with open_aio_loop():
        # PING clients with open calls every 30 s and drop those that do not answer within 20 s: a vanished
        # client (no FIN/RST) would otherwise hold its subscriptions until TCP gives up, many minutes later.
        config = _GrpcConfiguration(
            _keepalive_time=30.0,
            _keepalive_timeout=20.0,
            _http2_max_pings_without_data=0,
            _http2_min_sent_ping_interval_without_data=30.0,
        )
        server = _GrpcServer(list(services), config=config)  # type: ignore[arg-type]
        # grpclib's close() cancels the handlers but leaves client connections open (asyncio servers do not
        # close accepted transports); track them so a stopped server really disconnects its clients. Dead
        # connections are aborted rather than TLS-closed (see _AbortingChannel).
        protocols: weakref.WeakSet[Any] = weakref.WeakSet()
        make_protocol = server._protocol_factory

        def tracking_factory() -> Any:
            protocol = make_protocol()
            protocols.add(protocol)
            made = protocol.connection_made

            def connection_made(transport: Any) -> None:
                made(transport)
                setattr(protocol.connection, _MAX_MESSAGE_ATTR, max_message_size)
                _abort_on_close(protocol.connection)

            protocol.connection_made = connection_made  # type: ignore[method-assign]
            return protocol

        server._protocol_factory = tracking_factory  # type: ignore[method-assign]
        await trio_asyncio.aio_as_trio(server.start)(host, port, ssl=ssl_context, reuse_address=True)
        try:
            listener: Any = server._server
            bound = listener.sockets[0].getsockname()[1]
            task_status.started(int(bound))
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                server.close()
                await trio_asyncio.aio_as_trio(server.wait_closed)()
                for protocol in list(protocols):
                    connection = getattr(protocol, "connection", None)
                    transport = getattr(connection, "_transport", None)
                    if transport is not None:
                        transport.close()


# --- client ----------------------------------------------------------------------------------------------


class _translate_errors:
    """Map grpclib/transport exceptions raised inside the bridge to RpcError."""

    def __init__(self, doing: str) -> None:
        self.doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> Literal[False]:
        if exc is None or isinstance(exc, RpcError):
            return False
        if isinstance(exc, GRPCError):
            raise RpcError(RpcStatus(exc.status.value), exc.message or exc.status.name) from None
        if isinstance(exc, asyncio.CancelledError):
            # grpclib cancels pending stream operations when the connection drops (a Trio-side cancellation
            # arrives as trio.Cancelled, never as this).
            raise RpcError(RpcStatus.UNAVAILABLE, f"connection closed during {self.doing}") from None
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise RpcError(
                RpcStatus.UNAVAILABLE,
                f"TLS verification failed ({exc.verify_message}) during {self.doing}; "
                "is the CA certificate the stub's root (root-cert.pem)?",
            ) from None
        if isinstance(exc, StreamTerminatedError | ProtocolError | ConnectionError | OSError | EOFError):
            detail = str(exc) or type(exc).__name__
            raise RpcError(RpcStatus.UNAVAILABLE, f"connection lost during {self.doing}: {detail}") from None
        return False


class ClientCall:
    """A streaming call opened by `Channel.stream`."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.finished = False
        """The server ended the call with OK (recv_message returned None)."""

    def _raise_status(self) -> None:
        # A server that ends a call with an error status while the client is still sending resets the stream
        # right after its trailers; grpclib then reports StreamTerminatedError, but the status is in the
        # trailers it already received: surface that instead of "connection lost".
        try:
            self._stream._maybe_raise()
        except GRPCError as exc:
            raise RpcError(RpcStatus(exc.status.value), exc.message or exc.status.name) from None
        except Exception as exc:  # no usable trailers: keep the original error
            log.debug("no status in trailers", extra={"fields": [("error", repr(exc))]})

    async def send_message(self, message: Any, *, end: bool = False) -> None:
        with _translate_errors("send to server"):
            try:
                await trio_asyncio.aio_as_trio(self._stream.send_message)(message, end=end)
            except StreamTerminatedError:
                self._raise_status()
                raise

    async def recv_message(self) -> Any | None:
        """The next response, or None when the server ended the stream with OK. Raises RpcError otherwise."""
        with _translate_errors("receive from server"):
            try:
                message = await trio_asyncio.aio_as_trio(self._stream.recv_message)()
                if message is None:
                    await trio_asyncio.aio_as_trio(self._stream.recv_trailing_metadata)()
                    self.finished = True
            except StreamTerminatedError:
                self._raise_status()
                raise
            return message

    async def end(self) -> None:
        """Half-close: no more requests."""
        with _translate_errors("end the request stream"):
            await trio_asyncio.aio_as_trio(self._stream.end)()


class Channel:
    """A connection to one gRPC server. Methods are named by their generated stub class + method name."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def _method(self, stub: type, method: str) -> Any:
        return getattr(stub(self._channel), method)

    async def unary(
        self,
        stub: type,
        method: str,
        request: Any,
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> Any:
        """Make a unary call: `await ch.unary(ca_grpc.IstioCertificateServiceStub, "CreateCertificate", req)`.

        Use trio.fail_after around it for a deadline. Raises RpcError.
        """
        fn = self._method(stub, method)
        with _translate_errors(f"{method} call"):
            return await trio_asyncio.aio_as_trio(fn)(request, metadata=dict(metadata or {}))

    @asynccontextmanager
    async def stream(
        self, stub: type, method: str, *, metadata: Mapping[str, str] | None = None
    ) -> AsyncIterator[ClientCall]:
        """Open a streaming call; leaving the block cancels it if the server has not finished it."""
        stream = self._method(stub, method).open(metadata=dict(metadata or {}))
        with _translate_errors(f"open {method}"):
            await trio_asyncio.aio_as_trio(stream.__aenter__)()
        call = ClientCall(stream)
        try:
            yield call
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self._close_stream(stream, method, finished=call.finished)

    @staticmethod
    async def _close_stream(stream: Any, method: str, *, finished: bool) -> None:
        # Reset the stream unless the server already finished it, then let grpclib release its slot on the
        # connection. __aexit__ gets an exception so it does not wait for trailers that may never come.
        if not finished:
            try:
                await trio_asyncio.aio_as_trio(stream.cancel)()
            except Exception as exc:  # not sent yet, already reset, or the connection is gone
                log.debug("cancel of a stream failed",
                          extra={"fields": [("method", method), ("error", repr(exc))]})
        closing = asyncio.CancelledError()
        try:
            await trio_asyncio.aio_as_trio(stream.__aexit__)(type(closing), closing, None)
        except BaseException as exc:
            if isinstance(exc, trio.Cancelled):
                raise
            log.debug("closing a stream failed", extra={"fields": [("method", method), ("error", repr(exc))]})


@asynccontextmanager
async def open_target(target: GrpcTarget, *,
                      max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> AsyncIterator[Channel]:
    """`open_channel` for a GrpcTarget (TLS when it has a root certificate)."""
    try:
        ssl_context = client_tls_context(target.root_cert_pem) if target.root_cert_pem else None
    except ssl.SSLError as exc:
        raise RpcError(RpcStatus.UNAVAILABLE, f"the root certificate is not usable PEM: {exc}") from None
    async with open_channel(
        target.host,
        target.port,
        ssl_context=ssl_context,
        keepalive=target.keepalive,
        keepalive_timeout=target.keepalive_timeout,
        max_message_size=max_message_size,
    ) as channel:
        yield channel


class _AbortingChannel(_GrpcChannel):
    """A grpclib Channel whose connections abort instead of closing.

    grpclib closes a connection when a keepalive PING goes unanswered and when the channel is closed. A TLS
    close first waits (up to 30 s) for the peer's close_notify: a silent peer would keep the call hanging
    that long, and a loop that ends sooner leaks the socket. The client is done with the connection in both
    cases, so it is aborted: the socket is gone on the loop's next iteration and open calls fail at once.
    """

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    """The largest response message accepted on this channel's connections."""

    async def _create_connection(self) -> Any:
        protocol = await super()._create_connection()
        setattr(protocol.connection, _MAX_MESSAGE_ATTR, self.max_message_size)
        _abort_on_close(protocol.connection)
        return protocol


def _abort_on_close(connection: Any) -> None:
    close = connection.close

    def abort_then_close() -> None:
        transport = getattr(connection, "_transport", None)
        if transport is not None:
            transport.abort()
        close()

    connection.close = abort_then_close


@asynccontextmanager
async def open_channel(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    keepalive: float | None = 10.0,
    keepalive_timeout: float = 20.0,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> AsyncIterator[Channel]:
    """A grpclib channel usable from Trio (opens the asyncio bridge if needed). Connects lazily.

    A response message over `max_message_size` bytes fails its call with RESOURCE_EXHAUSTED (an RpcError)
    before its body is read.

    While a call is open the client PINGs every `keepalive` seconds and drops the connection when a PING is
    not answered within `keepalive_timeout` seconds, so a vanished server (no FIN/RST: a partition, a frozen
    host) is noticed and the call fails with UNAVAILABLE instead of hanging. None disables it.
    """
    config = None
    if keepalive is not None:
        config = _GrpcConfiguration(
            _keepalive_time=keepalive,
            _keepalive_timeout=keepalive_timeout,
            _http2_max_pings_without_data=0,
            _http2_min_sent_ping_interval_without_data=keepalive,
        )
    async with open_aio_loop():
        channel = _AbortingChannel(host, port, ssl=ssl_context, config=config)
        channel.max_message_size = max_message_size
        try:
            yield Channel(channel)
        finally:
            channel.close()  # aborts the connection (see _AbortingChannel)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await trio_asyncio.aio_as_trio(asyncio.sleep)(0)
