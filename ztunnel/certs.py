"""Where workload certificates come from, and the cache that keeps them fresh.

`CertificateSource` is the seam: the built-in CA (`LocalCaSource`) or Istio's CA over gRPC
(`ztunnel.istioca`). `CertificateManager` issues on demand (single-flight per identity), renews
at half-life and backs off exponentially on failure while the still-valid certificate stays in
use; identities that are no longer wanted are forgotten (`retain`), and a source whose trust
roots change (`TrustBundleSource`) has them applied to every held certificate at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from ztunnel.ca import CertificateAuthority, IssuedCertificate
from ztunnel.errors import CertificateError, ZtunnelError
from ztunnel.identity import SpiffeId

log = logging.getLogger(__name__)

BACKOFF_START = 0.5
BACKOFF_MAX = 150.0


class CertificateSource(Protocol):
    """Anything that can produce a certificate for an identity."""

    async def fetch(self, identity: SpiffeId) -> IssuedCertificate: ...


@runtime_checkable
class TrustBundleSource(Protocol):
    """A source whose trust roots can change between certificates (root rotation): it calls
    back with the whole current bundle whenever it changes."""

    def watch_roots(self, callback: Callable[[tuple[bytes, ...]], None]) -> None: ...


class LocalCaSource:
    """Signs with a CA held by this agent (`ztunnel run --ca-dir`)."""

    def __init__(self, ca: CertificateAuthority, ttl: dt.timedelta | None = None) -> None:
        self.ca = ca
        self.ttl = ttl

    async def fetch(self, identity: SpiffeId) -> IssuedCertificate:
        if identity.trust_domain != self.ca.trust_domain:
            raise CertificateError(
                f"identity {identity} is outside this CA's trust domain {self.ca.trust_domain}"
            )
        if self.ttl is not None:
            return self.ca.issue(identity, ttl=self.ttl)
        return self.ca.issue(identity)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class _Entry:
    cert: IssuedCertificate | None = None
    pending: asyncio.Future[IssuedCertificate] | None = None
    renewer: asyncio.Task[None] | None = None
    failures: int = 0
    aged: bool = False  # the last renewal already returned a certificate past half-life
    last_error: str | None = None
    listeners: list[Callable[[IssuedCertificate], None]] = field(default_factory=list)


class CertificateManager:
    """Caches one certificate per identity and renews it in the background."""

    def __init__(
        self,
        source: CertificateSource,
        now: Callable[[], dt.datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.source = source
        self._now = now
        self._rng = rng or random.Random()
        self._entries: dict[SpiffeId, _Entry] = {}
        self._closed = False
        if isinstance(source, TrustBundleSource):
            source.watch_roots(self.update_roots)

    def cached(self, identity: SpiffeId) -> IssuedCertificate | None:
        entry = self._entries.get(identity)
        if entry and entry.cert and entry.cert.not_after > self._now():
            return entry.cert
        return None

    def on_renewed(self, identity: SpiffeId, callback: Callable[[IssuedCertificate], None]) -> None:
        self._entries.setdefault(identity, _Entry()).listeners.append(callback)

    async def get(self, identity: SpiffeId) -> IssuedCertificate:
        """A valid certificate for `identity`, fetched at most once at a time."""
        cert = self.cached(identity)
        if cert is not None:
            return cert
        entry = self._entries.setdefault(identity, _Entry())
        if entry.pending is None:
            entry.pending = asyncio.get_running_loop().create_future()
            pending = entry.pending
            try:
                cert = await self._fetch(identity)
            except BaseException as e:
                entry.pending = None
                entry.last_error = str(e)
                if not pending.done():
                    pending.set_exception(
                        e if isinstance(e, ZtunnelError) else CertificateError(str(e))
                    )
                    pending.exception()  # mark retrieved: waiters may not exist
                raise
            entry.pending = None
            if self._entries.get(identity) is entry:  # not forgotten meanwhile
                self._store(identity, entry, cert)
            pending.set_result(cert)
            return cert
        return await asyncio.shield(entry.pending)

    async def _fetch(self, identity: SpiffeId) -> IssuedCertificate:
        try:
            return await self.source.fetch(identity)
        except ZtunnelError:
            raise
        except Exception as e:  # a source's foreign error, translated here
            raise CertificateError(f"certificate for {identity}: {e}") from e

    def _store(self, identity: SpiffeId, entry: _Entry, cert: IssuedCertificate) -> None:
        entry.cert = cert
        entry.failures = 0
        entry.last_error = None
        for cb in list(entry.listeners):
            cb(cert)
        if entry.renewer is None and not self._closed:
            entry.renewer = asyncio.get_running_loop().create_task(
                self._renew_loop(identity, entry), name=f"cert-renew:{identity}"
            )

    def update_roots(self, roots: tuple[bytes, ...]) -> None:
        """Trust `roots` with every held certificate now, not only after its next renewal: a
        peer signed by a new root verifies at once, one signed by a retired root stops."""
        for entry in self._entries.values():
            if entry.cert is not None and entry.cert.roots_pem != roots:
                entry.cert = replace(entry.cert, roots_pem=roots)
                for cb in list(entry.listeners):
                    cb(entry.cert)

    def forget(self, identity: SpiffeId) -> None:
        """Drop an identity's certificate and stop renewing it (its workloads left the node).
        A fetch in flight still answers its waiters."""
        entry = self._entries.pop(identity, None)
        if entry is not None and entry.renewer is not None:
            entry.renewer.cancel()

    def retain(self, wanted: set[SpiffeId]) -> list[SpiffeId]:
        """Forget every identity not in `wanted`; returns the forgotten ones."""
        gone = [ident for ident in self._entries if ident not in wanted]
        for ident in gone:
            self.forget(ident)
        return gone

    def renew_at(self, cert: IssuedCertificate) -> dt.datetime:
        """Half-life, as Istio does."""
        return cert.not_before + (cert.not_after - cert.not_before) / 2

    def backoff(self, failures: int) -> float:
        base: float = min(BACKOFF_MAX, BACKOFF_START * (2 ** max(0, failures - 1)))
        return base * float(self._rng.uniform(0.5, 1.0))

    def renewal_delay(self, cert: IssuedCertificate, aged_again: bool = False) -> float:
        """Seconds until the next renewal: at half-life. A certificate already past it is
        renewed at once, but if its replacement came back aged too (short TTLs, backdating,
        clock skew) the next try waits half of what remains: no tight loop."""
        now = self._now()
        remaining = (cert.not_after - now).total_seconds()
        if remaining <= 0:
            return BACKOFF_START
        until_half_life = (self.renew_at(cert) - now).total_seconds()
        if until_half_life > 0:
            return until_half_life
        return remaining / 2 if aged_again else 0.0

    async def _renew_loop(self, identity: SpiffeId, entry: _Entry) -> None:
        while not self._closed and self._entries.get(identity) is entry:
            assert entry.cert is not None
            if entry.failures:
                delay = self.backoff(entry.failures)
            else:
                delay = self.renewal_delay(entry.cert, entry.aged)
            await asyncio.sleep(delay)
            try:
                cert = await self._fetch(identity)
            except ZtunnelError as e:
                entry.failures += 1
                entry.last_error = str(e)
                log.warning(
                    "certificate renewal for %s failed (attempt %d): %s",
                    identity,
                    entry.failures,
                    e,
                )
                continue
            if self._entries.get(identity) is not entry:
                return
            self._store(identity, entry, cert)
            entry.aged = self.renewal_delay(cert) <= 0
            log.info("renewed certificate for %s, valid until %s", identity, cert.not_after)

    def snapshot(self) -> list[dict[str, object]]:
        """For the admin API: every cached identity with its validity and state."""
        out: list[dict[str, object]] = []
        for ident, e in sorted(self._entries.items()):
            out.append(
                {
                    "identity": ident.uri,
                    "state": "available" if e.cert else ("pending" if e.pending else "missing"),
                    "not_before": e.cert.not_before.isoformat() if e.cert else None,
                    "not_after": e.cert.not_after.isoformat() if e.cert else None,
                    "renew_at": self.renew_at(e.cert).isoformat() if e.cert else None,
                    "last_error": e.last_error,
                }
            )
        return out

    async def close(self) -> None:
        self._closed = True
        tasks = [e.renewer for e in self._entries.values() if e.renewer]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
