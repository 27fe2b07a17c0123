"""Errors of the Kubernetes client, written for the operator who reads them."""

from __future__ import annotations

from shared.errors import AmbientError


class KubeError(AmbientError):
    """Base of every Kubernetes client error."""


class KubeConfigError(KubeError):
    """No usable Kubernetes configuration (kubeconfig, in-cluster service account); says which was tried."""


class KubeApiError(KubeError):
    """A request to the API server failed; `status` is the HTTP status, 0 when there was no answer."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        text = f"HTTP {status} {reason}: {message}" if status else message
        super().__init__(text)


class Gone(KubeApiError):
    """410 Gone: the resource version asked for is no longer in the server's history; list again."""
