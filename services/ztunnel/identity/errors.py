"""Errors of ztunnel's certificate management."""

from __future__ import annotations

from shared.errors import AmbientError


class CertificateError(AmbientError):
    """No usable certificate for an identity (CA refused or unreachable, nothing valid cached)."""
