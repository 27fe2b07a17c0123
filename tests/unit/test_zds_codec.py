"""ZDS codec: byte-for-byte fixtures of upstream's messages and its datagram/fd rules, no event loop."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.zds.codec import (
    decode_ack,
    decode_hello,
    decode_request,
    encode_ack,
    encode_hello,
    encode_request,
)
from shared.zds.errors import ZdsEndOfStream, ZdsReadError
from shared.zds.types import (
    Ack,
    AddWorkload,
    DelWorkload,
    Hello,
    KeepWorkload,
    PodUid,
    SnapshotSent,
    WorkloadInfo,
)

INFO = WorkloadInfo(name="n", namespace="ns", service_account="sa")
ADD_BYTES = bytes.fromhex("0a 10 0a 01 75 12 0b 0a 01 6e 12 02 6e 73 1a 02 73 61")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def pipe_fds() -> Iterator[list[int]]:
    """Four pipe fds standing in for netns fds; whatever the test left open is closed afterwards."""
    fds: list[int] = []
    for _ in range(2):
        fds.extend(os.pipe())
    yield fds
    for fd in fds:
        if is_open(fd):
            os.close(fd)


@pytest.mark.parametrize(
    ("datagram", "expected"),
    [
        (encode_hello(), "08 01"),
        (encode_ack(), "0a 00"),
        (encode_ack("x"), "0a 03 0a 01 78"),
        (encode_request(SnapshotSent()), "1a 00"),
        (encode_request(DelWorkload(uid=PodUid("abc"))), "12 05 12 03 61 62 63"),
        (encode_request(KeepWorkload(uid=PodUid("abc"))), "2a 05 0a 03 61 62 63"),
        (encode_request(AddWorkload(uid=PodUid("u"), workload_info=INFO)), ADD_BYTES.hex(" ")),
    ],
)
def test_encodings_match_upstream_fixtures(datagram: tuple[bytes, list[int]], expected: str) -> None:
    data, fds = datagram
    assert data == bytes.fromhex(expected)
    assert fds == []


def test_add_carries_its_fd_and_decodes_back(pipe_fds: list[int]) -> None:
    data, fds = encode_request(AddWorkload(uid=PodUid("u"), workload_info=INFO, netns_fd=pipe_fds[0]))
    assert data == ADD_BYTES
    assert fds == [pipe_fds[0]]
    decoded = decode_request(data, fds)
    assert decoded == AddWorkload(uid=PodUid("u"), workload_info=INFO, netns_fd=pipe_fds[0])


def test_del_uid_is_field_2() -> None:
    assert decode_request(bytes.fromhex("12 05 12 03 61 62 63"), []) == DelWorkload(uid=PodUid("abc"))
    # A uid in field 1 of DelWorkload is an unknown field: the uid reads as empty, never as "abc".
    assert decode_request(bytes.fromhex("12 05 0a 03 61 62 63"), []) == DelWorkload(uid=PodUid(""))


def test_hello_and_ack_decode() -> None:
    assert decode_hello(b"\x08\x01", []) == Hello(version=1)
    assert decode_hello(b"\x08\x07", []) == Hello(version=7)
    assert decode_ack(b"\x0a\x00", []) == Ack()
    assert decode_ack(b"\x0a\x03\x0a\x01x", []).error == "x"
    assert not decode_ack(b"\x0a\x03\x0a\x01x", []).ok


def test_empty_datagram_is_end_of_stream() -> None:
    for decode in (decode_hello, decode_request, decode_ack):
        with pytest.raises(ZdsEndOfStream):
            decode(b"", [])


def test_add_without_fd_is_no_control_message() -> None:
    with pytest.raises(ZdsReadError, match="No control message"):
        decode_request(ADD_BYTES, [])


@pytest.mark.parametrize("payload", ["1a 00", "12 05 12 03 61 62 63", "2a 05 0a 03 61 62 63"])
def test_fd_with_anything_but_add_is_rejected_and_closed(payload: str, pipe_fds: list[int]) -> None:
    with pytest.raises(ZdsReadError, match="Unexpected control message"):
        decode_request(bytes.fromhex(payload), [pipe_fds[0]])
    assert not is_open(pipe_fds[0])


def test_two_fds_are_rejected_and_both_closed(pipe_fds: list[int]) -> None:
    with pytest.raises(ZdsReadError, match="Expected 1 FD, got 2"):
        decode_request(ADD_BYTES, pipe_fds[:2])
    assert not is_open(pipe_fds[0])
    assert not is_open(pipe_fds[1])


@pytest.mark.parametrize(
    ("flags", "message"),
    [(socket.MSG_TRUNC, "received truncated message"), (socket.MSG_CTRUNC, "truncated control message")],
)
def test_truncation_flags_are_errors_and_close_fds(flags: int, message: str, pipe_fds: list[int]) -> None:
    with pytest.raises(ZdsReadError, match=message):
        decode_request(ADD_BYTES, [pipe_fds[0]], flags)
    assert not is_open(pipe_fds[0])


def test_datagram_over_1024_bytes_is_truncated() -> None:
    big = encode_request(KeepWorkload(uid=PodUid("x" * 1100)))[0]
    assert len(big) > 1024
    with pytest.raises(ZdsReadError, match="truncated"):
        decode_request(big, [])


def test_request_without_payload() -> None:
    with pytest.raises(ZdsReadError, match="no payload"):
        decode_request(b"\x30\x01", [])  # only an unknown varint field 6


def test_garbage_is_a_read_error(pipe_fds: list[int]) -> None:
    with pytest.raises(ZdsReadError):
        decode_request(b"\x0a\xff\xff", [pipe_fds[0]])
    assert not is_open(pipe_fds[0])


def test_responses_and_hellos_never_carry_fds(pipe_fds: list[int]) -> None:
    with pytest.raises(ZdsReadError, match="Unexpected control message"):
        decode_ack(b"\x0a\x00", [pipe_fds[0]])
    with pytest.raises(ZdsReadError, match="Unexpected control message"):
        decode_hello(b"\x08\x01", [pipe_fds[1]])
    assert not is_open(pipe_fds[0])
    assert not is_open(pipe_fds[1])


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=1200),
    nfds=st.integers(min_value=0, max_value=3),
    flags=st.sampled_from([0, socket.MSG_TRUNC, socket.MSG_CTRUNC]),
)
def test_arbitrary_datagrams_raise_only_protocol_errors_and_leak_nothing(
    data: bytes, nfds: int, flags: int
) -> None:
    before = open_fds()
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(nfds)]
    for decode in (decode_request, decode_ack, decode_hello):
        own = [os.dup(fd) for fd in fds]
        try:
            result = decode(data, own, flags)
        except (ZdsReadError, ZdsEndOfStream):
            assert not any(is_open(fd) for fd in own)
        else:
            if isinstance(result, AddWorkload):
                assert result.netns_fd in own
                os.close(result.netns_fd)
            else:
                assert not any(is_open(fd) for fd in own)
    for fd in fds:
        os.close(fd)
    assert open_fds() == before
