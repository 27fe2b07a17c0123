"""TLS contexts for HBONE: settings, the per-identity cache, root selection (no sockets, no event loop)."""

from __future__ import annotations

import pytest
from OpenSSL import SSL

from services.istiod.ca import CertificateAuthority
from services.ztunnel.hbone.errors import TlsError
from services.ztunnel.hbone.tls import (
    TlsContextCache,
    client_connection,
    default_roots,
    describe_ssl_error,
    spiffe_of,
)
from shared.identity import CertBundle, SpiffeId, generate_key, key_to_pem, load_cert, make_csr

ID = SpiffeId(trust_domain="cluster.local", namespace="ns", service_account="a")


def mint(ca: CertificateAuthority, identity: SpiffeId = ID) -> CertBundle:
    key = generate_key()
    chain = ca.sign_workload_csr(make_csr(key, identity), identity)
    return CertBundle.from_chain(identity, key_to_pem(key), chain)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def test_contexts_are_cached_per_identity_and_rebuilt_on_rotation(ca: CertificateAuthority) -> None:
    cache = TlsContextCache([ca.root_pem])
    bundle = mint(ca)
    client = cache.client(bundle)
    assert cache.client(bundle) is client
    assert cache.server(bundle) is not client
    rotated = mint(ca)
    assert cache.client(rotated) is not client
    cache.forget(ID)
    assert cache.client(rotated) is not client


def test_default_roots_are_the_end_of_the_ca_chain(ca: CertificateAuthority) -> None:
    bundle = mint(ca)
    assert default_roots(bundle) == (ca.root_pem,)
    lonely = CertBundle(identity=ID, key_pem=bundle.key_pem, cert_chain=bundle.cert_chain[:1],
                        not_before=bundle.not_before, not_after=bundle.not_after)
    with pytest.raises(TlsError, match="no trust roots"):
        TlsContextCache().client(lonely)


def test_mismatched_key_is_refused(ca: CertificateAuthority) -> None:
    bundle = mint(ca)
    wrong = CertBundle(identity=ID, key_pem=key_to_pem(generate_key()), cert_chain=bundle.cert_chain,
                       not_before=bundle.not_before, not_after=bundle.not_after)
    with pytest.raises(TlsError, match="cannot use the certificate"):
        TlsContextCache([ca.root_pem]).server(wrong)


def test_client_connection_needs_an_expected_identity(ca: CertificateAuthority) -> None:
    ctx = TlsContextCache([ca.root_pem]).client(mint(ca))
    with pytest.raises(TlsError, match="no expected server identity"):
        client_connection(ctx, None, [])


def test_spiffe_of_reads_the_uri_san(ca: CertificateAuthority) -> None:
    assert spiffe_of(load_cert(mint(ca).leaf_pem)) == ID


def test_ssl_errors_read_well() -> None:
    exc = SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")])
    assert describe_ssl_error(exc) == "tlsv1 alert unknown ca"
    eof = SSL.SysCallError(-1, "Unexpected EOF")
    assert describe_ssl_error(eof) == "connection closed by the peer during TLS"

