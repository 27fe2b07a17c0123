"""Sockets that live in a pod's network namespace: the listener set and upstream connections.

Theory of operation
-------------------
A socket belongs to the namespace of the thread that created it, for its whole life. So every in-pod socket
is *created* inside `shared.netns.entered(fd)` (setns on the calling Trio thread, a few syscalls, setns back:
about 6 us, no await inside) and then used from the Trio thread like any other socket. Binding happens in the
same block, so "all bound" means exactly that the pod's set is complete before anything is served.

Options follow upstream's in-pod socket factory: SO_MARK = PACKET_MARK (1337) on every socket so
ztunnel's own traffic is not captured again, SO_REUSEPORT on listeners (a new ztunnel can bind while the old
one drains), IP_TRANSPARENT best effort on listeners, backlog 128. `InPodSocketFactory` is what the proxies
get as their `SocketFactory` (proxy/context.py): these two functions and netfilter's original destination.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from services.ztunnel.errors import ProxyStartError
from services.ztunnel.net import (
    DNS_PROXY_PORT,
    INBOUND_HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT,
    PACKET_MARK,
    original_dst,
    set_keepalive,
)
from services.ztunnel.proxy.context import ProxyConfig
from shared.addr import Addr
from shared.netns import NetnsError, entered, is_netns

LISTEN_BACKLOG: Final = 128

# Linux constants not (all) exported by Python 3.11's socket module.
SO_MARK: Final = 36
SO_REUSEPORT: Final = 15
SOL_IP: Final = 0
SOL_IPV6: Final = 41
IP_TRANSPARENT: Final = 19
IP_FREEBIND: Final = 15
IPV6_TRANSPARENT: Final = 75
IPV6_FREEBIND: Final = 78
IPV6_V6ONLY: Final = 26

_SOCK_FLAGS: Final = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


@dataclass(frozen=True, slots=True)
class PodListener:
    """One bound, listening, non-blocking socket of a pod and what it is for."""

    role: str  # "outbound" | "inbound_plaintext" | "inbound_hbone" | "dns_tcp" | "dns_udp"
    port: int
    sock: socket.socket


@dataclass(frozen=True, slots=True)
class PodListeners:
    listeners: tuple[PodListener, ...]
    ipv6: bool
    transparent: bool

    def __iter__(self) -> Iterator[PodListener]:
        return iter(self.listeners)

    def close(self) -> None:
        for listener in self.listeners:
            listener.sock.close()


PORTS: Final = (("outbound", OUTBOUND_PORT), ("inbound_plaintext", INBOUND_PLAINTEXT_PORT),
                ("inbound_hbone", INBOUND_HBONE_PORT))


def _listener(family: socket.AddressFamily, port: int, *, mark: int,
              transparent: bool) -> tuple[socket.socket, bool]:
    sock = socket.socket(family, _SOCK_FLAGS)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, IPV6_V6ONLY, 0)
        is_transparent = False
        if transparent:
            try:  # upstream sets only the IPv4 option, also on the dual-stack socket
                sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
                is_transparent = True
            except OSError:
                pass
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock, is_transparent


def _dns_sockets(ipv6: bool, mark: int) -> list[PodListener]:
    """The DNS proxy's sockets: TCP (listening) and UDP on 127.0.0.1:15053, and on [::1] when the pod's
    loopback has IPv6 (upstream binds both loopbacks, nothing else)."""
    made: list[PodListener] = []
    hosts = [(socket.AF_INET, "127.0.0.1")] + ([(socket.AF_INET6, "::1")] if ipv6 else [])
    try:
        for family, host in hosts:
            for role, kind in (("dns_tcp", socket.SOCK_STREAM), ("dns_udp", socket.SOCK_DGRAM)):
                sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
                made.append(PodListener(role=role, port=DNS_PROXY_PORT, sock=sock))
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
                sock.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(SOL_IPV6, IPV6_V6ONLY, 1)
                try:
                    sock.bind((host, DNS_PROXY_PORT))
                except OSError as exc:
                    if family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                        made.pop().sock.close()  # no IPv6 on the pod's loopback: v4 only
                        break
                    raise
                if kind == socket.SOCK_STREAM:
                    sock.listen(LISTEN_BACKLOG)
    except BaseException:
        for listener in made:
            listener.sock.close()
        raise
    return made


def _describe_fd(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        return exc.strerror or "unreadable"


def _bind_hint(exc: OSError, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is already in use inside the pod (an app listening on ztunnel's port?)"
    if exc.errno in (errno.EPERM, errno.EACCES):
        return "not permitted: ztunnel needs CAP_NET_ADMIN (SO_MARK) and CAP_NET_BIND_SERVICE"
    return exc.strerror or str(exc)


def bind_pod_listeners(netns_fd: int, *, ipv6: bool = True, mark: int = PACKET_MARK,
                       transparent: bool = True,
                       ports: tuple[tuple[str, int], ...] = PORTS, dns: bool = False) -> PodListeners:
    """Create and bind the pod's listeners inside its namespace; all or nothing.

    Args:
        netns_fd: handle to the pod's network namespace.
        ipv6: bind the dual-stack wildcard `[::]` (falls back to `0.0.0.0` when the pod has no IPv6).
        transparent: set IP_TRANSPARENT when permitted (best effort).
        dns: also bind the DNS proxy's UDP and TCP sockets on the pod's loopback, port 15053.
    Returns:
        the bound, listening, non-blocking sockets.
    Raises:
        ProxyStartError: the fd is not a netns, setns failed, or a port could not be bound; nothing is
            left open.
    """
    if not is_netns(netns_fd):
        raise ProxyStartError(f"the fd received for the pod is not a network namespace handle "
                              f"({_describe_fd(netns_fd)}); is the node agent sending the pod's netns?")
    made: list[PodListener] = []
    any_transparent = False
    try:
        with entered(netns_fd):
            for role, port in ports:
                family = socket.AF_INET6 if ipv6 else socket.AF_INET
                try:
                    sock, tp = _listener(family, port, mark=mark, transparent=transparent)
                except OSError as exc:
                    if family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                        ipv6 = False  # no IPv6 in this pod: the whole set goes v4
                        sock, tp = _listener(socket.AF_INET, port, mark=mark, transparent=transparent)
                    else:
                        raise ProxyStartError(f"cannot bind {role} listener on port {port}: "
                                              f"{_bind_hint(exc, port)}") from exc
                any_transparent = any_transparent or tp
                made.append(PodListener(role=role, port=port, sock=sock))
            if dns:
                try:
                    made += _dns_sockets(ipv6, mark)
                except OSError as exc:
                    raise ProxyStartError(f"cannot bind the DNS proxy on port {DNS_PROXY_PORT}: "
                                          f"{_bind_hint(exc, DNS_PROXY_PORT)}") from exc
    except NetnsError as exc:
        for listener in made:
            listener.sock.close()
        raise ProxyStartError(f"cannot enter the pod network namespace: {exc}") from exc
    except BaseException:
        for listener in made:
            listener.sock.close()
        raise
    return PodListeners(listeners=tuple(made), ipv6=ipv6, transparent=any_transparent)


def create_dns_upstream_socket(netns_fd: int, family: socket.AddressFamily, kind: socket.SocketKind, *,
                               mark: int = PACKET_MARK) -> socket.socket:
    """A non-blocking UDP or TCP socket in the pod's namespace for a forwarded DNS query, marked so the
    pod's DNS rules let it out to the resolver instead of back to 15053."""
    with entered(netns_fd):
        sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except BaseException:
        sock.close()
        raise
    return sock


