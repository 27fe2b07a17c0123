"""Process limits every long-running process sets at start.

    raise_open_files_limit("ztunnel")   # soft RLIMIT_NOFILE lifted to the hard limit, both logged

Each proxied connection holds two sockets and each enrolled pod several, so a server runs out of file
descriptors long before memory at the usual soft limit of 1,024. Upstream raises the soft limit to the
hard one at start; every process here does the same and logs both, so an operator can see the ceiling.
"""

from __future__ import annotations

import contextlib
import logging
import resource

log = logging.getLogger("shared.limits")


def raise_open_files_limit(process: str) -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard limit; log and return the (soft, hard) now in force."""
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if before != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log.info("open files limit", extra={"fields": [
        ("process", process), ("soft", soft), ("hard", hard), ("soft_at_start", before)]})
    return soft, hard
