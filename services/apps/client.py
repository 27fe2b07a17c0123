"""`python -m services.apps.client URL`: a tiny curl for the lab's pods.

    python -m services.apps.client http://productpage.bookinfo:9080/productpage
    python -m services.apps.client -s -o /dev/null -w '%{http_code}' http://details.bookinfo:9080/details/0

Prints the body (with -i the status line and headers first). Exit codes follow curl: 0 when a response
arrived (22 with -f and a status >= 400), 6 name not resolved, 7 cannot connect, 28 timed out,
52/56 empty or broken reply.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import trio

from services.apps.http import FetchError, FetchResult, fetch


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.apps.client", description="a tiny curl for lab pods")
    p.add_argument("url")
    p.add_argument("-X", "--request", default=None, help="method (default GET, POST with -d)")
    p.add_argument("-d", "--data", default=None, help="request body")
    p.add_argument("-H", "--header", action="append", default=[], help="'Name: value' (repeatable)")
    p.add_argument("-i", "--include", action="store_true", help="print the status line and headers")
    p.add_argument("-f", "--fail", action="store_true", help="exit 22 on HTTP status >= 400")
    p.add_argument("-s", "--silent", action="store_true", help="no error messages")
    p.add_argument("-o", "--output", default=None, help="write the body to this file (/dev/null: drop it)")
    p.add_argument("-w", "--write-out", default=None, help="printed after the body; %%{http_code}: status")
    p.add_argument("-m", "--max-time", type=float, default=10.0, help="timeout in seconds (default 10)")
    return p.parse_args(argv)


def _render(args: argparse.Namespace, result: FetchResult) -> bytes:
    out = b""
    if args.include:
        out += f"HTTP/1.1 {result.status} {result.reason}\r\n".encode()
        out += b"".join(f"{k}: {v}\r\n".encode() for k, v in result.headers) + b"\r\n"
    if args.output is None:
        out += result.body
    else:
        with open(args.output, "wb") as f:
            f.write(result.body)
    if args.write_out is not None:
        out += args.write_out.replace("%{http_code}", str(result.status)).replace("\\n", "\n").encode()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    headers = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            print(f"client: header {item!r} is not 'Name: value'", file=sys.stderr)
            return 2
        headers[name.strip()] = value.strip()
    body = (args.data or "").encode()
    method = args.request or ("POST" if args.data is not None else "GET")
    try:
        result = trio.run(
            lambda: fetch(args.url, method=method, body=body, timeout=args.max_time, headers=headers)
        )
    except FetchError as exc:
        if not args.silent:
            print(f"client: ({exc.exit_code}) {exc}", file=sys.stderr)
        return exc.exit_code
    sys.stdout.buffer.write(_render(args, result))
    sys.stdout.flush()
    if args.fail and result.status >= 400:
        if not args.silent:
            print(f"client: (22) the requested URL returned error: {result.status}", file=sys.stderr)
        return 22
    return 0


if __name__ == "__main__":
    sys.exit(main())
