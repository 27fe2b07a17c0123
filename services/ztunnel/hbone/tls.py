"""TLS for HBONE with pyOpenSSL: contexts per workload identity and SPIFFE peer verification.

Both sides: TLS 1.3 only (AES-256-GCM / AES-128-GCM suites), ALPN `h2`, the workload's key and certificate
chain from memory, the mesh roots as the only trust anchors, no session resumption (no tickets, no cache).

* Client: no SNI; the server's chain must verify to the roots and one of its URI SANs must equal one of the
  expected identities (the destination workload's, plus any service SANs). The expected set differs per
  connection, so it travels on the `SSL.Connection` (app data) and the context can be shared per source
  identity.
* Server: a client certificate is required; its chain must verify to the roots and its SPIFFE id must be in
  the server certificate's trust domain.

Identity checks happen in the verify callback, during the handshake: a mismatch aborts it with a
certificate alert before any application byte moves; the callback leaves the reason on the connection
(`identity_failure`) and the handshake raises `PeerIdentityError` with it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from OpenSSL import SSL, crypto

from services.ztunnel.hbone.errors import PeerIdentityError, TlsError
from shared.identity import CertBundle, IdentityError, SpiffeId, load_cert, load_key, uri_sans

ALPN_H2: Final = b"h2"
TLS13_CIPHERSUITES: Final = b"TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"


@dataclass(slots=True)
class _VerifyState:
    """App data of every HBONE `SSL.Connection`: who the peer must be, and why it was refused."""

    expected: frozenset[str] = frozenset()
    failure: str | None = None


def identity_failure(conn: SSL.Connection) -> str | None:
    """Why the verify callback refused the peer's identity (None if it did not)."""
    state = conn.get_app_data()
    return state.failure if isinstance(state, _VerifyState) else None


def spiffe_of(cert: x509.Certificate) -> SpiffeId | None:
    """The first URI SAN that is a SPIFFE workload id (upstream reports that one as the peer identity)."""
    for uri in uri_sans(cert):
        try:
            return SpiffeId.parse(uri)
        except IdentityError:
            continue
    return None


def default_roots(bundle: CertBundle) -> tuple[str, ...]:
    """The trust anchors when none are configured: the last certificate of the CA's chain (its root)."""
    if len(bundle.cert_chain) < 2:
        raise TlsError(f"no trust roots for {bundle.identity}: the certificate chain has no root")
    return bundle.cert_chain[-1:]


def _base_context(bundle: CertBundle, roots: Sequence[str]) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_tls13_ciphersuites(TLS13_CIPHERSUITES)
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    try:
        # pyOpenSSL >= 25 takes cryptography objects (its own X509/PKey are deprecated); the stubs are older.
        ctx.use_certificate(load_cert(bundle.leaf_pem))  # type: ignore[arg-type]
        for pem in bundle.cert_chain[1:]:
            ctx.add_extra_chain_cert(load_cert(pem))  # type: ignore[arg-type]
        ctx.use_privatekey(load_key(bundle.key_pem))  # type: ignore[arg-type]
        ctx.check_privatekey()
        store = ctx.get_cert_store()
        assert store is not None
        for pem in roots:
            store.add_cert(crypto.X509.from_cryptography(load_cert(pem)))
    except (IdentityError, SSL.Error, crypto.Error) as exc:
        raise TlsError(f"cannot use the certificate of {bundle.identity}: {exc}") from None
    return ctx


def client_context(bundle: CertBundle, roots: Sequence[str]) -> SSL.Context:
    """A client context presenting `bundle`; connections get their expected peers from `client_connection`."""
    ctx = _base_context(bundle, roots)

    def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if not ok or depth > 0:
            return bool(ok)
        state: _VerifyState = conn.get_app_data()
        presented = uri_sans(cert.to_cryptography())
        if not state.expected.intersection(presented):
            state.failure = (f"the server presented identity {', '.join(presented) or '(none)'}, expected "
                             f"{' or '.join(sorted(state.expected))}")
            return False  # aborts the handshake with a certificate alert
        return True

    ctx.set_verify(SSL.VERIFY_PEER, verify)
    ctx.set_alpn_protos([ALPN_H2])
    return ctx


