"""ZDS server (node-agent role) on Trio.

Theory of operation
-------------------
`ZdsServer.serve()` owns the listening SEQPACKET socket and a nursery with one task group per ztunnel
connection. A connection is admitted only if its peer uid (SO_PEERCRED) is allowed, then must send a
valid `ZdsHello` within 5 s. It then gets the node's snapshot (every pod as `add`+fd, or `keep` when the
netns is unknown, then `snapshot_sent`), and afterwards serves a queue of jobs.

Each connection has exactly two tasks, as upstream has one goroutine writer per connection:

* the *writer* is the only task that sends; it takes one job at a time from the connection's queue
  (capacity 100), sends it, and waits for its answer (5 s) before the next, so there is never more than
  one message in flight;
* the *reader* receives every datagram. An answer while a request is in flight goes to the writer;
  anything else (an unsolicited message: upstream's keepalive check) or EOF ends the connection.

`add_workload()` queues on the newest connection only and reports the answer; `del_workload()` queues
on every connection. Jobs own a duplicate of the netns fd, closed after sending or when the connection
dies, so the caller's fd (the netns cache's) is never shared across tasks. A misbehaving or vanished
ztunnel only ever ends its own connection: a job the writer has taken when the reader finds the connection
broken fails with `ZdsConnectionLost` (the lifecycle retries it on the next connection), and any other
error tied to one connection closes that connection with a log line, never the listener.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

import trio

from shared.accept import ACCEPT_CAPACITY_ERRNOS, ACCEPT_RETRY_DELAY
from shared.logs import Display, Field
from shared.rundir import bound_socket_file, make_parents, remove_made, remove_own_socket
from shared.zds.codec import close_fds, decode_ack, decode_hello
from shared.zds.errors import (
    ZdsConnectionLost,
    ZdsEndOfStream,
    ZdsError,
    ZdsNack,
    ZdsNoConnection,
    ZdsProtocolError,
    ZdsReadError,
    ZdsTimeout,
    ZdsVersionError,
)
from shared.zds.session import ServerSession
from shared.zds.transport import (
    ZdsSocketError,
    bind_server_socket,
    peer_credentials,
    recv_datagram,
    send_datagram,
)
from shared.zds.types import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    PodUid,
    Request,
    SnapshotEntry,
    SnapshotSent,
    WorkloadInfo,
)

log = logging.getLogger("zds.server")

DEFAULT_SOCKET_PATH = "/var/run/ztunnel/ztunnel.sock"
READ_WRITE_DEADLINE = 5.0  # upstream readWriteDeadline
QUEUE_SIZE = 100
ACCEPT_INTERVAL = 0.2  # upstream rate-limits accepts to 5/s


def _uid_list(uids: frozenset[int]) -> str:
    return ",".join(map(str, sorted(uids)))


class SnapshotSource(Protocol):
    """What the node agent knows about its enrolled pods (its netns cache)."""

    def snapshot(self) -> list[SnapshotEntry]: ...


@dataclass
class _Job:
    request: Request
    done: trio.Event = field(default_factory=trio.Event)
    answer: Ack | None = None
    error: ZdsError | None = None

    def finish(self, *, answer: Ack | None = None, error: ZdsError | None = None) -> None:
        if isinstance(self.request, AddWorkload) and self.request.netns_fd >= 0:
            close_fds([self.request.netns_fd])
        self.answer, self.error = answer, error
        self.done.set()


@dataclass
class _Connection:
    number: int
    sock: trio.socket.SocketType
    peer: list[Field]  # the connection in log lines: number, pid and uid of the ztunnel process
    pid: int = 0  # the ztunnel process (SO_PEERCRED)
    session: ServerSession = field(default_factory=ServerSession)
    answers_send: trio.MemorySendChannel[Ack] = field(init=False)
    answers_recv: trio.MemoryReceiveChannel[Ack] = field(init=False)
    jobs_send: trio.MemorySendChannel[_Job] = field(init=False)
    jobs_recv: trio.MemoryReceiveChannel[_Job] = field(init=False)
    closing: bool = False

    def __post_init__(self) -> None:
        self.answers_send, self.answers_recv = trio.open_memory_channel[Ack](1)
        self.jobs_send, self.jobs_recv = trio.open_memory_channel[_Job](QUEUE_SIZE)


class ZdsServer:
    """The node agent's ZDS endpoint; see the module docstring.

    Args:
        path: socket path (upstream default /var/run/ztunnel/ztunnel.sock).
        snapshot: source of the snapshot sent to each new connection.
        allowed_uids: peer uids admitted (default: this process's effective uid).
        deadline: seconds to wait for the hello and for each answer.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        snapshot: SnapshotSource,
        *,
        allowed_uids: frozenset[int] | None = None,
        deadline: float = READ_WRITE_DEADLINE,
        accept_interval: float = ACCEPT_INTERVAL,
    ) -> None:
        self.path = os.fspath(path)
        self._snapshot = snapshot
        self.allowed_uids = allowed_uids if allowed_uids is not None else frozenset({os.geteuid()})
        self.deadline = deadline
        self.accept_interval = accept_interval
        self._connections: list[_Connection] = []
        self._counter = 0
        self._changed = trio.Event()

    # --- public API ------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return any(not c.closing for c in self._connections)

    @property
    def connection_count(self) -> int:
        return sum(1 for c in self._connections if not c.closing)

    @property
    def peer_pids(self) -> frozenset[int]:
        """The pids (SO_PEERCRED) of the ztunnel processes connected now: whose sockets a pod's listeners
        must be (services/node_agent/verify.py)."""
        return frozenset(c.pid for c in self._connections if not c.closing)

    async def wait_connections(self, count: int = 1) -> None:
        """Return once at least `count` connections have said hello."""
        while self.connection_count < count:
            await self._changed.wait()

    async def add_workload(self, uid: PodUid, info: WorkloadInfo, netns_fd: int) -> None:
        """Send `add` (with a copy of `netns_fd`) to the newest connection and wait for its answer.

        Raises:
            ZdsNoConnection: no ztunnel is connected.
            ZdsNack: ztunnel answered with an error.
            ZdsTimeout / ZdsConnectionLost: no answer.
        """
        live = [c for c in self._connections if not c.closing]
        if not live:
            raise ZdsNoConnection()
        job = _Job(AddWorkload(uid=uid, workload_info=info, netns_fd=os.dup(netns_fd)))
        await self._submit(live[-1], job)
        if job.error is not None:
            raise job.error
        assert job.answer is not None
        if not job.answer.ok:
            raise ZdsNack(job.answer.error)

    async def del_workload(self, uid: PodUid) -> None:
        """Send `del` to every connection; answers are ignored, transport errors logged."""
        live = [c for c in self._connections if not c.closing]
        async with trio.open_nursery() as nursery:
            for conn in live:
                nursery.start_soon(self._submit_logged, conn, _Job(DelWorkload(uid=uid)))

    # --- serving ----------------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled. Calls task_status.started() once the socket is bound.

        Missing parent directories of the socket are made (this server owns them) and removed at exit."""
        try:
            made = make_parents(self.path)
        except OSError as exc:
            raise ZdsSocketError(f"ZDS socket {self.path}: {exc.strerror}") from None
        try:
            listener = bind_server_socket(self.path)
        except BaseException:
            remove_made(made)
            raise
        own = bound_socket_file(self.path)
        log.info("ZDS server listening", extra={"fields": [
            ("path", self.path), ("allowed_uids", _uid_list(self.allowed_uids))]})
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        sock, _ = await listener.accept()
                    except OSError as exc:
                        if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                            log.error("accept failed, retrying in 100 ms",
                                      extra={"fields": [("path", self.path), ("error", str(exc))]})
                            await trio.sleep(ACCEPT_RETRY_DELAY)
                            continue
                        raise
                    nursery.start_soon(self._handle, sock)
                    await trio.sleep(self.accept_interval)
        finally:
            listener.close()
            remove_own_socket(self.path, own)
            remove_made(made)

    async def _handle(self, sock: trio.socket.SocketType) -> None:
        self._counter += 1
        conn: _Connection | None = None
        try:
            pid, uid, _gid = peer_credentials(sock)
            peer: list[Field] = [("connection", self._counter), ("pid", pid), ("peer_uid", uid)]
            if uid not in self.allowed_uids:
                log.warning(
                    "ztunnel connection refused: its uid is not allowed; run ztunnel as an allowed user",
                    extra={"fields": [*peer, ("allowed_uids", _uid_list(self.allowed_uids))]},
                )
                return
            conn = _Connection(number=self._counter, sock=sock, peer=peer, pid=pid)
            if not await self._receive_hello(conn):
                return
            self._connections.append(conn)
            self._notify()
            log.info("ztunnel connection established", extra={"fields": peer})
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, conn, nursery.cancel_scope)
                    await self._writer(conn)
                    nursery.cancel_scope.cancel()
            except* ZdsError as group:
                for exc in group.exceptions:
                    log.warning("ztunnel connection closed", extra={"fields": [*peer, ("error", str(exc))]})
            except* Exception as group:  # a bug tied to this connection: it closes, the server carries on
                for bug in group.exceptions:
                    log.error("ztunnel connection closed on an internal error",
                              extra={"fields": [*peer, ("error", repr(bug))]}, exc_info=bug)
        finally:
            if conn is not None:
                self._teardown(conn)
            sock.close()

    async def _receive_hello(self, conn: _Connection) -> bool:
        try:
            with trio.fail_after(self.deadline):
                data, fds, flags = await recv_datagram(conn.sock)
            hello = decode_hello(data, fds, flags)
            conn.session.receive_hello(hello)
        except trio.TooSlowError:
            log.warning("ztunnel sent no hello in time; closing",
                        extra={"fields": [*conn.peer, ("deadline", f"{self.deadline:.0f}s")]})
            return False
        except ZdsEndOfStream:
            log.info("ztunnel connection closed before its hello", extra={"fields": conn.peer})
            return False
        except ZdsVersionError as exc:
            log.warning("ztunnel hello refused", extra={"fields": [*conn.peer, ("error", str(exc))]})
            return False
        except (ZdsReadError, ZdsProtocolError) as exc:
            log.warning("ztunnel sent an unreadable hello; closing",
                        extra={"fields": [*conn.peer, ("error", str(exc))]})
            return False
        except OSError as exc:
            log.warning("ztunnel connection failed before its hello",
                        extra={"fields": [*conn.peer, ("error", str(exc))]})
            return False
        return True

    async def _reader(self, conn: _Connection, cancel_scope: trio.CancelScope) -> None:
        """Every datagram from ztunnel: answers go to the writer; anything else ends the connection."""
        try:
            while True:
                data, fds, flags = await recv_datagram(conn.sock)
                ack = decode_ack(data, fds, flags)
                conn.session.receive_ack(ack)
                conn.answers_send.send_nowait(ack)
        except ZdsEndOfStream:
            log.info("ztunnel closed the connection", extra={"fields": conn.peer})
        except ZdsProtocolError as exc:
            log.warning("ztunnel protocol error, unexpected message; closing",
                        extra={"fields": [*conn.peer, ("error", str(exc))]})
        except ZdsReadError as exc:
            log.warning("unreadable answer from ztunnel; closing",
                        extra={"fields": [*conn.peer, ("error", str(exc))]})
        except OSError as exc:
            log.warning("read from ztunnel failed", extra={"fields": [*conn.peer, ("error", str(exc))]})
        conn.closing = True
        await conn.answers_send.aclose()
        cancel_scope.cancel()

    async def _exchange(self, conn: _Connection, request: Request) -> Ack:
        if conn.closing:  # the reader found the connection broken after this job was taken from the queue
            raise ZdsConnectionLost("connection closed")
        datagram = conn.session.send(request)
        try:
            await send_datagram(conn.sock, datagram)
        except OSError as exc:
            raise ZdsConnectionLost(f"sendmsg: {exc.strerror or exc}") from None
        with trio.move_on_after(self.deadline):
            try:
                return await conn.answers_recv.receive()
            except trio.EndOfChannel:
                raise ZdsConnectionLost("connection closed before the answer") from None
        raise ZdsTimeout(f"no answer to {type(request).__name__} within {self.deadline:.0f} s")

    async def _writer(self, conn: _Connection) -> None:
        entries = self._snapshot_with_own_fds()
        try:
            while entries:
                entry = entries.pop(0)
                request: Request
                if entry.netns_fd is not None and entry.info is not None:
                    request = AddWorkload(uid=entry.uid, workload_info=entry.info, netns_fd=entry.netns_fd)
                else:
                    request = KeepWorkload(uid=entry.uid)
                try:
                    ack = await self._exchange(conn, request)
                finally:
                    if entry.netns_fd is not None:
                        close_fds([entry.netns_fd])
                if not ack.ok:
                    log.warning("snapshot entry NACKed", extra={"fields": [
                        *conn.peer, ("uid", entry.uid), ("error", ack.error)]})
        finally:
            close_fds([e.netns_fd for e in entries if e.netns_fd is not None])
        ack = await self._exchange(conn, SnapshotSent())
        if not ack.ok:
            log.warning("snapshot_sent NACKed", extra={"fields": [*conn.peer, ("error", ack.error)]})
        log.info("snapshot delivered", extra={"fields": conn.peer})
        async for job in conn.jobs_recv:
            try:
                answer = await self._exchange(conn, job.request)
            except ZdsError as exc:
                job.finish(error=exc)
                raise
            except BaseException:
                job.finish(error=ZdsConnectionLost("connection closed"))
                raise
            job.finish(answer=answer)

    def _snapshot_with_own_fds(self) -> list[SnapshotEntry]:
        """The snapshot with each fd duplicated now, so the cache may close its own at any time."""
        out = []
        for entry in self._snapshot.snapshot():
            fd = os.dup(entry.netns_fd) if entry.netns_fd is not None else None
            out.append(SnapshotEntry(uid=entry.uid, info=entry.info, netns_fd=fd))
        return out

    async def _submit(self, conn: _Connection, job: _Job) -> None:
        try:
            conn.jobs_send.send_nowait(job)
        except trio.WouldBlock:
            job.finish(error=ZdsTimeout("ZDS queue to ztunnel is full (100 messages)"))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            job.finish(error=ZdsConnectionLost("connection closed"))
        await job.done.wait()

    async def _submit_logged(self, conn: _Connection, job: _Job) -> None:
        await self._submit(conn, job)
        if job.error is not None:
            log.warning("request to ztunnel failed", extra={"fields": [
                *conn.peer, ("request", Display(type(job.request).__name__)),
                ("uid", getattr(job.request, "uid", None)), ("error", str(job.error))]})

    def _teardown(self, conn: _Connection) -> None:
        conn.closing = True
        if conn in self._connections:
            self._connections.remove(conn)
        conn.jobs_send.close()
        while True:
            try:
                job = conn.jobs_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            job.finish(error=ZdsConnectionLost("connection closed"))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


__all__ = ["DEFAULT_SOCKET_PATH", "SnapshotSource", "ZdsServer"]
