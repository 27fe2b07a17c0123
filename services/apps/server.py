"""`python -m services.apps.server KIND [--port N ...]`: run one sample app in the current netns.

KIND is productpage, details, reviews, ratings, echo or sleep (sleep serves nothing and waits, like the
`sleep` pod upstream's samples use as a client). Settings come from the environment (see bookinfo.py).
SIGTERM/SIGINT end it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio

from services.apps.bookinfo import APP_KINDS, LIMITS, make_handler
from shared.httpd import serve_http_tcp
from shared.logs import LOG_FORMAT_HELP, log_format_from, setup_logging

log = logging.getLogger("apps.server")


async def run(kind: str, ports: Sequence[int]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            if kind != "sleep":
                handler = make_handler(kind, os.environ)
                for port in ports:
                    await nursery.start(partial(serve_http_tcp, handler, port, limits=LIMITS))
                    log.info("app serving", extra={"fields": [("app", kind), ("port", port)]})
            else:
                log.info("idle; use `ambient lab exec POD -- python -m services.apps.client URL`",
                         extra={"fields": [("app", kind)]})
            async for signum in signals:
                log.info("received signal, exiting",
                         extra={"fields": [("signal", signal.Signals(signum).name)]})
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.apps.server", description="run one sample app in this netns",
        epilog=LOG_FORMAT_HELP,
    )
    parser.add_argument("kind", choices=APP_KINDS)
    parser.add_argument("--port", type=int, action="append", default=[], help="port to serve (repeatable)")
    args = parser.parse_args(argv)
    try:
        log_format = log_format_from(os.environ)
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging(json_format=log_format == "json")
    ports = args.port or ([] if args.kind == "sleep" else [9080])
    try:
        trio.run(run, args.kind, ports)
    except OSError as exc:
        print(f"{args.kind}: cannot serve on {ports}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
