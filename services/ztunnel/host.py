"""What ztunnel needs of its host, apart from the proxy: the start-up self checks, the open-files limit, and
handing freed heap pages back to the kernel.

    use_libc_malloc()              first of all: re-execute with PYTHONMALLOC=malloc unless it is set
    verify_syscalls(mark)          at start: setns and SO_MARK work here (else ztunnel cannot run at all)
    trim_malloc_periodically()     for the process's life: `malloc_trim(0)` every MALLOC_TRIM_INTERVAL s

Why PYTHONMALLOC=malloc: CPython's small-object allocator returns a 1 MiB arena to the system only once
every object in it is freed, so after a load peak a few long-lived objects keep almost all of it resident
(benchmarks/conn_peak.py, 9,500 tunnels, both ends: 259 MiB left once everything closed, from 62). With
every object from glibc's malloc, `malloc_trim(0)` hands the free pages back (80 MiB), at no measured
cost per request (benchmarks/hbone_rr.py: 182-188 vs 191-204 us). docs/limits.md has the figures.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Final

import trio

from services.ztunnel.errors import StartupCheckError
from services.ztunnel.inpod.sockets import SO_MARK
from shared.netns import NetnsError, current_netns_fd, entered

MALLOC_TRIM_INTERVAL: Final = 5.0  # seconds


def libc_malloc_argv(environ: Mapping[str, str], orig_argv: Sequence[str]) -> list[str] | None:
    """The command line to execute again with PYTHONMALLOC=malloc, or None: the operator chose an allocator
    already (any PYTHONMALLOC value, `pymalloc` included, is kept), or the command line is unknown."""
    if "PYTHONMALLOC" in environ or not orig_argv:
        return None
    return list(orig_argv)


def use_libc_malloc() -> None:
    """Execute this same command again (same pid) with PYTHONMALLOC=malloc, unless PYTHONMALLOC is set."""
    argv = libc_malloc_argv(os.environ, sys.orig_argv)
    if argv is None:
        return
    os.environ["PYTHONMALLOC"] = "malloc"
    try:
        os.execv(sys.executable, argv)
    except OSError as exc:  # go on with the default allocator; nothing else depends on it
        os.environ.pop("PYTHONMALLOC", None)
        print(f"ztunnel: cannot re-execute with PYTHONMALLOC=malloc ({exc.strerror}); going on without it",
              file=sys.stderr)


def libc_malloc_trim() -> Callable[[], object] | None:
    """glibc's `malloc_trim(0)`, or None where the C library has none (musl)."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return partial(trim, 0)


async def trim_malloc_periodically(interval: float = MALLOC_TRIM_INTERVAL) -> None:
    """Hand free heap pages back to the kernel every `interval` seconds, for as long as it runs.

    Traffic frees large blocks (TLS records, HTTP/2 frames up to 1 MiB); glibc then raises its trim threshold
    and keeps the freed pages, so a ztunnel that has carried traffic stayed ~4 MiB larger than one that has
    not. `malloc_trim(0)` returns them (measured: 100-300 us per call; no threads, so one arena).
    """
    trim = libc_malloc_trim()
    if trim is None:
        return
    while True:
        await trio.sleep(interval)
        trim()


def verify_syscalls(mark: int) -> None:
    """Upstream's start-up self check: setns into our own netns works, and SO_MARK is settable.

    Raises:
        StartupCheckError: with what is missing (usually: not running as root).
    """
    hint = "" if os.geteuid() == 0 else " ztunnel must run as root (CAP_NET_ADMIN and CAP_SYS_ADMIN)."
    try:
        fd = current_netns_fd()
        try:
            with entered(fd):
                pass
        finally:
            os.close(fd)
    except (NetnsError, OSError) as exc:
        raise StartupCheckError(f"cannot switch network namespaces: {exc}.{hint}") from exc
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except OSError as exc:
        raise StartupCheckError(f"cannot set SO_MARK={mark} on a socket: {exc.strerror}.{hint}") from exc
