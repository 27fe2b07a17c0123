"""Where and how to reach a gRPC server (istiod): `GrpcTarget`, built from upstream-style settings.

Kept apart from shared.aio (which re-exports it) so that reading a configuration does not import asyncio,
trio_asyncio and grpclib: a ztunnel without XDS_ADDRESS never loads them.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

import msgspec

from shared.addr import AddressError, split_host_port

__all__ = ["GrpcTarget", "client_tls_context"]


def client_tls_context(root_pem: str) -> ssl.SSLContext:
    """A client TLS context trusting only `root_pem` (the stub's root-cert.pem), ALPN h2, hostname checked.

    Raises:
        ValueError: `root_pem` is empty (ssl would silently trust the system store instead).
    """
    if not root_pem.strip():
        raise ValueError("no root certificate given; refusing to trust the system store instead")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=root_pem)
    ctx.set_alpn_protocols(["h2"])
    return ctx


class GrpcTarget(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how to reach a gRPC server (istiod): address, TLS root (None = plaintext), bearer token and
    extra metadata (upstream's XDS_HEADER_* / CA_HEADER_*)."""

    host: str
    port: int
    root_cert_pem: str | None = None
    token: str | None = None
    headers: dict[str, str] = {}
    keepalive: float | None = 10.0
    keepalive_timeout: float = 20.0

    def call_metadata(self) -> dict[str, str]:
        md = dict(self.headers)
        if self.token:
            md["authorization"] = f"Bearer {self.token}"
        return md

    @classmethod
    def from_env(
        cls,
        kind: str,
        environ: Mapping[str, str],
        *,
        default_address: str = "https://istiod.istio-system.svc:15012",
    ) -> GrpcTarget:
        """Build from upstream-style settings: `<KIND>_ADDRESS` (https://host:port, or http:// for plaintext),
        `<KIND>_ROOT_CERT` (default ./var/run/secrets/istio/root-cert.pem), `<KIND>_TOKEN_FILE` (default
        ./var/run/secrets/tokens/istio-token; missing file = no token), `<KIND>_HEADER_<name>` extra metadata.

        Raises:
            ValueError: an address that is not [scheme://]host:port, or an unreadable root certificate.
        """
        address = environ.get(f"{kind}_ADDRESS", default_address)
        scheme, sep, rest = address.partition("://")
        if not sep:
            scheme, rest = "https", address
        try:
            host, port = split_host_port(rest.rstrip("/"))
        except AddressError as exc:
            problem = exc.problem.replace("host:port", "[https://]HOST:PORT", 1)
            raise ValueError(f"{kind}_ADDRESS={address!r} {problem}") from None
        if port == 0:
            raise ValueError(f"{kind}_ADDRESS={address!r} has port 0, which nothing listens on; use 1-65535")
        root = None
        if scheme != "http":
            root_path = environ.get(f"{kind}_ROOT_CERT", "./var/run/secrets/istio/root-cert.pem")
            if not root_path:
                raise ValueError(f"{kind}_ROOT_CERT is set but empty; set it to the stub's root-cert.pem "
                                 "(the system trust store is never used)")
            try:
                with open(root_path) as f:
                    root = f.read()
                if not root.strip():
                    raise ValueError(f"{kind}_ROOT_CERT {root_path} is empty; it must hold the stub's root "
                                     "certificate (the system trust store is never used)")
                client_tls_context(root)
            except ssl.SSLError as exc:
                raise ValueError(f"{kind}_ROOT_CERT {root_path} is not a PEM certificate: {exc}") from None
            except OSError as exc:
                raise ValueError(
                    f"cannot read the root certificate {root_path} ({exc.strerror}); "
                    f"set {kind}_ROOT_CERT to the stub's root-cert.pem (or use an http:// address: plaintext)"
                ) from None
        token = None
        token_path = environ.get(f"{kind}_TOKEN_FILE", "./var/run/secrets/tokens/istio-token")
        try:
            with open(token_path) as f:
                token = f.read().strip() or None
        except OSError:
            token = None
        prefix = f"{kind}_HEADER_"
        headers = {
            k[len(prefix) :].lower().replace("_", "-"): v for k, v in environ.items() if k.startswith(prefix)
        }
        return cls(host=host, port=port, root_cert_pem=root, token=token, headers=headers)