def server_context(bundle: CertBundle, roots: Sequence[str]) -> SSL.Context:
    """A server context presenting `bundle`, requiring a client certificate of the same trust domain."""
    ctx = _base_context(bundle, roots)
    trust_domain = bundle.identity.trust_domain

    def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if not ok or depth > 0:
            return bool(ok)
        state: _VerifyState = conn.get_app_data()
        peer = spiffe_of(cert.to_cryptography())
        if peer is None:
            state.failure = "the client certificate carries no SPIFFE identity"
            return False
        if peer.trust_domain != trust_domain:
            state.failure = (f"the client identity {peer} is not in this workload's trust domain "
                             f"{trust_domain!r}")
            return False
        return True

    def select_alpn(conn: SSL.Connection, offered: list[bytes]) -> Any:
        return ALPN_H2 if ALPN_H2 in offered else SSL.NO_OVERLAPPING_PROTOCOLS

    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
    ctx.set_alpn_select_callback(select_alpn)
    return ctx


class TlsContextCache:
    """One client and one server context per workload identity, rebuilt when its certificate changes.

    Building a context parses keys and certificates (about a millisecond); connections are made per stream
    burst, so contexts are shared. Args: `roots`: PEM trust anchors (None: the root that ends each chain).
    """

    def __init__(self, roots: Sequence[str] | None = None) -> None:
        self.roots = tuple(roots) if roots is not None else None
        self._cache: dict[tuple[str, SpiffeId], tuple[CertBundle, SSL.Context]] = {}

    def _get(self, role: str, bundle: CertBundle) -> SSL.Context:
        hit = self._cache.get((role, bundle.identity))
        if hit is not None and hit[0] == bundle:
            return hit[1]
        roots = self.roots if self.roots is not None else default_roots(bundle)
        ctx = client_context(bundle, roots) if role == "client" else server_context(bundle, roots)
        self._cache[(role, bundle.identity)] = (bundle, ctx)
        return ctx

    def client(self, bundle: CertBundle) -> SSL.Context:
        return self._get("client", bundle)

    def server(self, bundle: CertBundle) -> SSL.Context:
        return self._get("server", bundle)

    def forget(self, identity: SpiffeId) -> None:
        """Drop an identity's contexts (its workload left the node)."""
        self._cache.pop(("client", identity), None)
        self._cache.pop(("server", identity), None)


def client_connection(ctx: SSL.Context, sock: Any, expected: Collection[SpiffeId]) -> SSL.Connection:
    """A client-side `SSL.Connection` on `sock` that accepts only a server presenting one of `expected`."""
    if not expected:
        raise TlsError("no expected server identity: refusing to connect without one")
    conn = SSL.Connection(ctx, sock)
    conn.set_app_data(_VerifyState(expected=frozenset(identity.uri for identity in expected)))
    conn.set_connect_state()  # no set_tlsext_host_name: SNI stays off, as upstream
    return conn


def server_connection(ctx: SSL.Context, sock: Any) -> SSL.Connection:
    conn = SSL.Connection(ctx, sock)
    conn.set_app_data(_VerifyState())
    conn.set_accept_state()
    return conn


def check_established(conn: SSL.Connection) -> SpiffeId:
    """After the handshake: TLS 1.3 with ALPN h2, and the peer's SPIFFE id (verified by the callback).

    Raises:
        TlsError: no h2, not TLS 1.3, or no peer certificate (cannot happen with the contexts above).
    """
    if conn.get_protocol_version_name() != "TLSv1.3":
        raise TlsError(f"negotiated {conn.get_protocol_version_name()}, only TLS 1.3 is accepted")
    if conn.get_alpn_proto_negotiated() != ALPN_H2:
        raise TlsError("the peer did not negotiate ALPN h2 (is it an HBONE endpoint?)")
    cert = conn.get_peer_certificate()
    peer = spiffe_of(cert.to_cryptography()) if cert is not None else None
    if peer is None:
        raise PeerIdentityError("the peer presented no SPIFFE identity")
    return peer


def describe_ssl_error(exc: BaseException) -> str:
    """`SSL.Error([('SSL routines', '', 'tlsv1 alert unknown ca')])` -> `tlsv1 alert unknown ca`."""
    if isinstance(exc, SSL.SysCallError):
        return "connection closed by the peer during TLS" if exc.args[0] == -1 else f"TLS I/O error: {exc}"
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        reasons = [str(item[-1]) for item in exc.args[0] if isinstance(item, tuple) and item]
        if reasons:
            return "; ".join(reasons)
    return str(exc) or type(exc).__name__
