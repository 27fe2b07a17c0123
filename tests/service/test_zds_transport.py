"""ZdsServer and run_zds_client over a real SOCK_SEQPACKET socket in one Trio process, with pipe fds
standing in for netns fds. Raw peers built from the codec check the wire where our own peer would hide it."""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from services.node_agent.zds_server import ZdsServer
from services.ztunnel.inpod.statemanager import WorkloadManager
from services.ztunnel.inpod.zds_client import run_zds_client
from shared.zds.codec import decode_ack, decode_request, encode_ack, encode_hello, encode_request
from shared.zds.errors import ZdsConnectionLost, ZdsNack, ZdsNoConnection, ZdsTimeout
from shared.zds.transport import ZdsSocketError, bind_server_socket, connect, recv_datagram, send_datagram
from shared.zds.types import AddWorkload, DelWorkload, KeepWorkload, PodUid, SnapshotSent
from tests.service.zds_fakes import RecordingHandler, StaticSnapshot, info, open_fd_count, wait_until

A, B = PodUid("a"), PodUid("b")


def pipe_fd() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "ztunnel.sock")


@pytest.fixture
async def served(sock_path: str) -> AsyncIterator[tuple[ZdsServer, StaticSnapshot]]:
    snapshot = StaticSnapshot()
    server = ZdsServer(sock_path, snapshot, deadline=2.0, accept_interval=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server, snapshot
        nursery.cancel_scope.cancel()


async def raw_client(path: str, hello: tuple[bytes, list[int]] | None = None) -> trio.socket.SocketType:
    sock = await connect(path)
    await send_datagram(sock, hello or encode_hello())
    return sock


async def expect_closed(sock: trio.socket.SocketType) -> None:
    """The server closed this connection: EOF, or a reset when it closed with our datagram unread."""
    with trio.fail_after(5):
        try:
            data, _, _ = await recv_datagram(sock)
        except ConnectionResetError:
            return
    assert data == b""


async def test_socket_file_is_private_and_stale_one_replaced(sock_path: str) -> None:
    Path(sock_path).touch()
    with pytest.raises(ZdsSocketError, match="not a socket"):
        bind_server_socket(sock_path)
    os.unlink(sock_path)
    first = bind_server_socket(sock_path)
    first.close()  # leaves a stale socket file behind, as a crashed agent would
    second = bind_server_socket(sock_path)
    try:
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
    finally:
        second.close()


async def test_snapshot_is_adds_and_keeps_then_snapshot_sent_one_at_a_time(
    served: tuple[ZdsServer, StaticSnapshot], sock_path: str
) -> None:
    server, snapshot = served
    fd = pipe_fd()
    snapshot.entries = {A: (info("a"), fd), B: (info("b"), None)}
    sock = await raw_client(sock_path)
    with trio.fail_after(5):
        seen = []
        for _ in range(3):
            data, fds, flags = await recv_datagram(sock)
            request = decode_request(data, fds, flags)
            seen.append(request)
            # nothing else may arrive before we answer
            with trio.move_on_after(0.1):
                await trio.lowlevel.wait_readable(sock)
                pytest.fail("server sent a second message before the answer")
            if isinstance(request, AddWorkload):
                assert os.fstat(request.netns_fd).st_ino == os.fstat(fd).st_ino
                os.close(request.netns_fd)
            await send_datagram(sock, encode_ack())
    assert {type(r) for r in seen[:2]} == {AddWorkload, KeepWorkload}
    assert seen[2] == SnapshotSent()
    await wait_until(lambda: server.connection_count == 1)
    sock.close()
    os.close(fd)


def close_line(caplog: pytest.LogCaptureFixture, message: str) -> dict[str, object]:
    """The fields of the one `zds.server` line with this message."""
    [record] = [r for r in caplog.records if r.name == "zds.server" and r.getMessage() == message]
    return dict(record.__dict__["fields"])


async def test_unsolicited_message_closes_only_that_connection(
    served: tuple[ZdsServer, StaticSnapshot], sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = served
    good = await raw_client(sock_path)
    bad = await raw_client(sock_path)
    for sock in (good, bad):
        data, fds, _ = await recv_datagram(sock)
        assert decode_request(data, fds) == SnapshotSent()
        await send_datagram(sock, encode_ack())
    await wait_until(lambda: server.connection_count == 2)
    with caplog.at_level(logging.INFO, logger="zds.server"):
        await send_datagram(bad, encode_ack())  # unsolicited
        await expect_closed(bad)
        await wait_until(lambda: server.connection_count == 1)
    fields = close_line(caplog, "ztunnel protocol error, unexpected message; closing")
    assert fields["peer_uid"] == os.geteuid()
    assert "no request in flight" in str(fields["error"])
    bad.close()
    good.close()


@pytest.mark.parametrize("attempt", range(10))
async def test_unsolicited_message_with_adds_queued_closes_only_that_connection(
    served: tuple[ZdsServer, StaticSnapshot], sock_path: str, attempt: int
) -> None:
    """An answer with a second, unsolicited one behind it while more adds wait in the queue: the writer has
    already taken the next job when the reader finds the connection broken. That job fails with a
    connection error and the server keeps accepting; the node agent never goes down with one ztunnel."""
    server, _ = served
    bad = await raw_client(sock_path)
    data, fds, _ = await recv_datagram(bad)
    assert decode_request(data, fds) == SnapshotSent()
    await send_datagram(bad, encode_ack())
    await wait_until(lambda: server.connection_count == 1)
    errors: list[Exception] = []

    async def add(uid: PodUid) -> None:
        try:
            await server.add_workload(uid, info(uid), fd)
        except (ZdsConnectionLost, ZdsTimeout) as exc:
            errors.append(exc)

    fd = pipe_fd()
    async with trio.open_nursery() as nursery:
        for uid in (A, B, PodUid("c")):
            nursery.start_soon(add, uid)
        data, fds, _ = await recv_datagram(bad)
        os.close(decode_request(data, fds).netns_fd)  # type: ignore[union-attr]
        await send_datagram(bad, encode_ack())
        await send_datagram(bad, encode_ack())  # unsolicited
    await expect_closed(bad)
    bad.close()
    os.close(fd)
    assert len(errors) == 2 and all(isinstance(e, ZdsConnectionLost) for e in errors)
    good = await raw_client(sock_path)  # the listener is still there, and serves
    data, fds, _ = await recv_datagram(good)
    assert decode_request(data, fds) == SnapshotSent()
    good.close()


async def test_an_internal_error_on_one_connection_closes_only_that_connection(
    served: tuple[ZdsServer, StaticSnapshot], sock_path: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    _, snapshot = served

    def broken() -> list[object]:
        raise RuntimeError("snapshot source bug")

    monkeypatch.setattr(snapshot, "snapshot", broken)
    with caplog.at_level(logging.INFO, logger="zds.server"):
        sock = await raw_client(sock_path)
        await expect_closed(sock)
    sock.close()
    fields = close_line(caplog, "ztunnel connection closed on an internal error")
    assert fields["peer_uid"] == os.geteuid()
    assert "snapshot source bug" in str(fields["error"])
    monkeypatch.undo()
    sock = await raw_client(sock_path)  # the server outlived the bug and serves the next connection
    data, fds, _ = await recv_datagram(sock)
    assert decode_request(data, fds) == SnapshotSent()
    sock.close()


@pytest.mark.parametrize("hello", [b"\x08\x00", b"", b"\x08\x02", b"\xff\xff"])
async def test_bad_hello_is_closed(
    served: tuple[ZdsServer, StaticSnapshot], sock_path: str, hello: bytes
) -> None:
    server, _ = served
    sock = await connect(sock_path)
    await send_datagram(sock, (hello, []))
    await expect_closed(sock)
    assert server.connection_count == 0
    sock.close()


async def test_peer_with_wrong_uid_is_refused(sock_path: str) -> None:
    server = ZdsServer(
        sock_path, StaticSnapshot(), allowed_uids=frozenset({os.geteuid() + 1}), accept_interval=0
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        sock = await raw_client(sock_path)
        await expect_closed(sock)
        assert server.connection_count == 0
        sock.close()
        nursery.cancel_scope.cancel()


async def test_add_goes_to_newest_and_del_to_all(
    served: tuple[ZdsServer, StaticSnapshot], sock_path: str
) -> None:
    server, _ = served
    with pytest.raises(ZdsNoConnection):
        await server.add_workload(A, info("a"), pipe_fd())
    old = await raw_client(sock_path)
    new = await raw_client(sock_path)
    for sock in (old, new):
        await recv_datagram(sock)
        await send_datagram(sock, encode_ack())
    await wait_until(lambda: server.connection_count == 2)
    received: dict[str, list[object]] = {"old": [], "new": []}

    async def peer(name: str, sock: trio.socket.SocketType, answer: str = "") -> None:
        while True:
            data, fds, flags = await recv_datagram(sock)
            if not data:
                return
            request = decode_request(data, fds, flags)
            if isinstance(request, AddWorkload):
                os.close(request.netns_fd)
            received[name].append(type(request))
            await send_datagram(sock, encode_ack(answer))

    fd = pipe_fd()
    before = open_fd_count()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer, "old", old)
        nursery.start_soon(peer, "new", new, "")
        with trio.fail_after(5):
            await server.add_workload(A, info("a"), fd)
            await server.del_workload(A)
        nursery.cancel_scope.cancel()
    assert received == {"old": [DelWorkload], "new": [AddWorkload, DelWorkload]}
    assert open_fd_count() == before
    os.close(fd)
    old.close()
    new.close()


async def test_nack_is_reported(served: tuple[ZdsServer, StaticSnapshot], sock_path: str) -> None:
    server, _ = served
    sock = await raw_client(sock_path)
    await recv_datagram(sock)
    await send_datagram(sock, encode_ack())
    await wait_until(lambda: server.connection_count == 1)

    async def nacker() -> None:
        data, fds, flags = await recv_datagram(sock)
        request = decode_request(data, fds, flags)
        assert isinstance(request, AddWorkload)
        os.close(request.netns_fd)
        await send_datagram(sock, encode_ack("failure to start proxy : boom"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(nacker)
        with pytest.raises(ZdsNack, match="got ack error: failure to start proxy : boom"):
            await server.add_workload(A, info("a"), pipe_fd())
    sock.close()


async def test_client_and_server_end_to_end_with_reconnect_reconcile(sock_path: str) -> None:
    before = open_fd_count()
    snapshot = StaticSnapshot()
    fd_a, fd_b = pipe_fd(), pipe_fd()
    snapshot.entries = {A: (info("a"), fd_a), B: (info("b"), fd_b)}
    handler = RecordingHandler()
    manager = WorkloadManager(handler)
    async with trio.open_nursery() as outer:
        await outer.start(run_zds_client, sock_path, manager)
        with trio.CancelScope() as first_server:
            async with trio.open_nursery() as nursery:
                server = ZdsServer(sock_path, snapshot, accept_interval=0)
                await nursery.start(server.serve)
                await wait_until(lambda: manager.ready)
                assert set(manager.running) == {A, B}
                first_server.cancel()
        await wait_until(lambda: not manager.connected)
        assert not manager.ready
        # the agent comes back knowing only A: B must go, A must stay untouched
        del snapshot.entries[B]
        generation = manager.running[A].generation
        async with trio.open_nursery() as nursery:
            server = ZdsServer(sock_path, snapshot, accept_interval=0)
            await nursery.start(server.serve)
            await wait_until(lambda: manager.ready and manager.connections == 2)
            assert set(manager.running) == {A}
            assert manager.running[A].generation == generation
            nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    manager.connection_started()  # a new connection drops pending pods; its empty snapshot stops the rest
    await manager.handle(SnapshotSent())
    os.close(fd_a)
    os.close(fd_b)
    assert handler.events == [("start", A), ("start", B), ("stop", B), ("stop", A)] or handler.events == [
        ("start", B),
        ("start", A),
        ("stop", B),
        ("stop", A),
    ]
    assert open_fd_count() == before


@pytest.mark.parametrize(
    ("datagram", "nack_prefix"),
    [
        (
            encode_request(AddWorkload(uid=A, workload_info=info("a"))),
            "failure to read message : No control message",
        ),
        ((encode_request(SnapshotSent())[0], "fd"), "failure to read message : Unexpected control message"),
        (
            (encode_request(AddWorkload(uid=A, workload_info=info("a")))[0], "2fds"),
            "failure to read message : Expected 1 FD",
        ),
        ((b"\x2a\x03\x0a\x01" + b"x" * 1100, []), "failure to read message : received truncated message"),
        ((encode_request(AddWorkload(uid=A, workload_info=None))[0], "fd"), "failure to process message"),
    ],
)
async def test_client_nacks_bad_messages_and_reconnects(
    tmp_path: Path, datagram: tuple[bytes, object], nack_prefix: str
) -> None:
    """The client answers unreadable/invalid messages with upstream's NACK text, then reconnects with a
    fresh hello (no process exit), and leaks no fd."""
    path = str(tmp_path / "s.sock")
    before = open_fd_count()
    listener = bind_server_socket(path)
    manager = WorkloadManager(RecordingHandler())
    async with trio.open_nursery() as nursery:
        await nursery.start(run_zds_client, path, manager)
        with trio.fail_after(5):
            conn, _ = await listener.accept()
            data, _, _ = await recv_datagram(conn)
            assert data == b"\x08\x01"
            data, extra = datagram
            fds = [
                pipe_fd() for _ in range({"fd": 1, "2fds": 2}.get(extra, 0) if isinstance(extra, str) else 0)
            ]
            if len(data) > 1024:
                raw = socket.socket(fileno=os.dup(conn.fileno()))
                raw.sendmsg([data])
                raw.close()
            else:
                await send_datagram(conn, (data, fds))
            for fd in fds:
                os.close(fd)
            answer, _, _ = await recv_datagram(conn)
            assert decode_ack(answer, []).error.startswith(nack_prefix)
            eof, _, _ = await recv_datagram(conn)
            assert eof == b""
            conn.close()
            again, _ = await listener.accept()
            data, _, _ = await recv_datagram(again)
            assert data == b"\x08\x01"
            again.close()
        nursery.cancel_scope.cancel()
    listener.close()
    assert open_fd_count() == before


async def test_a_socket_a_live_server_still_serves_is_refused_not_replaced(sock_path: str) -> None:
    first = bind_server_socket(sock_path)
    try:
        inode = os.stat(sock_path).st_ino
        with pytest.raises(ZdsSocketError, match="another live process is serving"):
            bind_server_socket(sock_path)
        assert os.stat(sock_path).st_ino == inode
    finally:
        first.close()
