"""ztunnel's log lines read back (`parse_plain`, the inverse of `format_plain`) and a capture of its `access`
logger, shared by the unit, service and netns tests."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec
import trio

from shared.logs import UpstreamFormatter


class ParsedLine(msgspec.Struct, frozen=True, kw_only=True):
    timestamp: str
    level: str
    target: str
    message: str
    fields: dict[str, str | int]


def _parse_fields(text: str) -> dict[str, str | int]:
    fields: dict[str, str | int] = {}
    i = 0
    n = len(text)
    while i < n:
        while i < n and text[i] == " ":
            i += 1
        if i >= n:
            break
        eq = text.index("=", i)
        key = text[i:eq]
        i = eq + 1
        if i < n and text[i] == '"':
            i += 1
            buf = []
            while text[i] != '"':
                if text[i] == "\\":
                    nxt = text[i + 1]
                    if nxt == "u":
                        end = text.index("}", i)
                        buf.append(chr(int(text[i + 3:end], 16)))
                        i = end + 1
                        continue
                    buf.append({"n": "\n", "r": "\r", "t": "\t", "0": "\0"}.get(nxt, nxt))
                    i += 2
                    continue
                buf.append(text[i])
                i += 1
            i += 1
            fields[key] = "".join(buf)
        else:
            end = text.find(" ", i)
            end = n if end < 0 else end
            raw = text[i:end]
            fields[key] = int(raw) if raw.isdigit() else raw
            i = end
    return fields


def parse_plain(line: str) -> ParsedLine:
    """Parse one plain-format line back (inverse of `format_plain`); quoted values come back unescaped."""
    parts = line.rstrip("\n").split("\t", 4)
    if len(parts) < 4:
        raise ValueError(f"not an upstream-format log line: {line!r}")
    fields = _parse_fields(parts[4]) if len(parts) == 5 else {}
    return ParsedLine(timestamp=parts[0], level=parts[1], target=parts[2], message=parts[3], fields=fields)


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
