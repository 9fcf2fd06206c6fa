"""Batching policies: which sequences run in the next iteration and how many tokens each gets.

A policy works on the replica's queues (`sim.replica.Replica`): `waiting` (a deque, FCFS), `running`
(a list, admission order: the admitted requests it may schedule; with pipeline parallelism those whose
micro-batch is in flight sit out), `num_running` (every admitted request, in flight or not), `pool` (the
KV block pool) and `preempt(req)` (recompute preemption: blocks freed, progress lost, back to the
waiting front).
It returns [(request, num_new_tokens), ...]. It keeps no clock and no state between steps.
"""
from __future__ import annotations

from typing import Protocol


class BatchingPolicy(Protocol):
    def schedule(self, q, now: float) -> list: ...


class ContinuousBatching:
    """vLLM v1's scheduler: one token budget, running requests first, then FCFS admissions.

    Running requests each get their remaining tokens (1 for a decode, the rest of the prompt chunk
    otherwise) within the budget. When the pool cannot hold a running request's next tokens, the
    most recently admitted running request is preempted (recompute), possibly the request itself.
    Waiting requests are admitted only in steps that preempted nothing, up to max_num_seqs.
    Without chunked prefill a prompt is never split; one larger than the whole budget runs alone.
    """

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, enable_chunked_prefill: bool = True):
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.chunked = enable_chunked_prefill

    def can_admit(self, q) -> bool:
        return q.num_running < self.max_num_seqs

    def steady_decode(self, q) -> bool:
        """True when, with nothing arriving, finishing or short of memory, the next step would give every
        running request (all decoding) one token and admit nobody: the engine may then advance such steps
        without calling schedule() (sim/replica.py, fast decode)."""
        return not q.waiting and len(q.running) <= self.budget

    def schedule(self, q, now: float) -> list:
        budget = self.budget
        out = []
        running, pool = q.running, q.pool
        preempted = False
        bs = pool.block_size
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            c = req.num_computed
            n = req.prompt_tokens + req.num_output - c      # req.num_tokens - c, written out: the hot loop
            if n > budget:
                n = budget
            if -(-(c + n) // bs) <= len(req.blocks):         # fits in its blocks: pool.allocate's first test
                out.append((req, n))
                budget -= n
                i += 1
                continue
            while not pool.allocate(req, c + n):
                victim = running.pop()
                q.preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                out.append((req, n))
                budget -= n
                i += 1
        if preempted:
            return out
        waiting = q.waiting
        while waiting and budget > 0 and self.can_admit(q):
            req = waiting[0]
            hits = pool.lookup(req, req.num_tokens - 1)    # at least one token must be computed
            cached = len(hits) * pool.block_size
            n = req.num_tokens - cached
            if n > budget:
                if not self.chunked and out:
                    break
                if self.chunked:
                    n = budget
            if not pool.allocate(req, cached + n, hits):
                break
            waiting.popleft()
            running.append(req)
            req.num_computed = cached
            req.num_cached_tokens = max(req.num_cached_tokens, cached)
            out.append((req, n))
            budget -= n
        return out


class StaticBatching(ContinuousBatching):
    """Request-level batching (the pre-Orca baseline): a batch is formed only when the previous one
    has fully drained; prompts run whole; finished sequences leave but nobody joins mid-batch."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, enable_chunked_prefill: bool = False):
        super().__init__(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill=False)
        self._forming = False

    def schedule(self, q, now: float) -> list:
        # admissions happen only in the step that starts a batch (running empty at its start)
        self._forming = q.num_running == 0
        return super().schedule(q, now)

    def can_admit(self, q) -> bool:
        return self._forming and q.num_running < self.max_num_seqs
