"""The version every console script reports with `--version`: the installed package's, from its metadata."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "trio-ambient"


def package_version() -> str:
    """The installed distribution's version; `unknown` when running from a tree that was never installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def version_text(prog: str) -> str:
    """`ztunnel 0.1.0 (trio-ambient)`: what `PROG --version` prints."""
    return f"{prog} {package_version()} ({DISTRIBUTION})"
