"""Routers pick the replica for each admitted request from read-only replica views.

A view offers: index, num_waiting, num_running, outstanding (waiting + running), kv_free_fraction.
Ties always go to the lowest index, so routing is deterministic.

`reads_kv_state = False` says a router reads only queue counts (waiting, running, outstanding), which a
run of decode steps does not change: replicas may then advance such runs past arrivals and cut them
when a request reaches them (sim/decode_run.py). A router without the attribute is assumed to read
KV state, and every arrival bounds the runs.
"""
from __future__ import annotations

from typing import Protocol


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
        loads = [r.outstanding for r in replicas]
        return loads.index(min(loads))           # the first of the least loaded
