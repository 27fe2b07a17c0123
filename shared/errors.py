"""Errors shared by every service: a base class whose message is written for an operator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable


class AmbientError(Exception):
    """Base for errors an operator can act on; str(exc) is the whole message, hint included."""


def start_failure(exc: BaseException) -> OSError | AmbientError | None:
    """The one error a process can report in a line when it fails to start: `exc` itself, or the first of
    the (possibly nested) exception group Trio wraps it in, when every error in it is an OSError (a bind or
    a path that failed) or an AmbientError (written for an operator). None for anything else: a bug keeps
    its traceback."""
    if isinstance(exc, OSError | AmbientError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [start_failure(inner) for inner in exc.exceptions]
        if found and all(f is not None for f in found):
            return found[0]
    return None


def run_process(prefix: str, async_fn: Callable[..., Awaitable[object]], *args: object) -> int:
    """`trio.run(async_fn, *args)` for a process's main: 0 when it returns; 1 with one line
    `PREFIX: cannot start: ...` on stderr when it fails in a way an operator can act on (`start_failure`: an
    address taken after the start-up check, a socket path); anything else keeps its traceback."""
    import sys

    import trio

    try:
        trio.run(async_fn, *args)
    except (OSError, AmbientError, BaseExceptionGroup) as exc:
        failure = start_failure(exc)
        if failure is None:
            raise
        print(f"{prefix}: cannot start: {failure}", file=sys.stderr)
        return 1
    return 0
