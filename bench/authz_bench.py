"""Microbenchmark of L4 authorization: decisions per second of the indexed `Authorizer` at 10,
1,000 and 10,000 policies, against the naive scan of every policy (`decide_naive`) as baseline.

The policy mix is shaped like a cluster: a handful of mesh-wide (GLOBAL) policies, NAMESPACE
policies spread over one namespace per ten policies, and a fifth of the policies selector-scoped
with each workload naming two of its namespace's. Every loop is bounded by an iteration count.

    .venv/bin/python bench/authz_bench.py [--sizes 10 1000 10000] [--decisions 20000]
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import time
from collections.abc import Sequence

from ztunnel.authz import (
    Action,
    AuthorizationPolicy,
    Authorizer,
    ConnectionAttrs,
    Match,
    Scope,
    StringMatch,
    decide_naive,
)
from ztunnel.identity import SpiffeId
from ztunnel.model import Workload

WORKLOADS = 64
CONNECTIONS = 1024


def _match(rng: random.Random, namespaces: Sequence[str]) -> Match:
    ns = rng.choice(namespaces)
    kind = rng.randrange(4)
    if kind == 0:
        return Match(
            principals=(StringMatch.exact(f"cluster.local/ns/{ns}/sa/sa-{rng.randrange(4)}"),),
            destination_ports=(8080,),
        )
    if kind == 1:
        return Match(namespaces=(StringMatch.exact(ns), StringMatch.prefix("ops-")))
    if kind == 2:
        return Match(
            source_ips=(ipaddress.ip_network(f"10.{rng.randrange(256)}.0.0/16"),),
            not_destination_ports=(22,),
        )
    return Match(not_principals=(StringMatch.presence(),), destination_ports=(9090, 9091))


def _policy(
    rng: random.Random, name: str, namespace: str, scope: Scope, namespaces: Sequence[str]
) -> AuthorizationPolicy:
    action = Action.DENY if rng.random() < 0.2 else Action.ALLOW
    rules = tuple(
        tuple(
            tuple(_match(rng, namespaces) for _ in range(rng.randint(1, 2)))
            for _ in range(rng.randint(1, 2))
        )
        for _ in range(rng.randint(1, 2))
    )
    return AuthorizationPolicy(name, namespace, scope, action, rules)


def build_store(
    n: int, rng: random.Random
) -> tuple[list[AuthorizationPolicy], list[ConnectionAttrs]]:
    namespaces = [f"ns-{i}" for i in range(max(1, n // 10))]
    n_global = min(5, max(1, n // 200))
    n_selector = n // 5
    pols: list[AuthorizationPolicy] = []
    selector_by_ns: dict[str, list[str]] = {}
    for i in range(n):
        ns = namespaces[i % len(namespaces)]
        if i < n_global:
            pols.append(_policy(rng, f"global-{i}", "istio-system", Scope.GLOBAL, namespaces))
        elif i < n_global + n_selector:
            p = _policy(rng, f"sel-{i}", ns, Scope.WORKLOAD_SELECTOR, namespaces)
            selector_by_ns.setdefault(ns, []).append(p.key)
            pols.append(p)
        else:
            pols.append(_policy(rng, f"ns-{i}", ns, Scope.NAMESPACE, namespaces))
    workloads = []
    for i in range(WORKLOADS):
        ns = rng.choice(namespaces)
        named = selector_by_ns.get(ns, [])
        workloads.append(
            Workload(
                uid=f"w{i}",
                name=f"w{i}",
                namespace=ns,
                addresses=(ipaddress.ip_address(f"10.200.0.{i + 1}"),),
                authorization_policies=tuple(rng.sample(named, min(2, len(named)))),
            )
        )
    conns = []
    for _ in range(CONNECTIONS):
        wl = rng.choice(workloads)
        ident = (
            None
            if rng.random() < 0.1
            else SpiffeId("cluster.local", rng.choice(namespaces), f"sa-{rng.randrange(4)}")
        )
        conns.append(
            ConnectionAttrs(
                ident,
                ipaddress.ip_address(f"10.{rng.randrange(256)}.1.1"),
                wl.addresses[0],
                rng.choice((8080, 9090, 22, 443)),
                wl,
            )
        )
    return pols, conns


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def run(sizes: Sequence[int], decisions: int, naive_budget: int, seed: int) -> None:
    header = (
        f"{'policies':>9} {'build ms':>9} {'applicable':>10} {'indexed dec/s':>14} "
        f"{'naive dec/s':>12} {'speed-up':>9}"
    )
    print(header)
    print("-" * len(header))
    for n in sizes:
        rng = random.Random(seed)
        pols, conns = build_store(n, rng)
        t0 = time.perf_counter()
        authz = Authorizer(pols)
        build = time.perf_counter() - t0
        for c in conns:  # warm the applicability cache, as steady state would
            authz.check(c)
        t0 = time.perf_counter()
        applicable = 0
        for i in range(decisions):
            applicable += len(authz.check(conns[i % len(conns)]).applicable)
        indexed = _rate(decisions, time.perf_counter() - t0)
        # The naive scan costs O(policies) per decision: bound it by policy-visits, not time.
        naive_n = max(5, min(decisions, naive_budget // max(n, 1)))
        t0 = time.perf_counter()
        for i in range(naive_n):
            decide_naive(pols, conns[i % len(conns)])
        naive = _rate(naive_n, time.perf_counter() - t0)
        print(
            f"{n:>9} {build * 1000:>9.1f} {applicable / decisions:>10.1f} {indexed:>14,.0f} "
            f"{naive:>12,.0f} {indexed / naive:>8.0f}x"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument(
        "--decisions", type=int, default=20000, help="indexed decisions timed per size"
    )
    parser.add_argument(
        "--naive-budget",
        type=int,
        default=2_000_000,
        help="policy visits the naive baseline may spend per size",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    run(args.sizes, args.decisions, args.naive_budget, args.seed)


if __name__ == "__main__":
    main()
