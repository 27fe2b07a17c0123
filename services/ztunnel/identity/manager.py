"""The certificate manager: one certificate per workload identity, fetched on demand, cached, rotated.

Theory of operation
-------------------
`fetch_certificate(identity)` returns the cached certificate while it is valid. The first request for an
identity starts a maintenance task (in the manager's nursery) that fetches it from the CA, then sleeps until
half of its lifetime has passed (upstream ztunnel's rule) and fetches a replacement. A failed renewal keeps
the old certificate in service and retries with exponential backoff (never past the old one's expiry);
only when nothing valid is left does `fetch_certificate` raise CertificateError (with the CA's reason).
`forget(identity)` stops the maintenance (the last pod with that identity left the node).
Time comes from an injectable Clock (POSIX seconds) so tests can jump to the half-life.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio

from services.ztunnel.identity.ca_client import CaClient
from services.ztunnel.identity.errors import CertificateError
from shared.identity import CertBundle, IdentityError, SpiffeId, load_cert
from shared.logs import Display, format_timestamp

log = logging.getLogger(__name__)


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


_PEM_END = "-----END CERTIFICATE-----"


def split_pem(text: str) -> list[str]:
    """The certificates of a PEM text, each as its own PEM block (with a trailing newline)."""
    return [block.strip() + "\n" + _PEM_END + "\n" for block in text.split(_PEM_END)[:-1]]


def _cert_dump(pem: str) -> dict[str, str]:
    out = {"pem": base64.b64encode(pem.encode()).decode(), "serialNumber": "", "validFrom": "",
           "expirationTime": ""}
    try:
        cert = load_cert(pem)
    except IdentityError:  # a chain member the CA sent but nothing could parse: shown, without its facts
        return out
    out.update(serialNumber=str(cert.serial_number),
               validFrom=_rfc3339(cert.not_valid_before_utc.timestamp()),
               expirationTime=_rfc3339(cert.not_valid_after_utc.timestamp()))
    return out


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock time, POSIX seconds (certificate validity is wall-clock)."""
        ...

    async def sleep_until(self, deadline: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        # Re-check in bounded steps: the wall clock may jump (NTP, suspend).
        # (Not a trio.Event: nothing sets an event when wall-clock time passes.)
        while (remaining := deadline - time.time()) > 0:  # noqa: ASYNC110
            await trio.sleep(min(remaining, 60.0))


class _Entry:
    def __init__(self) -> None:
        self.bundle: CertBundle | None = None
        self.error: CertificateError | None = None
        self.attempted = trio.Event()
        self.updated = trio.Event()
        self.scope = trio.CancelScope()


class CertificateManager:
    def __init__(
        self,
        ca: CaClient,
        nursery: trio.Nursery,
        *,
        clock: Clock | None = None,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
    ) -> None:
        self._ca = ca
        self._nursery = nursery
        self.clock: Clock = clock or SystemClock()
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._entries: dict[SpiffeId, _Entry] = {}
        self.fetches = 0

    def _valid(self, bundle: CertBundle | None) -> bool:
        return bundle is not None and self.clock.now() < bundle.not_after

    def cached(self, identity: SpiffeId) -> CertBundle | None:
        entry = self._entries.get(identity)
        return entry.bundle if entry is not None and self._valid(entry.bundle) else None

    async def fetch_certificate(self, identity: SpiffeId) -> CertBundle:
        """The current certificate for `identity`, fetching it first if needed. Raises CertificateError."""
        entry = self._entries.get(identity)
        if entry is None:
            entry = self._entries[identity] = _Entry()
            self._nursery.start_soon(self._maintain, identity, entry)
        await entry.attempted.wait()
        if entry.bundle is not None and self._valid(entry.bundle):
            return entry.bundle
        raise entry.error or CertificateError(f"no valid certificate for {identity.uri}")

    async def wait_renewed(self, identity: SpiffeId, than: CertBundle) -> CertBundle:
        """Return the identity's certificate once it differs from `than`."""
        while True:
            entry = self._entries.get(identity)
            if entry is None:
                raise CertificateError(f"{identity.uri} is not managed")
            if entry.bundle is not None and entry.bundle != than:
                return entry.bundle
            await entry.updated.wait()

    def dump(self) -> list[dict[str, Any]]:
        """Every managed identity's certificates in upstream ztunnel's config-dump shape, sorted by identity:
        `identity`, `state` (`Initializing`, `Available`, or `Unavailable: <reason>`), `certChain` (leaf and
        intermediates) and `rootCerts` (the last certificate of the CA's chain), each certificate with
        `pem` (base64 of the PEM text), `serialNumber` (decimal), `validFrom`, `expirationTime` (RFC 3339)."""
        out: list[dict[str, Any]] = []
        for identity, entry in sorted(self._entries.items()):
            bundle = entry.bundle
            if bundle is None:
                state = f"Unavailable: {entry.error}" if entry.attempted.is_set() else "Initializing"
            elif self._valid(bundle):
                state = "Available"
            else:
                reason = entry.error or f"the certificate expired at {_rfc3339(bundle.not_after)}"
                state = f"Unavailable: {reason}"
            chain = bundle.cert_chain if bundle is not None else ()
            # The CA answers one chain, root last (several roots may share that last PEM text).
            leaf_and_intermediates = chain[:-1] if len(chain) > 1 else chain
            roots = split_pem(chain[-1]) if len(chain) > 1 else []
            out.append({"identity": identity.uri, "state": state,
                        "certChain": [_cert_dump(pem) for pem in leaf_and_intermediates],
                        "rootCerts": [_cert_dump(pem) for pem in roots]})
        return out

    def forget(self, identity: SpiffeId) -> None:
        """Stop caching and rotating `identity`."""
        entry = self._entries.pop(identity, None)
        if entry is not None:
            entry.scope.cancel()

    def _set(self, entry: _Entry, bundle: CertBundle | None, error: CertificateError | None) -> None:
        if bundle is not None:
            entry.bundle = bundle
        entry.error = error
        entry.attempted.set()
        entry.updated.set()
        entry.updated = trio.Event()

    async def _fetch(self, identity: SpiffeId) -> CertBundle:
        self.fetches += 1
        try:
            return await self._ca.fetch(identity)
        except CertificateError:
            raise
        except Exception as exc:
            # A bug or an unexpected failure in a CaClient must not take every identity's rotation down with
            # it: treat it like a refused request (logged with its traceback, retried with backoff).
            log.exception("unexpected error fetching a certificate",
                          extra={"fields": [("identity", identity.uri)]})
            raise CertificateError(f"fetching a certificate for {identity.uri} failed: {exc!r}") from exc

    async def _maintain(self, identity: SpiffeId, entry: _Entry) -> None:
        with entry.scope:
            backoff = self._retry_initial
            while True:
                try:
                    bundle = await self._fetch(identity)
                except CertificateError as exc:
                    self._set(entry, None, exc)
                    old = entry.bundle
                    retry_at = self.clock.now() + backoff
                    if old is not None and self._valid(old):
                        log.warning("renewing the certificate failed, keeping the current one",
                                    extra={"fields": [("identity", identity.uri), ("error", str(exc))]})
                        retry_at = min(retry_at, old.not_after)
                    else:
                        log.warning("no certificate; retrying", extra={"fields": [
                            ("identity", identity.uri), ("error", str(exc)), ("backoff", f"{backoff:.0f}s")]})
                    await self.clock.sleep_until(retry_at)
                    backoff = min(backoff * 2, self._retry_max)
                    continue
                backoff = self._retry_initial
                self._set(entry, bundle, None)
                log.info("certificate fetched", extra={"fields": [
                    ("identity", identity.uri), ("expiration", Display(format_timestamp(bundle.not_after)))]})
                await self.clock.sleep_until(bundle.refresh_at)


@asynccontextmanager
async def open_certificate_manager(
    ca: CaClient, *, clock: Clock | None = None, retry_initial: float = 1.0, retry_max: float = 60.0
) -> AsyncIterator[CertificateManager]:
    """A CertificateManager whose maintenance tasks live (and die) with this block."""
    async with trio.open_nursery() as nursery:
        manager = CertificateManager(
            ca, nursery, clock=clock, retry_initial=retry_initial, retry_max=retry_max
        )
        try:
            yield manager
        finally:
            nursery.cancel_scope.cancel()
