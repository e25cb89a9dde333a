"""`CertificateManager`: single flight, renewal at half-life, backoff with jitter while the old
certificate stays in use. Fake certificate sources; no sockets."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import subprocess
import sys
import time

import pytest

from ztunnel.ca import CertificateAuthority, IssuedCertificate
from ztunnel.certs import BACKOFF_MAX, CertificateManager, LocalCaSource
from ztunnel.errors import CertificateError, ZtunnelError
from ztunnel.identity import SpiffeId
from ztunnel.testing import async_wait_for

pytestmark = pytest.mark.unit

ID = SpiffeId("cluster.local", "shop", "echo")
CA = CertificateAuthority.create("cluster.local")
TEMPLATE = CA.issue(ID)


def cert_valid(not_before: dt.datetime, not_after: dt.datetime) -> IssuedCertificate:
    """A certificate record with the given validity (the manager only reads the times)."""
    return IssuedCertificate(
        ID, TEMPLATE.key_pem, TEMPLATE.chain_pem, TEMPLATE.roots_pem, not_before, not_after
    )


class FakeSource:
    """Hands out certificates from `make()`; fails while `failures` > 0; counts calls."""

    def __init__(self, make, gate: asyncio.Event | None = None) -> None:  # type: ignore[no-untyped-def]
        self.make = make
        self.gate = gate
        self.calls: list[float] = []
        self.failures = 0
        self.error: Exception = CertificateError("CA unavailable")

    async def fetch(self, identity: SpiffeId) -> IssuedCertificate:
        self.calls.append(time.monotonic())
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        return self.make()


class LowJitter(random.Random):
    """Jitter always at the bottom of its range, so delays are predictable."""

    def uniform(self, a: float, b: float) -> float:
        return a


def utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def test_single_flight_for_concurrent_gets() -> None:
    gate = asyncio.Event()
    src = FakeSource(lambda: CA.issue(ID), gate)
    mgr = CertificateManager(src)
    try:
        tasks = [asyncio.ensure_future(mgr.get(ID)) for _ in range(50)]
        await async_wait_for(lambda: len(src.calls) >= 1, 5)
        await asyncio.sleep(0)
        gate.set()
        certs = await asyncio.gather(*tasks)
        assert len(src.calls) == 1
        assert all(c is certs[0] for c in certs)
        # Cached afterwards: no new fetch.
        assert await mgr.get(ID) is certs[0]
        assert len(src.calls) == 1
    finally:
        await mgr.close()


async def test_failed_fetch_reaches_every_waiter_and_the_next_get_retries() -> None:
    gate = asyncio.Event()
    src = FakeSource(lambda: CA.issue(ID), gate)
    src.failures = 1
    mgr = CertificateManager(src)
    try:
        tasks = [asyncio.ensure_future(mgr.get(ID)) for _ in range(5)]
        await async_wait_for(lambda: len(src.calls) >= 1, 5)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, CertificateError) for r in results), results
        assert len(src.calls) == 1
        assert (await mgr.get(ID)).identity == ID
        assert len(src.calls) == 2
    finally:
        await mgr.close()


async def test_foreign_errors_are_translated() -> None:
    src = FakeSource(lambda: CA.issue(ID))
    src.failures, src.error = 1, RuntimeError("socket exploded")
    mgr = CertificateManager(src)
    try:
        with pytest.raises(CertificateError, match="socket exploded"):
            await mgr.get(ID)
    finally:
        await mgr.close()


async def test_renewal_at_half_life_with_an_injected_clock() -> None:
    """A 24 h certificate; the injected clock says we are 0.3 s before its half-life."""
    t0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    offset = dt.timedelta(hours=12) - dt.timedelta(seconds=0.3)
    started = utc()
    clock = lambda: t0 + offset + (utc() - started)  # noqa: E731
    made = []

    def make() -> IssuedCertificate:
        c = (
            cert_valid(t0, t0 + dt.timedelta(hours=24))
            if not made
            else cert_valid(t0 + dt.timedelta(hours=12), t0 + dt.timedelta(hours=36))
        )
        made.append(c)
        return c

    src = FakeSource(make)
    mgr = CertificateManager(src, now=clock)
    renewed: list[IssuedCertificate] = []
    mgr.on_renewed(ID, renewed.append)
    try:
        first = await mgr.get(ID)
        assert mgr.renew_at(first) == t0 + dt.timedelta(hours=12)
        t_first = time.monotonic()
        await async_wait_for(lambda: len(src.calls) >= 2, 5)
        waited = src.calls[1] - t_first
        assert 0.2 <= waited <= 2.0, waited
        await async_wait_for(lambda: mgr.cached(ID) is made[1], 5)
        assert await mgr.get(ID) is made[1]
        assert renewed[-1] is made[1]
        # The next renewal is a half-life later, not now.
        await asyncio.sleep(0.3)
        assert len(src.calls) == 2
    finally:
        await mgr.close()


SHORT_TTL_SCRIPT = """
import asyncio, datetime as dt, sys
from ztunnel.ca import CertificateAuthority
from ztunnel.certs import CertificateManager, LocalCaSource
from ztunnel.identity import SpiffeId

async def main():
    ident = SpiffeId("cluster.local", "shop", "echo")
    src = LocalCaSource(CertificateAuthority.create("cluster.local"), ttl=dt.timedelta(seconds=4))
    calls = 0
    fetch = src.fetch
    async def counting(identity):
        nonlocal calls
        calls += 1
        return await fetch(identity)
    src.fetch = counting
    mgr = CertificateManager(src)
    first = await mgr.get(ident)
    for _ in range(500):
        if mgr.cached(ident) is not first:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)
    print("renewed", mgr.cached(ident) is not first, "fetches", calls, flush=True)
    await mgr.close()

