"""ZDS session state machines: both roles back to back, no event loop, no sockets."""

from __future__ import annotations

import pytest

from shared.zds.codec import decode_ack, decode_hello, decode_request
from shared.zds.errors import ZdsProtocolError, ZdsVersionError
from shared.zds.session import ClientSession, LocalProtocolError, Phase, ServerSession
from shared.zds.types import (
    Ack,
    AddWorkload,
    DelWorkload,
    Hello,
    KeepWorkload,
    PodUid,
    Request,
    SnapshotSent,
    WorkloadInfo,
)

INFO = WorkloadInfo(name="n", namespace="ns", service_account="sa")
A = PodUid("a")


def connected_pair() -> tuple[ServerSession, ClientSession]:
    server, client = ServerSession(), ClientSession()
    data, fds = client.hello()
    server.receive_hello(decode_hello(data, fds))
    return server, client


def exchange(server: ServerSession, client: ClientSession, request: Request, error: str = "") -> Ack:
    """Send `request` server -> client, let the client answer with `error`, feed the answer back."""
    data, _fds = server.send(request)
    received = decode_request(data, [3]) if isinstance(request, AddWorkload) else decode_request(data, [])
    client.receive_request(received)
    ack_data, _ = client.respond(error)
    ack = decode_ack(ack_data, [])
    assert server.receive_ack(ack) == request
    return ack


def test_hello_first_then_snapshot_then_steady() -> None:
    server, client = connected_pair()
    assert server.phase is Phase.SNAPSHOT and client.phase is Phase.SNAPSHOT
    exchange(server, client, KeepWorkload(uid=A))
    exchange(server, client, AddWorkload(uid=A, workload_info=INFO, netns_fd=3))
    assert not client.snapshot_received
    exchange(server, client, SnapshotSent())
    assert server.phase.value == "steady" and client.snapshot_received
    exchange(server, client, AddWorkload(uid=A, workload_info=INFO, netns_fd=3))
    exchange(server, client, DelWorkload(uid=A))
    assert server.idle


@pytest.mark.parametrize("version", [0, 2, 99])
def test_server_refuses_missing_or_unknown_version(version: int) -> None:
    server = ServerSession()
    with pytest.raises(ZdsVersionError) as info:
        server.receive_hello(Hello(version=version))
    assert ("NOT_USED" if version == 0 else f"unknown version {version}") in str(info.value)
    assert server.phase is Phase.CLOSED


def test_server_one_message_in_flight() -> None:
    server, _client = connected_pair()
    server.send(KeepWorkload(uid=A))
    with pytest.raises(LocalProtocolError, match="unanswered"):
        server.send(KeepWorkload(uid=A))


def test_server_cannot_send_keep_or_snapshot_after_snapshot() -> None:
    server, client = connected_pair()
    exchange(server, client, SnapshotSent())
    with pytest.raises(LocalProtocolError):
        server.send(KeepWorkload(uid=A))
    with pytest.raises(LocalProtocolError):
        server.send(SnapshotSent())


def test_server_cannot_send_before_hello() -> None:
    with pytest.raises(LocalProtocolError):
        ServerSession().send(SnapshotSent())


def test_unsolicited_answer_is_a_protocol_error() -> None:
    server, _client = connected_pair()
    with pytest.raises(ZdsProtocolError, match="unexpected message"):
        server.receive_ack(Ack())
    assert server.phase is Phase.CLOSED


def test_client_keep_after_snapshot_is_a_protocol_error() -> None:
    server, client = connected_pair()
    exchange(server, client, SnapshotSent())
    with pytest.raises(ZdsProtocolError, match="pod keep received after snapshot"):
        client.receive_request(KeepWorkload(uid=A))
    assert client.closing
    assert decode_ack(client.respond("failure to process message : x")[0], []).error
    assert client.phase is Phase.CLOSED


def test_client_second_snapshot_sent_is_a_protocol_error() -> None:
    server, client = connected_pair()
    exchange(server, client, SnapshotSent())
    with pytest.raises(ZdsProtocolError, match="pod snapshot received already"):
        client.receive_request(SnapshotSent())


def test_client_add_without_workload_info_is_a_protocol_error() -> None:
    _server, client = connected_pair()
    with pytest.raises(ZdsProtocolError, match="workload_info"):
        client.receive_request(AddWorkload(uid=A, workload_info=None, netns_fd=3))


def test_client_answers_exactly_once() -> None:
    _server, client = connected_pair()
    with pytest.raises(LocalProtocolError):
        client.respond()
    client.receive_request(DelWorkload(uid=A))
    with pytest.raises(LocalProtocolError):
        client.receive_request(DelWorkload(uid=A))
    client.respond()
    with pytest.raises(LocalProtocolError):
        client.respond()


def test_client_hello_only_once_and_first() -> None:
    client = ClientSession()
    with pytest.raises(LocalProtocolError):
        client.receive_request(SnapshotSent())
    assert client.hello()[0] == b"\x08\x01"
    with pytest.raises(LocalProtocolError):
        client.hello()


def test_unreadable_datagram_leaves_only_the_nack() -> None:
    _server, client = connected_pair()
    client.reject_unreadable()
    assert decode_ack(client.respond("failure to read message : no payload")[0], []).error.startswith(
        "failure to read message"
    )
    assert client.phase is Phase.CLOSED
