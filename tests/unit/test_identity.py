"""SPIFFE ids, CSRs and the CA's signing rules (no network)."""

from __future__ import annotations

import pytest
from cryptography import x509

from services.istiod.ca import CertificateAuthority
from services.istiod.errors import CaError
from shared.identity import (
    CertBundle,
    IdentityError,
    SpiffeId,
    generate_key,
    key_to_pem,
    load_cert,
    load_csr,
    make_csr,
    uri_sans,
)

ID = SpiffeId(trust_domain="cluster.local", namespace="ns", service_account="sa")


def test_spiffe_round_trip_and_errors() -> None:
    assert SpiffeId.parse("spiffe://cluster.local/ns/ns/sa/sa") == ID
    assert ID.uri == str(ID) == "spiffe://cluster.local/ns/ns/sa/sa"
    for bad in ("spiffe://td/ns/a", "http://td/ns/a/sa/b", "spiffe://td/ns//sa/b", ""):
        with pytest.raises(IdentityError, match="not a SPIFFE workload identity"):
            SpiffeId.parse(bad)


def test_csr_has_empty_subject_and_one_uri_san() -> None:
    csr = load_csr(make_csr(generate_key(), ID))
    assert csr.subject == x509.Name([])
    assert uri_sans(csr) == [ID.uri]
    with pytest.raises(IdentityError, match="cannot parse the CSR"):
        load_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")


def test_ca_signs_only_the_exact_identity() -> None:
    ca = CertificateAuthority.create()
    key = generate_key()
    chain = ca.sign_workload_csr(make_csr(key, ID), ID, 600)
    bundle = CertBundle.from_chain(ID, key_to_pem(key), chain)
    assert bundle.not_after - bundle.not_before == pytest.approx(660)
    load_cert(chain[0]).verify_directly_issued_by(load_cert(chain[1]))
    other = SpiffeId(trust_domain="cluster.local", namespace="ns", service_account="other")
    with pytest.raises(CaError, match="not exactly the requested identity"):
        ca.sign_workload_csr(make_csr(key, other), ID)
    with pytest.raises(IdentityError, match="expected exactly"):
        CertBundle.from_chain(other, key_to_pem(key), chain)
    with pytest.raises(IdentityError, match="empty certificate chain"):
        CertBundle.from_chain(ID, key_to_pem(key), [])


def test_default_and_capped_validity() -> None:
    ca = CertificateAuthority.create()
    key = generate_key()
    leaf = load_cert(ca.sign_workload_csr(make_csr(key, ID), ID)[0])
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() == 86400 + 60
    leaf = load_cert(ca.sign_workload_csr(make_csr(key, ID), ID, 10**9)[0])
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 90
