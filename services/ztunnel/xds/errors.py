"""Errors of the xDS client."""

from __future__ import annotations

from shared.errors import AmbientError


class ConversionError(AmbientError):
    """A control-plane resource cannot be converted to a domain type; it is NACKed with this message."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"resource {name!r}: {problem}")
        self.name = name
        self.problem = problem
