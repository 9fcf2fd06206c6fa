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


class TokenBucket:
    """Per-tenant rate limits: each tenant's bucket holds up to burst_tokens and refills at tokens_per_s; a
    request costs its prompt + output tokens (what an API gateway charges against max_tokens) and is
    rejected (`rate_limited`) when its tenant's bucket holds less. Tenants without a bucket are unlimited.
    Reference: the token-bucket rate limiter of API gateways (e.g. Envoy's local rate limit filter)."""

    reads_kv_state = False

    def __init__(self, tenants: dict, default: dict | None = None):
        self.buckets = {t: (b["tokens_per_s"], b["burst_tokens"]) for t, b in tenants.items()}
        self.default = (default["tokens_per_s"], default["burst_tokens"]) if default else None
        self.level: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def admit(self, request, cluster, now):
        bucket = self.buckets.get(request.tenant, self.default)
        if bucket is None:
            return None
        rate, burst = bucket
        t = request.tenant
        level = min(burst, self.level.get(t, burst) + (now - self.last.get(t, now)) * rate)
        self.last[t] = now
        cost = request.prompt_tokens + request.output_tokens
        if cost > level:
            self.level[t] = level
            return "rate_limited"
        self.level[t] = level - cost
        return None


class SLOShedding:
    """Reject (`slo_shed`) a request whose TTFT would exceed its class's TTFT SLO (times `slack`) on every
    replica, instead of queueing it to miss anyway. Predicted TTFT on a replica: the prefill tokens queued
    ahead of it (waiting prompts, unfinished prompt chunks of running requests) plus its own prompt, at
    one token budget per iteration, each iteration priced by the replica's step-time model with the
    running requests decoding alongside. Classes without a TTFT SLO are always admitted.
    Reference: load shedding on predicted latency, as in Mooncake's early rejection (Qin et al., FAST 2025)."""

    reads_kv_state = True        # it prices the running requests' context lengths, which decode runs change

    def __init__(self, slack: float, ttft_s: dict[str, float]):
        self.slack = slack
        self.ttft_s = ttft_s

    @classmethod
    def from_config(cls, params: dict, cfg):
        ttft = {name: c.ttft_ms / 1000.0 for name, c in cfg.slo.classes.items() if c.ttft_ms is not None}
        return cls(params["slack"], ttft)

    @staticmethod
    def predicted_ttft(replica, request) -> float:
        from servesim.hwmodels.step_time import BatchShape
        budget = replica.scheduler.budget
        ahead = sum(r.prompt_tokens - r.num_computed for r in replica.waiting)
        ahead += sum(max(0, r.prompt_tokens - r.num_computed) for r in replica.running)
        tokens = ahead + request.prompt_tokens
        steps = -(-tokens // budget)
        decoding = [r.num_computed for r in replica.running if r.num_computed >= r.prompt_tokens]
        chunk = min(tokens, budget)
        step = replica.model.step_time(BatchShape(prefill_new=[chunk], prefill_cached=[0],
                                                  decode_cached=decoding, num_sampled=len(decoding) + 1)).seconds
        return steps * step

    def admit(self, request, cluster, now):
        limit = self.ttft_s.get(request.slo_class)
        if limit is None:
            return None
        best = min(self.predicted_ttft(r, request) for r in cluster.replicas)
        return "slo_shed" if best > self.slack * limit else None
