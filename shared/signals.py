"""The stop signals of every process: SIGTERM and SIGINT set a shutdown event, logged once."""

from __future__ import annotations

import logging
import signal

import trio

log = logging.getLogger(__name__)


async def set_on_stop_signal(shutdown: trio.Event, logger: logging.Logger = log) -> None:
    """Wait for SIGTERM or SIGINT, log it (on `logger`, the process's) and set `shutdown`; run it in the
    process's root nursery."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            logger.info("received signal", extra={"fields": [("signal", signal.Signals(signum).name)]})
            shutdown.set()
            return
