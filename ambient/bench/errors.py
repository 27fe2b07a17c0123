"""Errors of `ambient bench`, written for the operator running it."""

from __future__ import annotations

from shared.errors import AmbientError


class BenchError(AmbientError):
    """A measurement could not be made (a client failed, the mesh arm did not use ztunnel, ...)."""
