"""Admission control at the cluster's front door: None admits, a string is the rejection reason.

`reads_kv_state = False`: the policy reads only queue counts (see policies/routing.py).
"""
from __future__ import annotations

from typing import Protocol


class AdmissionPolicy(Protocol):
    def admit(self, request, cluster, now: float) -> str | None: ...


class AcceptAll:
    """Admit everything (vLLM's behaviour: the queue is unbounded)."""

    reads_kv_state = False

    def admit(self, request, cluster, now):
        return None


class MaxQueue:
    """Reject when the cluster already holds max_waiting requests that have not started."""

    reads_kv_state = False

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting

    def admit(self, request, cluster, now):
        if sum(r.num_waiting for r in cluster.replicas) >= self.max_waiting:
            return "queue_full"
        return None
