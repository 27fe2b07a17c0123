"""The stub's certificate authority: a self-signed ECDSA P-256 root that signs workload leaves (SPIFFE URI
SAN) and the stub's own serving certificate.

Leaf profile (what upstream istiod issues): empty subject, exactly one critical URI SAN (the SPIFFE id),
digitalSignature + keyEncipherment, serverAuth + clientAuth, not a CA, signed by the root; the chain
returned is [leaf, root].
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.istiod.errors import CaError, StartupError
from shared.identity import (
    IdentityError,
    SpiffeId,
    cert_to_pem,
    generate_key,
    key_to_pem,
    load_cert,
    load_csr,
    load_key,
    uri_sans,
)
from shared.secretfile import write_secret

DEFAULT_VALIDITY = dt.timedelta(hours=24)
MAX_VALIDITY = dt.timedelta(days=90)
_BACKDATE = dt.timedelta(minutes=1)  # tolerate small clock skew between nodes


class CertificateAuthority:
    def __init__(
        self,
        root_key: ec.EllipticCurvePrivateKey,
        root_cert: x509.Certificate,
        *,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.root_key = root_key
        self.root_cert = root_cert
        self.root_pem = cert_to_pem(root_cert)
        self._now = now

    @classmethod
    def create(
        cls, trust_domain: str = "cluster.local", *, now: Callable[[], dt.datetime] | None = None
    ) -> CertificateAuthority:
        """A fresh self-signed root (10 years); `now` is the clock leaves are dated with (tests fake it)."""
        key = generate_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, "trio-ambient istiod-stub root CA"),
            ]
        )
        issued = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(issued - _BACKDATE)
            .not_valid_after(issued + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert) if now is None else cls(key, cert, now=now)

    @classmethod
    def load_or_create(cls, state_dir: Path, trust_domain: str) -> CertificateAuthority:
        """Use state_dir/root-{cert,key}.pem when both exist, else create and write them (key mode 0600)."""
        cert_path, key_path = state_dir / "root-cert.pem", state_dir / "root-key.pem"
        try:
            if cert_path.exists() and key_path.exists():
                return cls(load_key(key_path.read_bytes()), load_cert(cert_path.read_bytes()))
            ca = cls.create(trust_domain)
            state_dir.mkdir(parents=True, exist_ok=True)
            write_secret(key_path, key_to_pem(ca.root_key))
            cert_path.write_text(ca.root_pem)
            return ca
        except (OSError, IdentityError) as exc:
            raise StartupError(f"cannot load or create the root CA in {state_dir}: {exc}") from None

    def _leaf_builder(
        self, public_key: ec.EllipticCurvePublicKey, validity: dt.timedelta
    ) -> x509.CertificateBuilder:
        now = self._now()
        return (
            x509.CertificateBuilder()
            .issuer_name(self.root_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.root_key.public_key()), critical=False
            )
        )

    def sign_workload_csr(self, csr_pem: str, identity: SpiffeId, validity_seconds: int = 0) -> list[str]:
        """Sign a workload CSR whose only URI SAN must be `identity`. Returns [leaf, root] PEMs.

        Raises:
            CaError: unparsable CSR, bad signature, wrong key type, or SANs other than exactly the identity.
        """
        try:
            csr = load_csr(csr_pem)
        except IdentityError as exc:
            raise CaError(str(exc)) from None
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
            raise CaError("the CSR key must be ECDSA P-256")
        sans = uri_sans(csr)
        if sans != [identity.uri]:
            raise CaError(
                f"the CSR's URI SANs {sans} are not exactly the requested identity [{identity.uri!r}]"
            )
        validity = dt.timedelta(seconds=validity_seconds) if validity_seconds > 0 else DEFAULT_VALIDITY
        validity = min(validity, MAX_VALIDITY)
        leaf = (
            self._leaf_builder(public_key, validity)
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True
            )
            .sign(self.root_key, hashes.SHA256())
        )
        return [cert_to_pem(leaf), self.root_pem]

    def issue_server_cert(self, names: Sequence[str]) -> tuple[bytes, str]:
        """The stub's own serving certificate (DNS names / IPs as SANs). Returns (key PEM, chain PEM)."""
        key = generate_key()
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        cert = (
            self._leaf_builder(key.public_key(), dt.timedelta(days=365))
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "istiod")])
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(self.root_key, hashes.SHA256())
        )
        return key_to_pem(key), cert_to_pem(cert) + self.root_pem


