"""Caps on the TCP connections ztunnel holds for its pods: one per pod, one for the whole process.

Theory of operation
-------------------
Every connection costs a file descriptor, and a process that runs out of them stops accepting anything, for
every pod at once (`accept failed ... Too many open files`). So ztunnel counts what it holds and refuses
beyond a cap, long before the open-files limit is reached:

    limits = ConnectionLimits(max_connections=18_000, max_per_pod=13_500, metrics=metrics)
    pod = limits.for_pod()                 # one per pod proxy set (PodContext.connections)
    refusal = pod.acquire()                # None: counted; else why not (the refusal is counted too)
    ...
    pod.release()                          # exactly once per granted acquire

What counts: each connection a pod's listeners accept (15001, 15006, 15008, DNS over TCP on 15053), and
each connection ztunnel opens on a pod's behalf to an app or a passthrough destination (the plain-TCP
upstream of 15001 and 15006, the app connection of each HBONE stream on 15008). So a passthrough connection
counts twice (it holds two sockets), an outbound HBONE tunnel once (its pooled HBONE connection is shared by
up to 100 tunnels and is not counted), and an inbound HBONE connection once plus once per open stream.

The defaults follow the process's open-files limit as it is once raised at start (shared/limits.py): the
process cap leaves a tenth of the limit (at least 256) for listeners, pooled HBONE connections, pipes and
the control plane; a pod may take three quarters of the process cap, so one busy pod cannot starve the
others. At a 20,000 limit that is 18,000 per process and 13,500 per pod.

A refusal is counted in `istio_tcp_connections_refused{reason="pod_limit"|"process_limit"}` and logged at
most once a second per pod (`log_refusal`), with how many refusals the line stands for: a flood of
connections must not become a flood of log lines.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from typing import Final

from services.ztunnel.telemetry.metrics import Metrics
from shared.logs import Field

log = logging.getLogger("ztunnel.proxy")

RESERVED_FDS_MIN: Final = 256
"""File descriptors the default process cap leaves free at the least (listeners, pools, pipes, gRPC)."""
POD_SHARE: Final = 0.75
"""The default per-pod cap as a share of the process cap."""
REFUSAL_LOG_INTERVAL: Final = 1.0
"""Seconds between two refusal lines of one pod; the refusals in between are counted in the next line."""
POD_LIMIT: Final = "pod_limit"
PROCESS_LIMIT: Final = "process_limit"


def default_max_connections(open_files_limit: int) -> int:
    """The process cap for a soft RLIMIT_NOFILE of `open_files_limit`: a tenth of it (at least
    RESERVED_FDS_MIN) is left for everything that is not a counted connection."""
    reserve = max(RESERVED_FDS_MIN, open_files_limit // 10)
    return max(1, open_files_limit - reserve)


def default_max_per_pod(max_connections: int) -> int:
    return max(1, int(max_connections * POD_SHARE))


class ConnectionLimits:
    """The process-wide cap and count, and the per-pod cap every pod's `PodConnections` applies."""

    def __init__(self, *, max_connections: int | None = None, max_per_pod: int | None = None,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """Args:
            max_connections: ZTUNNEL_MAX_CONNECTIONS; None: from the open-files limit now in force.
            max_per_pod: ZTUNNEL_MAX_CONNECTIONS_PER_POD; None: three quarters of the process cap.
            metrics: where refusals are counted (None: not counted).
            clock: seconds, for spacing the refusal lines.
        """
        if max_connections is None:
            max_connections = default_max_connections(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.max_connections = max_connections
        self.max_per_pod = max_per_pod if max_per_pod is not None else default_max_per_pod(max_connections)
        self.open = 0
        """Connections counted across all pods right now."""
        self.metrics = metrics
        self.clock = clock

    def for_pod(self) -> PodConnections:
        return PodConnections(self)

    def _refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_refused.labels(reason=reason).inc()


UNLIMITED: Final = 2**62


class PodConnections:
    """One pod's count of the connections it holds, under its own cap and the process's."""

    __slots__ = ("_last_line", "_suppressed", "limits", "open")

    def __init__(self, limits: ConnectionLimits | None = None) -> None:
        self.limits = limits if limits is not None else ConnectionLimits(
            max_connections=UNLIMITED, max_per_pod=UNLIMITED)
        self.open = 0
        self._last_line: float | None = None
        self._suppressed = 0

    def acquire(self) -> str | None:
        """Count one more connection, or refuse it: None when counted (`release()` it later), else the
        error text (the refusal is counted in the metric; the caller logs it, see `log_refusal`)."""
        limits = self.limits
        if self.open >= limits.max_per_pod:
            limits._refused(POD_LIMIT)
            return (f"too many connections: the pod holds {self.open}, its limit is {limits.max_per_pod} "
                    "(ZTUNNEL_MAX_CONNECTIONS_PER_POD)")
        if limits.open >= limits.max_connections:
            limits._refused(PROCESS_LIMIT)
            return (f"too many connections: ztunnel holds {limits.open}, its limit is "
                    f"{limits.max_connections} (ZTUNNEL_MAX_CONNECTIONS)")
        self.open += 1
        limits.open += 1
        return None

    def release(self) -> None:
        self.open -= 1
        self.limits.open -= 1

    def log_refusal(self, error: str, fields: list[Field]) -> None:
        """One warning line for this refusal, unless this pod wrote one less than REFUSAL_LOG_INTERVAL ago;
        then it is counted in the next line's `suppressed`."""
        now = self.limits.clock()
        if self._last_line is not None and now - self._last_line < REFUSAL_LOG_INTERVAL:
            self._suppressed += 1
            return
        self._last_line = now
        suppressed, self._suppressed = self._suppressed, 0
        log.warning("connection refused", extra={"fields": [
            *fields, ("error", error), ("suppressed", suppressed)]})
