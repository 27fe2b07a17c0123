"""Capture of ztunnel's `access` logger in upstream's plain format, shared by the service and netns tests."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from shared.logs import ParsedLine, UpstreamFormatter, parse_plain


class LogCapture(logging.Handler):
    """Formatted access lines; `wait_for` fails after `deadline` seconds (default: the test's own bound)."""

    def __init__(self, *, deadline: float = math.inf) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(UpstreamFormatter())
        self.deadline = deadline
        self.lines: list[str] = []
        self.changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        self.changed.set()
        self.changed = trio.Event()

    def parsed(self, message: str) -> list[ParsedLine]:
        return [p for p in map(parse_plain, self.lines) if p.target == "access" and p.message == message]

    async def wait_for(self, message: str, count: int = 1) -> list[ParsedLine]:
        with trio.fail_after(self.deadline):
            while len(found := self.parsed(message)) < count:
                await self.changed.wait()
        return found


@contextmanager
def capture_access_log(*, deadline: float = math.inf) -> Iterator[LogCapture]:
    """The `access` logger's lines (debug and up) while the block runs; the logger's level is restored."""
    capture = LogCapture(deadline=deadline)
    logger = logging.getLogger("access")
    logger.addHandler(capture)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old)