def create_upstream_socket(netns_fd: int, family: socket.AddressFamily, *, mark: int = PACKET_MARK,
                           bind_source: str | None = None) -> socket.socket:
    """A non-blocking TCP socket created in the pod's namespace, marked so it is not captured again.

    Args:
        bind_source: when given, bind to this (foreign) source IP with IP_TRANSPARENT + IP_FREEBIND so the
            app sees the real client address. Raises OSError if the kernel refuses; callers fall back.
    """
    with entered(netns_fd):
        sock = socket.socket(family, _SOCK_FLAGS)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_keepalive(sock)
        if bind_source is not None:
            if family == socket.AF_INET6:
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
                sock.setsockopt(SOL_IPV6, IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
                sock.setsockopt(SOL_IP, IP_FREEBIND, 1)
            sock.bind((bind_source, 0))
    except BaseException:
        sock.close()
        raise
    return sock


class InPodSocketFactory:
    """The real factory: sockets created inside the pod netns via shared.netns.entered."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config

    def bind_listeners(self, netns_fd: int) -> PodListeners:
        listeners = bind_pod_listeners(netns_fd, ipv6=self.config.ipv6, mark=self.config.packet_mark,
                                       transparent=self.config.orig_src is not False,
                                       dns=self.config.dns_capture)
        if self.config.orig_src and not listeners.transparent:
            listeners.close()
            raise ProxyStartError("ENABLE_ORIG_SRC=true but IP_TRANSPARENT is not permitted on the pod's "
                                  "listeners (needs CAP_NET_ADMIN); unset it to fall back to plain connects")
        return listeners

    def upstream(self, netns_fd: int, family: socket.AddressFamily, *,
                 bind_source: str | None = None) -> socket.socket:
        return create_upstream_socket(netns_fd, family, mark=self.config.packet_mark, bind_source=bind_source)

    def original_dst(self, sock: socket.socket) -> Addr | None:
        return original_dst(sock)
