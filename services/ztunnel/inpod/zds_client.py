"""ZDS client (ztunnel role) on Trio: connect, hello, apply what the node agent says, reconnect.

Theory of operation
-------------------
`run_zds_client()` runs until cancelled. Each connection: send `ZdsHello{V1}`, tell the manager a new
connection started (it resets its snapshot bookkeeping), then read one request at a time, apply it through
the `WorkloadManager`, and answer it. A second task retries pending pods every 5 s while connected.

How the connection ends follows upstream ztunnel, with one deliberate difference (on a protocol error):

* unreadable datagram (decode error, wrong fds, truncation): NACK "failure to read message : ..." then
  close and reconnect;
* protocol error (keep after snapshot, second snapshot_sent, add without workload_info): NACK
  "failure to process message : ..." then close and reconnect. Upstream exits the process here; ours
  keeps serving the pods it has and lets the next snapshot reconcile;
* EOF (or an empty datagram): reconnect.

Reconnects back off exponentially (10 ms doubling to 15 s, with 20 % jitter), logging once per streak of
failures so a missing node agent does not flood the log.
"""

from __future__ import annotations

import logging
import os
import random

import trio

from services.ztunnel.inpod.statemanager import RETRY_INTERVAL, WorkloadManager
from shared.zds.codec import close_fds, decode_request
from shared.zds.errors import ZdsEndOfStream, ZdsProtocolError, ZdsReadError
from shared.zds.session import ClientSession
from shared.zds.transport import connect, describe_connect_error, recv_datagram, send_datagram
from shared.zds.types import AddWorkload

log = logging.getLogger("zds.client")

BACKOFF_INITIAL = 0.01
BACKOFF_MAX = 15.0
BACKOFF_JITTER = 0.2


class Backoff:
    """Exponential backoff: 10 ms doubling (first wait 20 ms) up to 15 s, +-20 % jitter."""

    def __init__(self, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX) -> None:
        self.initial, self.maximum = initial, maximum
        self.current = initial

    def next_delay(self) -> float:
        self.current = min(self.current * 2, self.maximum)
        return self.current * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)

    def reset(self) -> None:
        self.current = self.initial


async def run_zds_client(
    path: str | os.PathLike[str],
    manager: WorkloadManager,
    *,
    retry_interval: float = RETRY_INTERVAL,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Stay connected to the node agent at `path` until cancelled; see the module docstring."""
    backoff = Backoff()
    failing = False
    task_status.started()
    while True:
        try:
            sock = await connect(path)
        except OSError as exc:
            delay = backoff.next_delay()
            if not failing:
                log.warning("cannot connect to the node agent; retrying with backoff", extra={"fields": [
                    ("path", os.fspath(path)), ("error", describe_connect_error(path, exc))]})
                failing = True
            await trio.sleep(delay)
            continue
        if failing:
            log.info("connected to the node agent", extra={"fields": [("path", os.fspath(path))]})
        failing = False
        try:
            clean = await _serve_connection(sock, manager, retry_interval)
        finally:
            sock.close()
            manager.connection_lost()
        if clean:
            backoff.reset()
        await trio.sleep(backoff.next_delay())


async def _serve_connection(
    sock: trio.socket.SocketType, manager: WorkloadManager, retry_interval: float
) -> bool:
    """Serve one connection; returns True when it ended after a clean exchange (for backoff)."""
    session = ClientSession()
    try:
        await send_datagram(sock, session.hello())
    except OSError as exc:
        log.warning("failed to announce to the node agent (hello)", extra={"fields": [("error", str(exc))]})
        return False
    manager.connection_started()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_retry_pending, manager, retry_interval)
        clean = await _read_loop(sock, session, manager)
        nursery.cancel_scope.cancel()
    return clean


async def _read_loop(sock: trio.socket.SocketType, session: ClientSession, manager: WorkloadManager) -> bool:
    while True:
        try:
            data, fds, flags = await recv_datagram(sock)
        except OSError as exc:
            log.warning("ZDS read failed; reconnecting", extra={"fields": [("error", str(exc))]})
            return False
        try:
            request = decode_request(data, fds, flags)
        except ZdsEndOfStream:
            log.info("the node agent closed the ZDS connection; reconnecting")
            return True
        except ZdsReadError as exc:
            session.reject_unreadable()
            log.error("failure to read message; NACKing and reconnecting",
                      extra={"fields": [("error", str(exc))]})
            await _send_quietly(sock, session.respond(f"failure to read message : {exc}"))
            return False
        try:
            session.receive_request(request)
        except ZdsProtocolError as exc:
            if isinstance(request, AddWorkload):
                close_fds([request.netns_fd])
            log.error("failure to process message; NACKing and reconnecting",
                      extra={"fields": [("error", str(exc))]})
            await _send_quietly(sock, session.respond(f"failure to process message : {exc}"))
            return False
        error = await manager.handle(request)
        try:
            await send_datagram(sock, session.respond(error))
        except OSError as exc:
            log.warning("failed to answer the node agent; reconnecting",
                        extra={"fields": [("error", str(exc))]})
            return False


async def _send_quietly(sock: trio.socket.SocketType, datagram: tuple[bytes, list[int]]) -> None:
    try:
        await send_datagram(sock, datagram)
    except OSError as exc:
        log.debug("could not send NACK", extra={"fields": [("error", str(exc))]})


async def _retry_pending(manager: WorkloadManager, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        if manager.pending:
            await manager.retry_pending()


__all__ = ["Backoff", "run_zds_client"]
