"""Settings from environment variables, read one way in every process, with errors an operator can act on.

    env = EnvSettings(os.environ, error=ConfigError)     # the service's own error type
    ipv6 = env.flag("IPV6_ENABLED", True)                 # 1/true/yes/on, 0/false/no/off; unset or "": True
    deadline = env.duration("CONNECT_TIMEOUT", 10.0)      # 5s, 500ms, 1m or bare seconds
    host, port = env.host_port("ADMIN_ADDR", ("127.0.0.1", 15000))
    check_listen("ADMIN_ADDR", host, port, error=ConfigError)  # in use? refused before anything starts

Every error names the variable, quotes its value and shows what would be accepted:
`IPV6_ENABLED='maybe' is not a boolean; use true or false`.
"""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Callable, Mapping
from typing import TypeVar

from shared.addr import AddressError, format_host_port, split_host_port
from shared.errors import AmbientError

T = TypeVar("T")

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")


class SettingError(AmbientError, ValueError):
    """A setting's value is malformed (the default error type of EnvSettings)."""


def parse_bool(name: str, raw: str, *, error: Callable[[str], Exception] = SettingError) -> bool:
    """1/true/yes/on or 0/false/no/off, any case."""
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise error(f"{name}={raw!r} is not a boolean; use true or false")


def parse_duration(name: str, raw: str, *, error: Callable[[str], Exception] = SettingError) -> float:
    """`5s`, `500ms`, `1m` or a bare number of seconds -> seconds."""
    match = _DURATION.match(raw.strip())
    if not match:
        raise error(f"{name}={raw!r} is not a duration (examples: 5s, 500ms, 1m)")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value / 1000 if unit == "ms" else value * 60 if unit == "m" else value


def parse_host_port(
    name: str, raw: str, *, default_host: str | None = None, error: Callable[[str], Exception] = SettingError
) -> tuple[str | None, int]:
    """`host:port`, `[v6]:port` or `:port` (host `default_host`, None when that is None)."""
    try:
        host, port = split_host_port(raw, default_host="")
    except AddressError as exc:
        raise error(f"{name}={raw!r} {exc.problem}") from None
    return host or default_host, port


def check_listen(
    name: str, host: str | None, port: int, *, error: Callable[[str], Exception] = SettingError
) -> None:
    """Bind (host, port) once and let go, so a listen address that cannot work is refused before anything
    starts, naming the setting: in use, not an address of this host, a privileged port, an unknown name.
    `host` None means every wildcard address (v4 and v6), as the listeners bind it."""
    value = format_host_port(host or "", port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        problem = f"cannot resolve {host!r} ({exc.strerror}); use an IP address"
        raise error(f"{name}={value!r}: {problem}") from None
    for family, kind, proto, _name, sockaddr in infos:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this host lacks (no IPv6): the listeners skip it too
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listeners: TIME_WAIT is fine
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise error(f"{name}={value!r}: {_bind_problem(exc, port)}") from None


def _bind_problem(exc: OSError, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"the address is already in use; stop what listens on port {port} or choose another port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "not an address of this host; use one of its addresses (or 0.0.0.0 / [::] for all)"
    if exc.errno == errno.EACCES:
        return f"port {port} needs privileges; run as root or choose a port above 1023"
    return f"cannot listen there ({exc.strerror}); choose another address"


class EnvSettings:
    """Typed reads of one environment; a malformed value raises `error(message)`."""

    def __init__(self, env: Mapping[str, str], *, error: Callable[[str], Exception] = SettingError) -> None:
        self.env = env
        self.error = error

    def _raw(self, name: str) -> str | None:
        raw = self.env.get(name)
        return None if raw is None or not raw.strip() else raw

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        return default if raw is None else parse_bool(name, raw, error=self.error)

    def optional_flag(self, name: str) -> bool | None:
        """A boolean, or None when unset (the process then decides from what it finds)."""
        raw = self._raw(name)
        return None if raw is None else parse_bool(name, raw, error=self.error)

    def integer(self, name: str, default: int) -> int:
        return self._convert(name, default, int, "a whole number")

    def number(self, name: str, default: float) -> float:
        return self._convert(name, default, float, "a number")

    def _convert(self, name: str, default: T, convert: Callable[[str], T], what: str) -> T:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            return convert(raw.strip())
        except ValueError:
            raise self.error(f"{name}={raw!r} is not {what}") from None

    def duration(self, name: str, default: float) -> float:
        raw = self._raw(name)
        return default if raw is None else parse_duration(name, raw, error=self.error)

    def host_port(self, name: str, default: tuple[str | None, int]) -> tuple[str | None, int]:
        """`host:port`; `:port` keeps the default's host."""
        raw = self._raw(name)
        if raw is None:
            return default
        return parse_host_port(name, raw, default_host=default[0], error=self.error)
