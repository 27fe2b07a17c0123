"""A Trio stream that drives a pyOpenSSL `Connection` directly on a non-blocking socket.

Theory of operation
-------------------
`trio.SSLStream` pushes every byte through memory BIOs and reads one 16 KiB record per call; on the HBONE
data path it ran 2.5x slower than letting OpenSSL own the file descriptor. Here OpenSSL reads and
writes the socket itself; Trio is only asked to wait: `WantReadError` -> `wait_readable`, `WantWriteError` ->
`wait_writable`, then the same call is retried (pyOpenSSL sets SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER and
partial writes, so retrying with the unsent tail is allowed).

Reads are batched: `receive_view()` keeps calling `SSL_read` (one record each) into the process's one 256 KiB
receive buffer (rxbuf.py) until OpenSSL would block or the buffer is full, and returns a view of it. The view
is valid only until the caller's next checkpoint, which is how the HBONE reader uses it: it hands the bytes to
the h2 core (which copies them) before awaiting anything.

A write that is cancelled or fails part-way leaves the TLS record stream in an unknown state (OpenSSL expects
the very same write to be retried), so the stream is then marked broken: every later call raises
`trio.BrokenResourceError`.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Final

import trio
from OpenSSL import SSL

from services.ztunnel.hbone.errors import PeerIdentityError, TlsError
from services.ztunnel.hbone.tls import describe_ssl_error, identity_failure
from services.ztunnel.rxbuf import RECEIVE_BUFFER_SIZE
from services.ztunnel.rxbuf import receive_buffer as _shared
from services.ztunnel.rxbuf import receive_view as _shared_view

_RECORD: Final = 16 * 1024 + 256  # the most plaintext one SSL_read returns (one TLS record), with slack
_FULL_RECORD: Final = 16 * 1024

# pyOpenSSL's recv_into reads into a fresh cffi buffer and copies it out (one allocation and one copy per
# 16 KiB record); SSL_read straight into the shared buffer avoids both. This uses pyOpenSSL's private cffi
# handles, so it falls back to the public API when they are not there.
try:
    from OpenSSL.SSL import _ffi as _ssl_ffi  # type: ignore[attr-defined]
    from OpenSSL.SSL import _lib as _ssl_lib  # type: ignore[attr-defined]

    _SSL_read = _ssl_lib.SSL_read
    _SSL_clear_mode = _ssl_lib.SSL_clear_mode
    _PARTIAL_WRITE: int = _ssl_lib.SSL_MODE_ENABLE_PARTIAL_WRITE
    _shared_ptr = _ssl_ffi.from_buffer(_shared)  # pins the buffer (it is never resized)
    if not callable(getattr(SSL.Connection, "_raise_ssl_error", None)):
        raise ImportError("pyOpenSSL has no Connection._raise_ssl_error")
except (ImportError, AttributeError):  # pragma: no cover - depends on the pyOpenSSL version
    _SSL_read = None
    _SSL_clear_mode = None


def _recv_record(conn: SSL.Connection, offset: int) -> int:
    """One SSL_read of up to a record into the shared buffer at `offset`; raises like `recv_into`."""
    if _SSL_read is None:  # pragma: no cover
        return int(conn.recv_into(_shared_view[offset:], _RECORD))  # type: ignore[arg-type]
    ssl_ptr = conn._ssl
    n: int = _SSL_read(ssl_ptr, _shared_ptr + offset, _RECORD)
    if n <= 0:
        conn._raise_ssl_error(ssl_ptr, n)
    return n


class TlsSocketStream(trio.abc.Stream):
    """TLS over a connected non-blocking socket. Owns (and closes) the socket.

    Args:
        sock: connected, non-blocking.
        conn: an `SSL.Connection` created on `sock`, in connect or accept state (see `tls.py`).
    """

    def __init__(self, sock: socket.socket, conn: SSL.Connection) -> None:
        self.socket = sock
        self.ssl = conn
        if _SSL_clear_mode is not None:
            # pyOpenSSL turns on partial writes: each SSL_write then returns after one 16 KiB record, so a
            # 256 KiB DATA frame took 16 calls through Python. Without them one call writes every record.
            _SSL_clear_mode(conn._ssl, _PARTIAL_WRITE)
        self._broken: BaseException | None = None
        self._eof = False
        self._read_wants_write = False
        self._idle_hint = False
        self._closed = False
        self._send_conflict = False
        self._receive_conflict = False

    # --- handshake ---

    async def do_handshake(self) -> None:
        """Run the handshake to completion.

        Raises:
            PeerIdentityError: the peer's certificate names the wrong identity or trust domain.
            TlsError: any other handshake failure (untrusted chain, no ALPN overlap, peer closed, ...).
        """
        while True:
            try:
                self.ssl.do_handshake()
                return
            except SSL.WantReadError:
                await trio.lowlevel.wait_readable(self.socket)
            except SSL.WantWriteError:
                await trio.lowlevel.wait_writable(self.socket)
            except SSL.Error as exc:
                self._broken = exc
                failure = identity_failure(self.ssl)
                if failure is not None:
                    raise PeerIdentityError(failure) from None
                raise TlsError(f"TLS handshake failed: {describe_ssl_error(exc)}") from None

    # --- sending ---

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(f"the TLS stream is broken: {describe_ssl_error(self._broken)}")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_conflict:
            raise trio.BusyResourceError("another task is already sending on this TLS stream")
        self._check()
        view = memoryview(data)
        if not view:
            await trio.lowlevel.checkpoint()
            return
        self._send_conflict = True
        completed = False
        try:
            while view:
                try:
                    sent = self.ssl.send(view)
                except SSL.WantWriteError:
                    await trio.lowlevel.wait_writable(self.socket)
                    continue
                except SSL.WantReadError:
                    await trio.lowlevel.wait_readable(self.socket)
                    continue
                except SSL.Error as exc:
                    self._broken = exc
                    raise trio.BrokenResourceError(f"TLS send failed: {describe_ssl_error(exc)}") from None
                view = view[sent:]
            completed = True
        finally:
            self._send_conflict = False
            if not completed and self._broken is None:
                # Cancelled (or failed) with a record half-written: nothing may be sent after it.
                self._broken = trio.BrokenResourceError("a TLS write was interrupted part-way")
        await trio.lowlevel.checkpoint()

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the socket takes right now, without waiting; returns how many bytes were written.

        If that is less than `len(data)`, OpenSSL may hold a record half-written: the very next send on this
        stream must be `send_all` of exactly the bytes not written (`data[returned:]`).
        """
        if self._send_conflict:
            raise trio.BusyResourceError("another task is already sending on this TLS stream")
        self._check()
        view = memoryview(data)
        total = 0
        while total < len(view):
            try:
                total += self.ssl.send(view[total:])
            except (SSL.WantWriteError, SSL.WantReadError):
                break
            except SSL.Error as exc:
                self._broken = exc
                raise trio.BrokenResourceError(f"TLS send failed: {describe_ssl_error(exc)}") from None
        return total

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await trio.lowlevel.wait_writable(self.socket)

    # --- receiving ---

    def _read_batch(self) -> int:
        """SSL_read into the shared buffer until OpenSSL would block; returns bytes read (0 and _eof: EOF)."""
        total = 0
        self._read_wants_write = False
        while total + _RECORD <= RECEIVE_BUFFER_SIZE:
            try:
                n = _recv_record(self.ssl, total)
            except SSL.WantReadError:
                break
            except SSL.WantWriteError:  # e.g. answering a KeyUpdate with a full socket buffer
                self._read_wants_write = True
                break
            except SSL.ZeroReturnError:  # close_notify
                self._eof = True
                break
            except SSL.SysCallError as exc:
                if exc.args[0] == -1:  # TCP FIN without close_notify: the end of the stream, nothing lost
                    self._eof = True
                    break
                if total:
                    break  # deliver what we have; the error repeats on the next call
                self._broken = exc
                raise trio.BrokenResourceError(f"TLS receive failed: {describe_ssl_error(exc)}") from None
            except SSL.Error as exc:
                if total:
                    break
                self._broken = exc
                raise trio.BrokenResourceError(f"TLS receive failed: {describe_ssl_error(exc)}") from None
            if n == 0:
                self._eof = True
                break
            total += n
            if n < _FULL_RECORD and not self.ssl.pending():
                # A short record usually ends what the peer wrote: wait for readability next time instead of
                # an SSL_read that fails with EAGAIN (a syscall and an exception per request turn).
                self._idle_hint = True
                break
        return total

    async def receive_view(self) -> memoryview:
        """The next batch of plaintext, as a view of the process-wide buffer; empty at EOF.

        The view is overwritten by the next receive on *any* TLS stream: consume it before the next await.
        """
        if self._receive_conflict:
            raise trio.BusyResourceError("another task is already receiving on this TLS stream")
        self._receive_conflict = True
        try:
            # The checkpoint comes first: between the read below and the caller consuming the view, no other
            # task may run (it could refill the shared buffer).
            if self._idle_hint:
                self._idle_hint = False
                await trio.lowlevel.wait_readable(self.socket)
            else:
                await trio.lowlevel.checkpoint()
            while True:
                self._check()
                if self._eof:
                    return _shared_view[:0]
                n = self._read_batch()
                if n:
                    return _shared_view[:n]
                if self._read_wants_write:
                    await trio.lowlevel.wait_writable(self.socket)
                elif not self._eof:
                    await trio.lowlevel.wait_readable(self.socket)
        finally:
            self._receive_conflict = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Trio `Stream` API (a private copy of the data); the HBONE data path uses `receive_view`."""
        if max_bytes is not None and not isinstance(max_bytes, int):
            raise TypeError("max_bytes must be an int or None")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receive_conflict:
            raise trio.BusyResourceError("another task is already receiving on this TLS stream")
        self._receive_conflict = True
        try:
            while True:
                self._check()
                if self._eof:
                    await trio.lowlevel.checkpoint()
                    return b""
                try:
                    data = self.ssl.recv(max_bytes or 65536)
                except SSL.WantReadError:
                    await trio.lowlevel.wait_readable(self.socket)
                    continue
                except SSL.WantWriteError:
                    await trio.lowlevel.wait_writable(self.socket)
                    continue
                except SSL.ZeroReturnError:
                    self._eof = True
                    continue
                except SSL.SysCallError as exc:
                    if exc.args[0] == -1:
                        self._eof = True
                        continue
                    self._broken = exc
                    raise trio.BrokenResourceError(f"TLS receive failed: {describe_ssl_error(exc)}") from None
                except SSL.Error as exc:
                    self._broken = exc
                    raise trio.BrokenResourceError(f"TLS receive failed: {describe_ssl_error(exc)}") from None
                await trio.lowlevel.checkpoint()
                return data
        finally:
            self._receive_conflict = False

    # --- closing ---

    def close_nowait(self) -> None:
        """Send close_notify if that can be done without blocking, then close the socket."""
        if self._closed:
            return
        self._closed = True
        if self._broken is None and not self._send_conflict:
            with contextlib.suppress(SSL.Error):
                self.ssl.shutdown()
        trio.lowlevel.notify_closing(self.socket)  # wakes a blocked reader/writer with ClosedResourceError
        self.socket.close()

    async def aclose(self) -> None:
        self.close_nowait()
        await trio.lowlevel.checkpoint()
