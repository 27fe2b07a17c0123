"""ZDS codec: pure functions between datagrams (bytes + SCM_RIGHTS fds + recvmsg flags) and messages.

Theory of operation
-------------------
One protobuf message per SOCK_SEQPACKET datagram, no length prefix. The only message with a file
descriptor is `WorkloadRequest{add}`, which carries exactly one (the pod's netns). Decoding follows
upstream ztunnel's `protocol.rs` rules so that our error strings and outcomes match:

* recvmsg reported MSG_TRUNC (datagram > 1024 bytes) -> "received truncated message";
  MSG_CTRUNC (more fds than the control buffer holds) -> "received truncated control message";
* a zero-length datagram is end of stream (`ZdsEndOfStream`);
* bytes that do not parse, or a request without a payload -> "no payload" / decode error;
* fds present but not exactly one -> "Expected 1 FD, got N"; `add` without fd -> "No control message";
  anything but `add` with an fd -> "Unexpected control message".

Every error path closes every received fd before raising, so a caller that gets an exception owns
nothing; on success the fd of an `add` is owned by the returned `AddWorkload.netns_fd`. Decoding raises
only `ZdsReadError`/`ZdsEndOfStream` whatever the input (property-tested). Protobuf classes stay inside
this module.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence

from google.protobuf.message import DecodeError, Message

from shared.api import zds_pb2
from shared.zds.errors import ZdsEndOfStream, ZdsReadError
from shared.zds.types import (
    MAX_DATAGRAM,
    Ack,
    AddWorkload,
    DelWorkload,
    Hello,
    KeepWorkload,
    PodUid,
    Request,
    SnapshotSent,
    Version,
    WorkloadInfo,
)

Datagram = tuple[bytes, list[int]]
"""What goes on the wire: payload bytes and the fds to attach with SCM_RIGHTS."""


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd, ignoring ones already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _check_datagram(data: bytes, fds: Sequence[int], flags: int) -> None:
    if flags & socket.MSG_TRUNC or len(data) > MAX_DATAGRAM:
        close_fds(fds)
        raise ZdsReadError("received truncated message")
    if flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise ZdsReadError("received truncated control message")
    if not data:
        close_fds(fds)
        raise ZdsEndOfStream("end of stream (zero-length datagram)")


def _parse(message: Message, data: bytes, fds: Sequence[int]) -> None:
    try:
        message.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        close_fds(fds)
        raise ZdsReadError(f"failed to decode {type(message).__name__}: {exc}") from None


# --- hello -----------------------------------------------------------------------------------------------


def encode_hello(version: int = Version.V1) -> Datagram:
    """`ZdsHello{version}`; V1 encodes as 08 01."""
    msg = zds_pb2.ZdsHello()
    msg.version = version  # type: ignore[assignment]  # any number, so tests can send unknown ones
    return msg.SerializeToString(), []


def decode_hello(data: bytes, fds: Sequence[int], flags: int = 0) -> Hello:
    """Decode the client's first datagram; the version is returned as sent (the session checks it)."""
    _check_datagram(data, fds, flags)
    if fds:
        close_fds(fds)
        raise ZdsReadError("Unexpected control message")
    msg = zds_pb2.ZdsHello()
    _parse(msg, data, fds)
    return Hello(version=int(msg.version))


# --- requests (node agent -> ztunnel) --------------------------------------------------------------------


def encode_request(request: Request) -> Datagram:
    """Encode a WorkloadRequest; an `add` returns its netns fd to attach (the caller still owns it)."""
    msg = zds_pb2.WorkloadRequest()
    fds: list[int] = []
    match request:
        case AddWorkload(uid=uid, workload_info=info, netns_fd=fd):
            msg.add.uid = uid
            if info is not None:
                msg.add.workload_info.name = info.name
                msg.add.workload_info.namespace = info.namespace
                msg.add.workload_info.service_account = info.service_account
            if fd >= 0:
                fds.append(fd)
        case KeepWorkload(uid=uid):
            msg.keep.uid = uid
        case DelWorkload(uid=uid):
            getattr(msg, "del").uid = uid  # `del` is a Python keyword
        case SnapshotSent():
            msg.snapshot_sent.SetInParent()
    return msg.SerializeToString(), fds


def decode_request(data: bytes, fds: Sequence[int], flags: int = 0) -> Request:
    """Decode one datagram received by ztunnel, with upstream's fd rules (see module docstring).

    Raises:
        ZdsEndOfStream: zero-length datagram.
        ZdsReadError: anything unreadable; every fd in `fds` has been closed.
    """
    _check_datagram(data, fds, flags)
    if len(fds) > 1:
        close_fds(fds)
        raise ZdsReadError(f"Expected 1 FD, got {len(fds)}")
    msg = zds_pb2.WorkloadRequest()
    _parse(msg, data, fds)
    kind = msg.WhichOneof("payload")
    if kind is None:
        close_fds(fds)
        raise ZdsReadError("no payload")
    if kind != "add" and fds:
        close_fds(fds)
        raise ZdsReadError("Unexpected control message")
    if kind == "add":
        if not fds:
            raise ZdsReadError("No control message")
        add = msg.add
        info = None
        if add.HasField("workload_info"):
            wi = add.workload_info
            info = WorkloadInfo(name=wi.name, namespace=wi.namespace, service_account=wi.service_account)
        return AddWorkload(uid=PodUid(add.uid), workload_info=info, netns_fd=fds[0])
    if kind == "keep":
        return KeepWorkload(uid=PodUid(msg.keep.uid))
    if kind == "del":
        return DelWorkload(uid=PodUid(getattr(msg, "del").uid))
    return SnapshotSent()


# --- responses (ztunnel -> node agent) -------------------------------------------------------------------


def encode_ack(error: str = "") -> Datagram:
    """`WorkloadResponse{ack}`: ACK is 0a 00; a NACK carries the error text."""
    msg = zds_pb2.WorkloadResponse()
    msg.ack.error = error
    msg.ack.SetInParent()
    return msg.SerializeToString(), []


def decode_ack(data: bytes, fds: Sequence[int], flags: int = 0) -> Ack:
    """Decode a WorkloadResponse received by the node agent. Responses never carry fds."""
    _check_datagram(data, fds, flags)
    if fds:
        close_fds(fds)
        raise ZdsReadError("Unexpected control message")
    msg = zds_pb2.WorkloadResponse()
    _parse(msg, data, fds)
    if msg.WhichOneof("payload") != "ack":
        raise ZdsReadError("no payload")
    return Ack(error=msg.ack.error)
