"""Blocking probes the lab uses to see its components: TCP and HTTP inside a lab namespace, HTTP on a Unix
socket (the node agent's CNI-event endpoint).

A TCP probe's socket is created while the calling thread is switched into the target namespace
(shared.netns.entered) and used after switching back, so the traffic stays inside the lab: the host
namespace never sends a packet to a lab address.
"""

from __future__ import annotations

import http.client
import os
import socket
from collections.abc import Iterator

from shared.netns import entered, open_netns


def netns_socket(netns: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket that lives in network namespace `netns` (a name under /run/netns; "" = our own)."""
    if not netns:
        return socket.socket(family, socket.SOCK_STREAM)
    fd = open_netns(netns)
    try:
        with entered(fd):
            return socket.socket(family, socket.SOCK_STREAM)
    finally:
        os.close(fd)


def tcp_probe(netns: str, host: str, port: int, timeout: float = 1.0) -> None:
    """Connect to host:port from inside `netns` and close. Raises OSError when that fails."""
    with netns_socket(netns) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))


class _Conn(http.client.HTTPConnection):
    def __init__(self, sock: socket.socket, host: str, timeout: float) -> None:
        super().__init__(host, timeout=timeout)
        self._prepared = sock

    def connect(self) -> None:
        self.sock = self._prepared


def _request(
    sock: socket.socket, host: str, method: str, path: str, body: bytes | None, timeout: float
) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    conn = _Conn(sock, host, timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_get(netns: str, host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET http://host:port/path from inside `netns`. Raises OSError / http.client.HTTPException."""
    return http_request(netns, host, port, "GET", path, timeout=timeout)


def http_request(
    netns: str, host: str, port: int, method: str, path: str, body: bytes | None = None, timeout: float = 2.0
) -> tuple[int, bytes]:
    """One HTTP request to host:port from inside `netns`. Raises OSError / http.client.HTTPException."""
    sock = netns_socket(netns)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return _request(sock, f"{host}:{port}", method, path, body, timeout)


def unix_http(
    path: str, method: str, url_path: str, body: bytes | None = None, timeout: float = 30.0
) -> tuple[int, bytes]:
    """One HTTP/1.1 request over the Unix stream socket at `path`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return _request(sock, "localhost", method, url_path, body, timeout)


def stream_lines(sock: socket.socket, host: str, path: str) -> Iterator[bytes]:
    """GET `path` on the connected `sock` and yield the response body line by line as it arrives (a
    streamed, chunked answer), until the server ends it. Raises http.client.HTTPException on a status
    other than 200."""
    sock.settimeout(None)  # a trace waits for as long as nothing happens
    conn = _Conn(sock, host, timeout=0.0)  # the timeout is only for connecting, and sock is connected
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        if response.status != 200:
            raise http.client.HTTPException(
                f"HTTP {response.status}: {response.read().decode(errors='replace').strip()}"
            )
        while line := response.readline():
            yield line
    finally:
        conn.close()
