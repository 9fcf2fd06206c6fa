"""Routers pick the replica for each admitted request from read-only replica views.

A view offers: index, num_waiting, num_running, outstanding (waiting + running), kv_free_fraction.
Ties always go to the lowest index, so routing is deterministic.
"""
from __future__ import annotations

from typing import Protocol


class Router(Protocol):
    def route(self, request, replicas: list, now: float) -> int: ...


class RoundRobin:
    """Cycle through replicas in order."""

    def __init__(self, rng=None):
        self._next = 0

    def route(self, request, replicas, now):
        i = self._next % len(replicas)
        self._next = i + 1
        return i


class Random:
    """Uniformly random replica (from the run's seeded generator)."""

    def __init__(self, rng):
        self.rng = rng

    def route(self, request, replicas, now):
        return int(self.rng.integers(len(replicas)))


class LeastOutstanding:
    """Fewest requests waiting or running (the join-shortest-queue rule of most LLM routers)."""

    def __init__(self, rng=None):
        pass

    def route(self, request, replicas, now):
        best, best_n = 0, None
        for i, r in enumerate(replicas):
            n = r.outstanding
            if best_n is None or n < best_n:
                best, best_n = i, n
        return best
