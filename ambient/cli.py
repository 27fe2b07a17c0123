"""`ambient`: the operator CLI. Each command group lives in its own module exposing
`register(subparsers)`; this module only assembles them and turns operator errors into clean exits."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from shared.errors import AmbientError
from shared.version import version_text

# Modules that add subcommands; each defines register(subparsers) and sets `func` on its parsers.
COMMAND_MODULES: tuple[str, ...] = (
    "ambient.zds",
    "ambient.lab.cli",
    "ambient.world",
    "ambient.bench.cli",
    "ambient.trace",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ambient", description="Operate the Trio ambient mesh data plane.")
    parser.add_argument("--version", action="version", version=version_text("ambient"))
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        sys.exit(2)
    try:
        code = func(args)
    except AmbientError as exc:
        print(f"ambient: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(int(code or 0))
