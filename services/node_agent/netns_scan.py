"""Find a pod's network namespace by its IP addresses, for pods the agent did not get a CNI event for
(enrolled before a restart, or made ambient by a label change after they started). Upstream scans
/host/proc for the pod's netns; we look at named namespaces (/run/netns, what the lab and `ip netns` make)
and every process's namespace, and pick the one holding one of the pod's IPs.

Runs in a worker thread: each candidate is entered (`shared.netns.entered`) and its addresses listed with
pyroute2 there. Candidates are deduplicated by namespace identity, so a namespace shared by many processes
is looked at once; the agent's own namespace is skipped.

The pairing rule (upstream's istio#61211 paired a pod with a namespace it did not own): a namespace is the
pod's only if it holds one of the pod's IPs (a process's membership proves nothing: a privileged process
may have entered another pod's namespace); two namespaces holding them is ambiguous and refused; and the
lifecycle refuses a match that the netns cache already holds for another pod (a stale namespace with a
reused IP), with a `netns scan match skipped` line. A CNI-reported netns path always wins: the scan runs
only for pods without one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

import trio
from pyroute2 import IPRoute

from services.node_agent.errors import NetnsGoneError
from shared.netns import NetnsError, current_netns_fd, entered, is_netns, netns_id

log = logging.getLogger("node_agent.netns_scan")


def candidate_paths(prefix: str = "") -> Iterator[str]:
    run_dir = f"{prefix}/run/netns"
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(run_dir)):
            yield os.path.join(run_dir, name)
    with contextlib.suppress(OSError):
        for pid in os.listdir(f"{prefix}/proc"):
            if pid.isdigit():
                yield f"{prefix}/proc/{pid}/ns/net"


def _addresses_here() -> set[str]:
    with IPRoute() as ipr:
        return {str(a.get("address")) for a in ipr.get_addr() if a.get("address")}


class AmbiguousNetnsError(Exception):
    """More than one namespace holds the pod's IPs (for example two labs on one host); never guess."""


def find_netns_by_ips(ips: Iterable[str], *, prefix: str = "") -> tuple[int, str] | None:
    """A new fd (and its path) for the namespace holding one of `ips`, or None. Synchronous: call it in a
    worker thread.

    Every candidate is looked at: when two different namespaces hold the IPs, entering either could put
    another pod's traffic under this pod's rules, so that is an `AmbiguousNetnsError`, not a pick.
    """
    wanted = set(ips)
    if not wanted:
        return None
    own = current_netns_fd()
    try:
        seen = {netns_id(own)}
    finally:
        os.close(own)
    match: tuple[int, str] | None = None
    try:
        for path in candidate_paths(prefix):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            keep = False
            try:
                if not is_netns(fd):
                    continue
                ident = netns_id(fd)
                if ident in seen:
                    continue
                seen.add(ident)
                with entered(fd):
                    found = _addresses_here() & wanted
                if found:
                    if match is not None:
                        raise AmbiguousNetnsError(
                            f"both {match[1]} and {path} hold {', '.join(sorted(found))}"
                        )
                    keep = True
                    match = (fd, path)
            except (OSError, NetnsError) as exc:
                log.debug("netns scan: skipping a namespace",
                          extra={"fields": [("netns", path), ("error", str(exc))]})
            finally:
                if not keep:
                    os.close(fd)
    except AmbiguousNetnsError:
        if match is not None:
            os.close(match[0])
        raise
    return match


async def find_pod_netns(ips: Iterable[str], *, prefix: str = "") -> tuple[int, str]:
    """Async wrapper of `find_netns_by_ips`.

    Raises:
        NetnsGoneError: no namespace holds any of the IPs (or the pod has none).
    """
    ips = tuple(ips)
    if not ips:
        raise NetnsGoneError("the pod has no IP address to find its network namespace by")
    try:
        found = await trio.to_thread.run_sync(lambda: find_netns_by_ips(ips, prefix=prefix))
    except AmbiguousNetnsError as exc:
        raise NetnsGoneError(
            f"more than one network namespace holds the pod's IPs ({exc}); refusing to guess which is the"
            " pod: re-add it through the CNI event (its netns path) instead"
        ) from None
    if found is None:
        raise NetnsGoneError(
            f"no network namespace on this node holds {', '.join(ips)} (pod not started yet?)"
        )
    return found
