"""Fixtures shared by the service tests that need the mesh's certificates."""

from __future__ import annotations

import pytest

from services.istiod.ca import CertificateAuthority
from tests.service.test_hbone_helpers import FakeCerts


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    """A fresh mesh root CA per test module (creating one costs a key generation)."""
    return CertificateAuthority.create()


@pytest.fixture
def certs(ca: CertificateAuthority) -> FakeCerts:
    """Workload certificates signed by `ca`, fetched like the certificate manager does."""
    return FakeCerts(ca)
