"""Network namespaces: open a handle, tell what it is, run a synchronous block inside one.

Theory of operation
-------------------
Linux network namespaces are per *thread*: `setns(fd, CLONE_NEWNET)` switches only the calling thread, and a
socket keeps the namespace it was created in for its whole life. So everything that must happen "inside a pod"
(binding ztunnel's listeners, opening an upstream socket, running iptables-restore's netlink calls) is done by
`entered(fd)`: switch the current thread in, run a short synchronous block that creates sockets, switch back.
There is no await inside the block, so on the Trio thread no other task can run while it is switched; in a
worker thread (`trio.to_thread.run_sync`) the same helper keeps the switch local to that thread.

This is the only place that calls setns. pyroute2's pushns/popns keep a process-global stack and are not used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NewType

from shared.errors import AmbientError

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
NETNS_RUN_DIR = Path("/run/netns")

NetnsId = NewType("NetnsId", tuple[int, int])
"""Identity of a network namespace: (st_ino, st_dev) of its nsfs inode, as upstream compares them."""

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetnsError(AmbientError):
    """A namespace could not be opened, identified or entered; the message says which and why."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        hint = " (needs CAP_SYS_ADMIN: run as root)" if err == errno.EPERM else ""
        raise NetnsError(f"setns(fd={fd}, CLONE_NEWNET) failed: {os.strerror(err)}{hint}")


def is_netns(fd: int) -> bool:
    """True when `fd` is a handle to a network namespace (ioctl NS_GET_NSTYPE, fallback: the proc link)."""
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        pass
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("net:[")
    except OSError:
        return False


def netns_id(fd: int) -> NetnsId:
    """The (st_ino, st_dev) identity of the namespace behind `fd`."""
    st = os.fstat(fd)
    return NetnsId((st.st_ino, st.st_dev))


def netns_path(name_or_path: str) -> Path:
    """`/run/netns/NAME` for a bare name (as `ip netns add` makes), else the path itself."""
    if "/" in name_or_path:
        return Path(name_or_path)
    return NETNS_RUN_DIR / name_or_path


def open_netns(name_or_path: str | os.PathLike[str]) -> int:
    """Open a network namespace handle (O_RDONLY|O_CLOEXEC) and check it is one.

    Args:
        name_or_path: a name under /run/netns, a bind-mount path, or /proc/PID/ns/net.
    Returns:
        the file descriptor; the caller owns it and closes it.
    Raises:
        NetnsError: the path does not exist, cannot be opened, or is not a network namespace.
    """
    path = netns_path(os.fspath(name_or_path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise NetnsError(f"cannot open network namespace {path}: {exc.strerror}") from None
    if not is_netns(fd):
        kind = "a directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "not a network namespace"
        os.close(fd)
        raise NetnsError(f"{path} is {kind}; expected a network namespace handle (e.g. /run/netns/NAME)")
    return fd


def current_netns_fd() -> int:
    """A new handle to the calling thread's own network namespace."""
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


class _Home(threading.local):
    """Per thread: a handle to the namespace the thread runs in outside `entered()` (opened on first use,
    kept for the thread's life), and how deep it is inside `entered()` blocks."""

    fd: int = -1
    depth: int = 0


_home = _Home()


@contextmanager
def entered(fd: int) -> Iterator[None]:
    """Run the block with the calling thread switched into the namespace `fd`, then switch back.

    Keep the block synchronous and short (create and bind sockets, run a subprocess): never await inside
    it on the Trio thread. Switching back "must never fail"; if it does the thread is in an unknown
    namespace and we abort rather than let later sockets land in a pod.

    The outermost block of a thread returns to the thread's own namespace through a handle kept per thread
    (nothing in the project moves a thread for good, and only this function switches namespaces), which
    saves an open and a close of /proc/thread-self/ns/net per new connection into a pod; a nested block
    returns to the namespace it was entered from through a handle of its own.
    """
    nested = _home.depth > 0
    if nested:
        home = current_netns_fd()
    else:
        if _home.fd < 0:
            _home.fd = current_netns_fd()
        home = _home.fd
    _home.depth += 1
    try:
        _setns(fd)
        try:
            yield
        finally:
            try:
                _setns(home)
            except NetnsError as exc:  # pragma: no cover - would need a vanished own-netns
                os.write(2, f"fatal: cannot return to own network namespace: {exc}\n".encode())
                os.abort()
    finally:
        _home.depth -= 1
        if nested:
            os.close(home)
