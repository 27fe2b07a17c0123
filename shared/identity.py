"""SPIFFE identities and the certificate/key helpers both the CA (istiod stub) and its clients (ztunnel) use.

Identity format: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`. Keys are ECDSA
P-256; a CSR has an empty subject and exactly one URI SAN, the SPIFFE id.
"""

from __future__ import annotations

import re

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.errors import AmbientError

DEFAULT_TRUST_DOMAIN = "cluster.local"

_SPIFFE = re.compile(r"^spiffe://(?P<td>[^/]+)/ns/(?P<ns>[^/]+)/sa/(?P<sa>[^/]+)$")


class IdentityError(AmbientError):
    """A malformed SPIFFE id, key, CSR or certificate."""


class SpiffeId(msgspec.Struct, frozen=True, kw_only=True, order=True):
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse `spiffe://td/ns/NS/sa/SA`. Raises IdentityError naming the bad value."""
        m = _SPIFFE.match(uri)
        if m is None:
            raise IdentityError(
                f"not a SPIFFE workload identity: {uri!r} (expected spiffe://<td>/ns/<ns>/sa/<sa>)"
            )
        return cls(trust_domain=m["td"], namespace=m["ns"], service_account=m["sa"])

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except ValueError as exc:
        raise IdentityError(f"cannot read private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError("private key is not an ECDSA key")
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> str:
    """A PEM CSR with an empty subject and one URI SAN: the identity (what ztunnel sends to the CA)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def load_csr(pem: str) -> x509.CertificateSigningRequest:
    """Parse and signature-check a PEM CSR. Raises IdentityError."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as exc:
        raise IdentityError(f"cannot parse the CSR as PEM PKCS#10: {exc}") from None
    try:
        valid = csr.is_signature_valid
    except InvalidSignature:
        valid = False
    if not valid:
        raise IdentityError("the CSR's signature does not verify")
    return csr


def uri_sans(obj: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        ext = obj.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def load_cert(pem: str | bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise IdentityError(f"cannot parse certificate PEM: {exc}") from None


def cert_to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class CertBundle(msgspec.Struct, frozen=True, kw_only=True):
    """A workload certificate: private key, leaf + chain (PEM, leaf first) and the leaf's validity window.

    Times are POSIX seconds (UTC) so that clocks can be faked with plain floats.
    """

    identity: SpiffeId
    key_pem: bytes
    cert_chain: tuple[str, ...]
    not_before: float
    not_after: float

    @property
    def leaf_pem(self) -> str:
        return self.cert_chain[0]

    @property
    def refresh_at(self) -> float:
        """When to renew: half-way through the validity window (upstream ztunnel's rule)."""
        return self.not_before + (self.not_after - self.not_before) / 2

    @classmethod
    def from_chain(cls, identity: SpiffeId, key_pem: bytes, chain: list[str]) -> CertBundle:
        """Build from a CA response, checking the leaf carries exactly `identity`. Raises IdentityError."""
        if not chain:
            raise IdentityError("the CA returned an empty certificate chain")
        leaf = load_cert(chain[0])
        sans = uri_sans(leaf)
        if sans != [identity.uri]:
            raise IdentityError(
                f"the CA issued a certificate for {sans}, expected exactly [{identity.uri!r}]"
            )
        return cls(
            identity=identity,
            key_pem=key_pem,
            cert_chain=tuple(chain),
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
        )
