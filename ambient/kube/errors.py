"""Errors of the local API server kit, written for the operator who reads them."""

from __future__ import annotations

from shared.errors import AmbientError


class KubeError(AmbientError):
    """The local API server cannot be set up or started."""


class BinariesMissing(KubeError):
    """kube-apiserver, etcd or kubectl is not built (scripts/build-kube builds them)."""
