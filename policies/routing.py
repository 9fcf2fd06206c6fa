"""Routers pick the replica for each admitted request from read-only replica views.

Routers get the replicas they may choose from (all of them, or the active ones under autoscaling) and return
a position in that list. A view offers: index, num_waiting, num_running, outstanding (waiting + running), kv_free_fraction,
cached_prefix_tokens(request), capacity (decode tokens/s at a reference batch of 64 sequences of 1,024
tokens, from the replica's own step-time model) and usd_per_hour (its GPUs' price). Ties go to the lowest index; random choices come from the run's seeded
generator, so routing is reproducible.

`reads_kv_state = False` says a router reads only queue counts (waiting, running, outstanding), which a
run of decode steps does not change: replicas may then advance such runs past arrivals and cut them
when a request reaches them (sim/decode_run.py). A router without the attribute is assumed to read
KV state, and every arrival bounds the runs.
"""
from __future__ import annotations

import bisect
import hashlib
from operator import attrgetter
from typing import Protocol

_outstanding = attrgetter("outstanding")


class Router(Protocol):
    def route(self, request, replicas: list, now: float) -> int: ...


class RoundRobin:
    """Cycle through replicas in order."""

    reads_kv_state = False

    def __init__(self, rng=None):
        self._next = 0

    def route(self, request, replicas, now):
        i = self._next % len(replicas)
        self._next = i + 1
        return i


class Random:
    """Uniformly random replica (from the run's seeded generator)."""

    reads_kv_state = False

    def __init__(self, rng):
        self.rng = rng

    def route(self, request, replicas, now):
        return int(self.rng.integers(len(replicas)))


class LeastOutstanding:
    """Fewest requests waiting or running (the join-shortest-queue rule of most LLM routers)."""

    reads_kv_state = False

    def __init__(self, rng=None):
        pass

    def route(self, request, replicas, now):
        loads = list(map(_outstanding, replicas))
        return loads.index(min(loads))           # the first of the least loaded


class LeastKVUsage:
    """Most free KV-cache blocks (as a fraction of the replica's pool): spreads memory pressure, as
    KV-utilization scorers in llm-d's scheduler and AIBrix do."""

    reads_kv_state = True

    def __init__(self, rng=None):
        pass

    def route(self, request, replicas, now):
        free = [r.kv_free_fraction for r in replicas]
        return free.index(max(free))


class PowerOfTwoChoices:
    """Two distinct replicas drawn at random, the one with fewer outstanding requests taken (Mitzenmacher,
    "The power of two choices in randomized load balancing", IEEE TPDS 2001): most of join-shortest-queue's
    benefit from two probes."""

    reads_kv_state = False

    def __init__(self, rng):
        self.rng = rng

    def route(self, request, replicas, now):
        if len(replicas) == 1:
            return 0
        a, b = (int(i) for i in self.rng.choice(len(replicas), size=2, replace=False))
        la, lb = replicas[a].outstanding, replicas[b].outstanding
        return a if (la, a) < (lb, b) else b


class PrefixAware:
    """The replica holding the longest cached prefix of the prompt, unless the fleet is imbalanced (SGLang's
    cache-aware router; llm-d's prefix scorer). Imbalanced: the most and least loaded replicas differ by more
    than balance_abs_threshold outstanding requests and by a factor above balance_rel_threshold; then the
    least loaded replica is taken. Balanced: the longest match if it covers at least cache_threshold of the
    prompt (ties to the less loaded), else the least loaded replica."""

    reads_kv_state = True

    def __init__(self, rng=None, cache_threshold: float = 0.5, balance_abs_threshold: int = 32,
                 balance_rel_threshold: float = 1.5):
        self.cache_threshold = cache_threshold
        self.abs, self.rel = balance_abs_threshold, balance_rel_threshold

    def route(self, request, replicas, now):
        loads = [r.outstanding for r in replicas]
        least = loads.index(min(loads))
        hi, lo = max(loads), min(loads)
        if hi - lo > self.abs and hi > self.rel * lo:
            return least
        matched = [r.cached_prefix_tokens(request) for r in replicas]
        best = max(range(len(replicas)), key=lambda i: (matched[i], -loads[i], -i))
        if matched[best] >= self.cache_threshold * request.prompt_tokens and matched[best] > 0:
            return best
        return least


