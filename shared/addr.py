"""Addresses as text, the same way in every process: IPs (v4 and v6) and host:port.

    canonical_ip("fd00:0::1") == "fd00::1"         canonical_ip(b"\\n\\x00\\x00\\x01") == "10.0.0.1"
    unmapped_ip("::ffff:10.0.0.1") == "10.0.0.1"  (what a dual-stack socket reports for an IPv4 peer)
    format_host_port("fd00::1", 80) == "[fd00::1]:80"
    split_host_port("[::]:15020") == ("::", 15020)  split_host_port(":15020", default_host="0.0.0.0")
    parse_ip_port("[fd00::1]:80") == ("fd00::1", 80)   (an IP literal and a port, or None)

Canonical text is `ipaddress`'s compressed form; stores and look-ups key on it, so an address learnt from
xDS bytes, a world file or a socket compares equal.
"""

from __future__ import annotations

import functools
import ipaddress
import socket

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Addr = tuple[str, int]
"""(host, port): host an IP in canonical text (no brackets) or a name."""


class AddressError(ValueError):
    """Text that is not the address it should be; the message quotes it and shows the expected form.

    `problem` is the message without the quoted text, for callers that name the setting themselves."""

    def __init__(self, text: str, problem: str) -> None:
        super().__init__(f"{text!r} {problem}")
        self.problem = problem


@functools.lru_cache(maxsize=4096)  # looked up per connection; addresses repeat
def canonical_ip(value: str | bytes) -> str:
    """The compressed text of an IP given as text or as 4/16 packed bytes.

    Raises:
        ValueError: not an IPv4 or IPv6 address.
    """
    return ipaddress.ip_address(value).compressed


@functools.lru_cache(maxsize=4096)
def unmapped_ip(value: str) -> str:
    """Like `canonical_ip`, with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) written as the IPv4 one."""
    return ip_address(value).compressed


def ip_address(value: str | bytes) -> IpAddress:
    """The address, IPv4-mapped IPv6 ones as IPv4. Raises ValueError for anything else."""
    addr = ipaddress.ip_address(value)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def unmap(host: str) -> str:
    """`::ffff:10.0.0.1` -> `10.0.0.1` on already-canonical socket text; anything else as it is (cheap)."""
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:") :]
    return host


@functools.lru_cache(maxsize=1024)
def ip_family(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal, AF_INET for an IPv4 one. Raises ValueError for a name."""
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def format_host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 host bracketed: `[fd00::1]:8080`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(text: str, *, default_host: str | None = None) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (the host then `default_host`) -> (host without brackets, port).

    Raises:
        AddressError: no port, a port outside 0-65535, or an empty host and no default.
    """
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        sep = ""  # an IPv6 host must be bracketed
    if sep and port.isdigit() and int(port) > 65535:
        problem = f"is not host:port: port {int(port)} is out of range; use a port from 0 to 65535"
        raise AddressError(text, problem)
    if not sep or not port.isdigit() or (not host and default_host is None):
        raise AddressError(text, "is not host:port (e.g. 127.0.0.1:15000 or [::]:15020)")
    return host or (default_host or ""), int(port)


@functools.lru_cache(maxsize=1024)
def parse_ip_port(text: str) -> Addr | None:
    """`ip:port` (IPv6 bracketed, port 1-65535) -> (canonical ip, port); None when it is not exactly an IP
    literal and a port (a name, a missing or bad port, an unbracketed IPv6)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            return None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            return None
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if text.startswith("[") and ip.version != 6:
        return None
    return ip.compressed, int(port)
