"""Errors of the istiod stub, written for the operator who wrote the world file or runs the stub."""

from __future__ import annotations

from shared.errors import AmbientError


class WorldError(AmbientError):
    """A world document (file or mutation) is invalid; nothing of it was applied.

    The message names the source, the path inside it ($.pods[2].node) and what is wrong.
    """

    def __init__(self, source: str, path: str, problem: str) -> None:
        super().__init__(f"{source}: {path}: {problem}")
        self.source = source
        self.path = path
        self.problem = problem


class NotFoundError(AmbientError):
    """A mutation names a pod, namespace or policy that does not exist."""


class CaError(AmbientError):
    """The CA refuses a certificate request (bad CSR, identity mismatch)."""


class StartupError(AmbientError):
    """The stub cannot start (bad flags, unreadable files, address in use)."""