class SessionAffinity:
    """Consistent hashing of the request's session onto a ring of replicas (virtual_nodes points each; 160, as ketama), so a
    conversation's turns meet their KV cache and adding a replica moves only ~1/n of the sessions (Karger et
    al., STOC 1997; session affinity in Ray Serve and llm-d). Requests without a session id (session < 0)
    are hashed by their own id, which spreads them uniformly: a shared first block is no conversation key
    (every Mooncake request starts with the same system-prompt block)."""

    reads_kv_state = False

    def __init__(self, rng=None, virtual_nodes: int = 160):
        self.virtual_nodes = virtual_nodes
        self._ring: tuple[list[int], list[int]] | None = None
        self._n = -1

    @staticmethod
    def _hash(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")

    def _build(self, n: int) -> None:
        points = sorted((self._hash(f"replica-{i}-{v}"), i) for i in range(n) for v in range(self.virtual_nodes))
        self._ring = ([p for p, _ in points], [i for _, i in points])
        self._n = n

    @staticmethod
    def key(request) -> str:
        return f"s{request.session}" if request.session >= 0 else f"r{request.id}"

    def route(self, request, replicas, now):
        if self._n != len(replicas):
            self._build(len(replicas))
        hashes, owners = self._ring
        j = bisect.bisect(hashes, self._hash(self.key(request))) % len(hashes)
        return owners[j]


class TenantPools:
    """Tenant isolation: each listed tenant is served only by its own replicas (`pools: {tenant: [index,
    ...]}`), the least loaded of them; other tenants share the replicas in no pool (all of them if every
    replica is pooled). A noisy tenant then cannot queue ahead of another's requests (as dedicated
    deployments per tenant or per model do)."""

    reads_kv_state = False

    def __init__(self, rng=None, pools: dict | None = None):
        self.pools = {t: list(ix) for t, ix in (pools or {}).items()}
        self._rest: list[int] | None = None

    def validate(self, num_replicas: int) -> None:
        from servesim.sim.errors import ConfigError
        for t, ix in self.pools.items():
            bad = [i for i in ix if not 0 <= i < num_replicas]
            if bad or not ix:
                raise ConfigError(f"policies.routing.pools.{t}: replica indices must be in 0..{num_replicas - 1} "
                                  f"and not empty (got {ix})")
        pooled = {i for ix in self.pools.values() for i in ix}
        self._rest = [i for i in range(num_replicas) if i not in pooled] or list(range(num_replicas))

    def route(self, request, replicas, now):
        if self._rest is None:
            self.validate(len(replicas))
        ix = self.pools.get(request.tenant, self._rest)
        loads = [replicas[i].outstanding for i in ix]
        return ix[loads.index(min(loads))]


class CapacityWeighted:
    """Fewest outstanding requests per unit of capacity, counting the new one: (outstanding + 1) / capacity.
    In a fleet of different GPUs (or parallelism, or models) a replica twice as fast gets twice the requests,
    where least_outstanding would load both alike (heterogeneity-aware load balancing as in Helix and
    Mélange's placement; llm-d's weighted scorers)."""

    reads_kv_state = False

    def __init__(self, rng=None):
        pass

    def route(self, request, replicas, now):
        best, key = 0, None
        for j, r in enumerate(replicas):
            k = (r.outstanding + 1) / r.capacity
            if key is None or k < key:
                best, key = j, k
        return best


class CheapestFirst:
    """Cost-aware: the replica with the lowest price per output token (usd_per_hour / capacity) among those
    with fewer than max_outstanding requests; when all are that busy, capacity-weighted. Cheap GPUs fill
    first and dear ones take the overflow (cost-aware spill-over, as Mélange's mix of GPU types argues)."""

    reads_kv_state = False

    def __init__(self, rng=None, max_outstanding: int = 32):
        self.max_outstanding = max_outstanding
        self._fallback = CapacityWeighted()

    def route(self, request, replicas, now):
        open_ = [j for j, r in enumerate(replicas) if r.outstanding < self.max_outstanding]
        if not open_:
            return self._fallback.route(request, replicas, now)
        return min(open_, key=lambda j: (replicas[j].usd_per_hour / replicas[j].capacity, replicas[j].outstanding, j))


class Canary:
    """Canary rollout: a stable `fraction` of requests (by a hash of the request id, so the same requests in
    every run and seed) goes to the replicas of group `group` (a changed configuration: fp8 weights, another
    scheduler setting), the rest to the other replicas; the least loaded replica within each side. The
    report's `groups` section then compares the two sides."""

    reads_kv_state = False

    def __init__(self, rng=None, group: str = "canary", fraction: float = 0.1):
        self.group, self.fraction = group, fraction
        self._sides = None

    def validate_groups(self, groups: list) -> None:
        from servesim.sim.errors import ConfigError
        canary = [i for i, g in enumerate(groups) if g == self.group]
        rest = [i for i, g in enumerate(groups) if g != self.group]
        if not canary or not rest:
            raise ConfigError(f"policies.routing.group: {self.group!r} must name some replicas (fleet.replicas[].name) "
                              f"but not all (groups: {sorted(set(groups))})")
        self._sides = (canary, rest)

    def route(self, request, replicas, now):
        if self._sides is None:
            self.validate_groups([r.group for r in replicas])
        h = int.from_bytes(hashlib.blake2b(str(request.id).encode(), digest_size=8).digest(), "big") / 2.0 ** 64
        ix = self._sides[0] if h < self.fraction else self._sides[1]
        loads = [replicas[i].outstanding for i in ix]
        return ix[loads.index(min(loads))]
