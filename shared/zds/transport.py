"""SOCK_SEQPACKET glue for ZDS on Trio: one datagram per message, fds in SCM_RIGHTS.

Received fds are installed with MSG_CMSG_CLOEXEC. The control buffer has room for a few fds so a peer that
sends too many gets the precise "Expected 1 FD, got N" error; beyond that the kernel sets MSG_CTRUNC and
drops the rest itself (nothing leaks either way).
"""

from __future__ import annotations

import array
import errno
import os
import socket
import stat
import struct
from pathlib import Path

import trio

from shared.rundir import in_use_message, socket_in_use
from shared.zds.codec import Datagram, close_fds
from shared.zds.errors import ZdsError
from shared.zds.types import MAX_DATAGRAM

MAX_FDS_PER_DATAGRAM = 4
_FD_SIZE = array.array("i").itemsize
ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_DATAGRAM * _FD_SIZE)


class ZdsSocketError(ZdsError):
    """The ZDS socket path cannot be used (wrong type, permissions, in use)."""


async def recv_datagram(sock: trio.socket.SocketType) -> tuple[bytes, list[int], int]:
    """Receive one datagram: (payload, fds, recvmsg flags). b"" means end of stream."""
    data, ancdata, flags, _addr = await sock.recvmsg(MAX_DATAGRAM, ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds_arr = array.array("i")
            fds_arr.frombytes(payload[: len(payload) - (len(payload) % _FD_SIZE)])
            fds.extend(fds_arr)
    return data, fds, flags


async def send_datagram(sock: trio.socket.SocketType, datagram: Datagram) -> None:
    """Send one datagram with its fds attached (SCM_RIGHTS duplicates them for the receiver)."""
    data, fds = datagram
    ancillary = []
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
    await sock.sendmsg([data], ancillary)


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def bind_server_socket(path: str | os.PathLike[str], *, mode: int = 0o600) -> trio.socket.SocketType:
    """Create the listening SEQPACKET socket at `path`, removing a stale socket file first.

    The file is created with `mode` (umask during bind, so it is never briefly world-accessible).
    Refuses to remove anything that is not a socket, with a message saying what is there, and a socket
    that a live process still serves (another node agent on the same path).
    """
    target = Path(path)
    try:
        st = target.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a socket"
            raise ZdsSocketError(f"{target} exists and is {what}; remove it or choose another socket path")
        if socket_in_use(target, socket.SOCK_SEQPACKET):
            raise ZdsSocketError(in_use_message(target))
        target.unlink()
    if not target.parent.is_dir():  # the owner makes it (shared.rundir.make_parents); never silently here
        raise ZdsSocketError(f"{target.parent} does not exist; create it or choose another socket path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(os.fspath(target))
    except OSError as exc:
        sock.close()
        raise ZdsSocketError(f"cannot bind ZDS socket {target}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(target, mode)
    sock.listen(16)
    return trio.socket.from_stdlib_socket(sock)


async def connect(path: str | os.PathLike[str]) -> trio.socket.SocketType:
    """Connect a SEQPACKET client socket to `path`. Raises OSError as connect(2) does."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        await sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    return sock


def describe_connect_error(path: str | os.PathLike[str], exc: OSError) -> str:
    hints = {
        errno.ENOENT: "is the node agent running and is INPOD_UDS the path it serves?",
        errno.ECONNREFUSED: "the socket file exists but nobody listens: the node agent is down",
        errno.EPROTOTYPE: "the path is not a SOCK_SEQPACKET socket (wrong kind of socket)",
        errno.EACCES: "permission denied: ztunnel must run as the node agent's allowed uid",
    }
    hint = hints.get(exc.errno or 0, "")
    return f"failed to connect to the Istio CNI node agent over {path}: {exc.strerror}" + (
        f" ({hint})" if hint else ""
    )


__all__ = [
    "ANCILLARY_SIZE",
    "ZdsSocketError",
    "bind_server_socket",
    "close_fds",
    "connect",
    "describe_connect_error",
    "peer_credentials",
    "recv_datagram",
    "send_datagram",
]
