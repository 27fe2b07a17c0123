"""The one logging dialect of every process: upstream ztunnel's tracing lines, with structured fields.

Theory of operation
-------------------
Logging goes through the standard `logging` module so that levels can change at run time (ztunnel's
`/logging?level=`); `UpstreamFormatter` renders a record the way ztunnel's tracing subscriber does:

    <RFC3339 UTC µs>\\t<level>\\t<target>\\t<message>\\t<k=v k=v ...>

A message is a short constant phrase; what varies travels as structured fields in `record.fields`, a
sequence of `(key, value)` pairs in order, given as `log.info("pod enrolled", extra={"fields": [("uid",
uid)]})`. A `str` value is written Debug-quoted like Rust's `{:?}`, an `int` or a `Display` value bare
(Rust's `%value`), `None` is left out. A logger `a.b.c` is written as target `a::b::c` the way Rust module
paths look (ztunnel's access log's logger is `access`). `LOG_FORMAT=json` switches to one JSON object per
line (`setup_logging(json_format=True)`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

_LEVEL_NAMES: Final = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

LEVELS: Final = {"trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
                 "error": logging.ERROR, "off": logging.CRITICAL + 10}
_LEVEL_ALIASES: Final = {"warning": "warn"}  # Python's name, which the node agent's --log-level takes


class Display(str):
    """A value written bare, like Rust's `%value` (addresses, enum-like words)."""

    __slots__ = ()


Field = tuple[str, object]


_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}


def debug_quote(value: str) -> str:
    """Rust's `{:?}` for a string: double quotes, with `"`, `\\` and control characters escaped."""
    if value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'  # the common case (names, identities), without the per-character loop
    out = ['"']
    for ch in value:
        escaped = _ESCAPES.get(ch)
        if escaped is not None:
            out.append(escaped)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _render_value(value: object) -> str:
    if isinstance(value, Display):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return debug_quote(value)
    return str(value)


class _Second:
    """The date-and-time part of the last second formatted (a log line's timestamp changes only in its
    microseconds within a second: formatting the whole datetime was a fifth of an access log line)."""

    whole = -1.0
    text = ""


_second = _Second()