asyncio.run(main())
"""


def test_renewal_with_a_short_real_ttl() -> None:
    """LocalCaSource with a 4 s TTL renews before expiry, and not in a loop. Run in a child
    process: a renewal loop that never yields would hang this test's event loop for good."""
    try:
        res = subprocess.run(
            [sys.executable, "-c", SHORT_TTL_SCRIPT], capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the event loop hung: the renewal loop never yields (fetch after fetch)")
    assert res.returncode == 0, res.stderr
    words = res.stdout.split()
    assert words[:2] == ["renewed", "True"], res.stdout
    assert int(words[3]) <= 5, f"{words[3]} certificates fetched within ~5 s"


async def test_no_tight_loop_when_a_certificate_is_already_past_half_life() -> None:
    """A CA that hands out certificates whose half-life has already passed (short TTL, clock
    skew) must not be asked again and again without pause."""
    src = FakeSource(
        lambda: cert_valid(utc() - dt.timedelta(seconds=60), utc() + dt.timedelta(seconds=30))
    )
    mgr = CertificateManager(src)
    try:
        await mgr.get(ID)
        await asyncio.sleep(0.5)
        assert len(src.calls) <= 10, f"{len(src.calls)} fetches in 0.5 s"
    finally:
        await mgr.close()


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    mgr = CertificateManager(FakeSource(lambda: TEMPLATE), rng=random.Random(7))
    for n in range(1, 15):
        base = min(BACKOFF_MAX, 0.5 * 2 ** (n - 1))
        values = [mgr.backoff(n) for _ in range(200)]
        assert all(0 < v <= base for v in values), n
        assert min(values) >= base * 0.25, n  # jitter shrinks the delay, it does not zero it
        assert len(set(values)) > 100, "no jitter"
    assert 0.25 <= mgr.backoff(1) <= 0.5
    assert max(mgr.backoff(30) for _ in range(100)) <= 150.0
    assert BACKOFF_MAX == 150.0


async def test_failed_renewal_backs_off_and_keeps_the_old_certificate() -> None:
    now = utc()
    first = cert_valid(now - dt.timedelta(hours=13), now + dt.timedelta(hours=11))
    fresh = cert_valid(now, now + dt.timedelta(hours=24))
    certs = iter([first, fresh])
    src = FakeSource(lambda: next(certs))
    mgr = CertificateManager(src, rng=LowJitter())
    try:
        assert await mgr.get(ID) is first
        # Past half-life: the renewal starts at once, and the CA is down for three tries.
        src.failures = 3
        await async_wait_for(lambda: len(src.calls) >= 3, 5)
        # Meanwhile the still-valid certificate keeps being served, without new fetches.
        n = len(src.calls)
        assert await mgr.get(ID) is first
        assert len(src.calls) == n
        await async_wait_for(lambda: mgr.cached(ID) is fresh, 10)
        gaps = [b - a for a, b in zip(src.calls[1:], src.calls[2:], strict=False)]
        # LowJitter: 0.25 s, 0.5 s, 1 s - each wait about twice the previous one.
        assert len(gaps) == 3, gaps
        assert 0.2 <= gaps[0] <= 0.6, gaps
        assert gaps[1] >= gaps[0] * 1.6 and gaps[2] >= gaps[1] * 1.6, gaps
        snap = {e["identity"]: e for e in mgr.snapshot()}
        assert snap[ID.uri]["last_error"] is None
    finally:
        await mgr.close()


async def test_any_source_error_during_renewal_is_retried() -> None:
    """A source may fail with any ZtunnelError (not only CertificateError): still retried."""
    now = utc()
    first = cert_valid(now - dt.timedelta(hours=13), now + dt.timedelta(hours=11))
    fresh = cert_valid(now, now + dt.timedelta(hours=24))
    certs = iter([first, fresh])
    src = FakeSource(lambda: next(certs))
    mgr = CertificateManager(src, rng=LowJitter())
    try:
        await mgr.get(ID)
        src.failures, src.error = 1, ZtunnelError("upstream CA said no")
        await async_wait_for(lambda: mgr.cached(ID) is fresh, 5)
    finally:
        await mgr.close()


async def test_expired_certificate_is_not_served() -> None:
    now = utc()
    src = FakeSource(lambda: cert_valid(now - dt.timedelta(hours=2), now - dt.timedelta(hours=1)))
    mgr = CertificateManager(src)
    try:
        assert mgr.cached(ID) is None
        src.failures = 100
        with pytest.raises(CertificateError):
            await mgr.get(ID)
    finally:
        await mgr.close()


async def test_local_ca_source_refuses_a_foreign_trust_domain() -> None:
    mgr = CertificateManager(LocalCaSource(CA))
    try:
        with pytest.raises(CertificateError, match=r"other\.local"):
            await mgr.get(SpiffeId("other.local", "shop", "echo"))
        cert = await mgr.get(ID)
        assert cert.identity == ID
    finally:
        await mgr.close()


async def test_close_stops_renewal() -> None:
    now = utc()
    src = FakeSource(lambda: cert_valid(now, now + dt.timedelta(seconds=1)))
    mgr = CertificateManager(src)
    await mgr.get(ID)
    await mgr.close()
    n = len(src.calls)
    await asyncio.sleep(0.8)
    assert len(src.calls) == n
