"""Directories a server makes for its own sockets, and takes away again when it made them.

    made = make_parents("/var/run/ztunnel/ztunnel.sock")   # [] when /var/run/ztunnel already exists
    ...serve...
    remove_made(made)                                     # only the ones made above, and only when empty

A process creates the parent directories of a socket only when it is the one serving it (the owner);
clients never create directories, they wait for the server. What was made is logged, so nothing appears
on the host silently, and removed at exit, so nothing is left behind. The same for the socket file itself:

    own = bound_socket_file(path)                        # right after bind
    ...serve...
    remove_own_socket(path, own)                         # only if it is still the file bound above (inode)

Before replacing a socket file left at the path, a server asks `socket_in_use(path, kind)`: a socket that
accepts a connection belongs to a live process (a second agent started on the same paths), and the new
server refuses to start rather than take the path over; a socket that refuses is stale and is replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger("shared.rundir")


def make_parents(path: str | os.PathLike[str], *, mode: int = 0o755) -> list[Path]:
    """Create the missing parent directories of `path`; return those created, outermost first.

    Raises:
        OSError: a parent cannot be created (its message names the directory).
    """
    missing: list[Path] = []
    parent = Path(path).absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    made: list[Path] = []
    try:
        for directory in reversed(missing):
            directory.mkdir(mode=mode)
            made.append(directory)
    except OSError as exc:
        remove_made(made)
        raise OSError(exc.errno, f"cannot create {exc.filename or directory}: {exc.strerror}") from None
    if made:
        log.info("created the socket directory; removed again at exit",
                 extra={"fields": [("directory", str(made[0])), ("socket", str(path))]})
    return made


def remove_made(made: list[Path]) -> None:
    """Remove the directories `make_parents` created, innermost first, each only if it is empty now."""
    for directory in reversed(made):
        with contextlib.suppress(OSError):
            directory.rmdir()


SocketFile = tuple[int, int]
"""A socket file as its creator saw it right after bind: (st_dev, st_ino)."""


def bound_socket_file(path: str | os.PathLike[str]) -> SocketFile | None:
    """The identity of the socket file this process has just bound at `path` (None: nothing there)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def remove_own_socket(path: str | os.PathLike[str], own: SocketFile | None) -> None:
    """Unlink `path` at exit only if it is still the socket file this process bound (`bound_socket_file`):
    never a file that was there before (refused), nor the socket of a process that took the path over."""
    if own is None:
        return
    try:
        st = os.lstat(path)
    except OSError:
        return
    if (st.st_dev, st.st_ino) != own:
        log.info("leaving the socket file in place: it is no longer ours",
                 extra={"fields": [("path", str(path))]})
        return
    with contextlib.suppress(OSError):
        os.unlink(path)


def socket_in_use(path: str | os.PathLike[str], kind: int = socket.SOCK_STREAM) -> bool:
    """Whether a live process accepts connections on the Unix socket at `path` (`kind`: SOCK_STREAM or
    SOCK_SEQPACKET). False for a stale socket file (connection refused) or nothing there."""
    probe = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except TimeoutError:
        return True  # its backlog is full: somebody is listening
    except OSError:
        return False
    finally:
        probe.close()
    return True


def in_use_message(path: str | os.PathLike[str]) -> str:
    """The one-line refusal when `socket_in_use(path)`."""
    return (f"another live process is serving {os.fspath(path)}; stop it first or choose another "
            "socket path")