def format_timestamp(epoch: float) -> str:
    """RFC3339 in UTC with microseconds and a `Z`, as upstream prints it."""
    # The split and the rounding are datetime.fromtimestamp's: microseconds rounded half to even, a
    # rounded-up 1,000,000 carried into the second.
    frac, whole = math.modf(epoch)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        whole += 1.0
        micros -= 1_000_000
    elif micros < 0:  # before 1970
        whole -= 1.0
        micros += 1_000_000
    if whole != _second.whole:
        _second.text = dt.datetime.fromtimestamp(whole, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second.whole = whole
    return f"{_second.text}.{micros:06d}Z"


_RENDERED_MAX: Final = 2048
_rendered: dict[tuple[str, str], str] = {}
"""`key="value"` of plain-string fields already written: names, namespaces, identities and clusters repeat in
every access log line (addresses, with their ports, are Display values and are not kept)."""


def _render_field(key: str, value: object) -> str:
    if type(value) is str:
        try:
            return _rendered[(key, value)]
        except KeyError:
            if len(_rendered) >= _RENDERED_MAX:
                _rendered.clear()
            text = _rendered[(key, value)] = f"{key}={debug_quote(value)}"
            return text
    return f"{key}={_render_value(value)}"


def format_plain(*, epoch: float, level: str, target: str, message: str, fields: Iterable[Field] = ()) -> str:
    """One log line in upstream's plain format (without the newline)."""
    parts = [_render_field(key, value) for key, value in fields if value is not None]
    line = f"{format_timestamp(epoch)}\t{level}\t{target}\t{message}"
    return f"{line}\t{' '.join(parts)}" if parts else line


def format_json(*, epoch: float, level: str, target: str, message: str, fields: Iterable[Field] = ()) -> str:
    """One log line as a JSON object: level, time, scope, message, then the fields in order."""
    obj: dict[str, Any] = {"level": level, "time": format_timestamp(epoch), "scope": target,
                           "message": message}
    for key, value in fields:
        if value is None:
            continue
        obj[key] = str(value) if isinstance(value, Display) else value
    return json.dumps(obj, separators=(",", ":"))


def target_of(logger_name: str) -> str:
    return logger_name.replace(".", "::")


class UpstreamFormatter(logging.Formatter):
    """Formats every record like ztunnel; structured fields come from `extra={"fields": [...]}`."""

    def __init__(self, *, json_format: bool = False) -> None:
        super().__init__()
        self.json_format = json_format

    def format(self, record: logging.LogRecord) -> str:
        fields: list[Field] = list(getattr(record, "fields", ()))
        message = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            fields.append(("error", self.formatException(record.exc_info).splitlines()[-1]))
        render = format_json if self.json_format else format_plain
        level = _LEVEL_NAMES.get(record.levelno, "trace" if record.levelno <= TRACE else "info")
        return render(epoch=record.created, level=level, target=target_of(record.name), message=message,
                      fields=fields)


def write_line(logger: logging.Logger, levelno: int, message: str, fields: Sequence[Field]) -> bool:
    """Write one structured line the way `logger.log(levelno, message, extra={"fields": fields})` would, when
    that would reach exactly one plain `StreamHandler` with our plain formatter and no filter on the way
    (ztunnel's access log as set up by `setup_logging`). Returns False, having written nothing, in any other
    case (JSON, several or other handlers, filters, a level that is off): the caller then logs normally.

    The line is the same; what is skipped is the `LogRecord` and the handler dispatch, about a third of an
    access log line's cost. Used for the per-connection lines only.
    """
    if not logger.isEnabledFor(levelno) or logger.filters:
        return False
    handler: logging.Handler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for found in current.handlers:
            if handler is not None:
                return False
            handler = found
        if not current.propagate:
            break
        current = current.parent
    if (type(handler) is not logging.StreamHandler or handler.filters or levelno < handler.level
            or type(handler.formatter) is not UpstreamFormatter or handler.formatter.json_format):
        return False
    line = format_plain(epoch=time.time(), level=_LEVEL_NAMES.get(levelno, "info"),
                        target=target_of(logger.name), message=message, fields=fields)
    handler.acquire()
    try:
        handler.stream.write(line + handler.terminator)
        handler.flush()
    except Exception:  # the stream failed: logging's own path reports it (handleError)
        return False
    finally:
        handler.release()
    return True


def setup_logging(*, json_format: bool, level: str = "info", stream: Any = None) -> logging.Handler:
    """Install the upstream formatter on the root logger (stderr by default). Returns the handler."""
    # Our format uses none of the caller, thread or process fields: not collecting them saves a fifth of an
    # access log line's cost (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(UpstreamFormatter(json_format=json_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    name = level.lower()
    root.setLevel(LEVELS.get(_LEVEL_ALIASES.get(name, name), logging.INFO))
    return handler


def set_log_level(spec: str) -> str:
    """Apply `/logging?level=` syntax: `info`, or `target=level,target=level` (targets with `::`).

    Returns:
        a one-line description of the resulting levels.
    Raises:
        ValueError: an unknown level name.
    """
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        target, _, name = item.rpartition("=")
        if name.lower() not in LEVELS:
            raise ValueError(f"unknown log level {name!r} (expected one of {', '.join(LEVELS)})")
        logger = logging.getLogger(target.replace("::", ".")) if target else logging.getLogger()
        logger.setLevel(LEVELS[name.lower()])
    return current_log_levels()


def current_log_levels() -> str:
    names = {v: k for k, v in LEVELS.items()}
    root = logging.getLogger()
    parts = [names.get(root.level, str(root.level))]
    for name, logger in sorted(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            parts.append(f"{target_of(name)}={names.get(logger.level, str(logger.level))}")
    return ",".join(parts)


# --- parsing back (tests, tools) -----------------------------------------------------------------------


LOG_FORMATS: Final = ("plain", "json")
LOG_FORMAT_HELP: Final = ("environment: LOG_FORMAT=plain (upstream's tab-separated log lines, the default) "
                          "or json (one object a line)")


def log_format_from(env: Mapping[str, str]) -> str:
    """`LOG_FORMAT` (plain or json, any case; default plain).

    Raises:
        ValueError: another value (the message names the variable).
    """
    value = env.get("LOG_FORMAT", "plain").strip().lower() or "plain"
    if value not in LOG_FORMATS:
        raise ValueError(f"LOG_FORMAT={value!r} must be plain or json")
    return value
