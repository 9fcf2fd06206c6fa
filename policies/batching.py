"""Batching policies: which sequences run in the next iteration and how many tokens each gets.

A policy works on the replica's queues (`sim.replica.Replica`): `waiting` (a deque, FCFS), `running`
(a list, admission order: the admitted requests it may schedule; with pipeline parallelism those whose
micro-batch is in flight sit out), `num_running` (every admitted request, in flight or not), `pool` (the
KV block pool) and `preempt(req)` (recompute preemption: blocks freed, progress lost, back to the
waiting front; with swap preemption the KV is kept in CPU memory instead: the request then carries
`swapped_tokens`, and `swap_in(req)` is called when it is readmitted with its blocks) and `num_batch` (how
many of its requests belong to batch jobs, `req.job >= 0`).
It returns [(request, num_new_tokens), ...]. It keeps no clock and no state between steps.

Batch-job requests (sim/batch_jobs.py) only fill what online traffic leaves: the replica keeps them behind
every online request in `waiting`, continuous policies admit online requests first, preempt batch requests
first when memory runs short, and preempt running batch requests to make room for an online request that
waits (`_make_room`).
"""
from __future__ import annotations

from typing import Protocol

from servesim.sim.request import FINISHED


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

    def steady_chunk(self, q) -> int:
        """Prompt tokens the newest running request, mid-prompt, gets each step while nothing arrives, finishes
        or runs short of memory and every other running request decodes: the budget their decodes leave (they
        come first, in running order). The engine may then advance its chunks without calling schedule()
        (sim/decode_run.py). 0: not steady."""
        return self.budget - (len(q.running) - 1) if self.steady_decode(q) else 0

    # --- what the subclasses change ---------------------------------------------------------
    def key(self, req, now: float):
        """Admission order among waiting requests (smallest first; ties by queue position); None: FCFS."""
        return None

    def victim(self, running: list, i: int, now: float) -> int:
        """Which running request to preempt, among those not yet given tokens this step (index >= i, the
        request at i included): the most recently admitted (vLLM), or the largest key where there is one."""
        if self.key(running[i], now) is None:
            return len(running) - 1
        return max(range(i, len(running)), key=lambda j: (self.key(running[j], now), j))

    def schedule(self, q, now: float) -> list:
        out: list = []
        if q.num_batch and q.waiting:
            self._make_room(q)
        budget, preempted = self._schedule_running(q, now, out)
        if preempted:
            return out
        self._admit(q, now, budget, out)
        return out

    def _make_room(self, q) -> None:
        """An online request waits where batch requests run: preempt them (the latest admitted first) until it
        has a sequence slot and the blocks for its first chunk, or no running batch request is left. Batch
        work yields to online work as a lower vLLM priority does, and comes back when there is room."""
        head = q.waiting[0]
        if head.job >= 0:                                   # online requests queue ahead of batch ones
            return
        pool, running = q.pool, q.running
        need = pool.blocks_needed(min(head.num_tokens, self.budget))
        while q.num_running >= self.max_num_seqs or pool.num_free < need:
            j = _last_batch(running, 0)
            if j < 0:
                return
            q.preempt(running.pop(j))

    def _schedule_running(self, q, now: float, out: list) -> tuple[int, bool]:
        budget = self.budget
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
                j = _last_batch(running, i) if q.num_batch else -1      # batch work goes first
                victim = running.pop(j if j >= 0 else self.victim(running, i, now))
                q.preempt(victim)
                preempted = True
                if victim is req:
                    return budget, preempted                # as vLLM: no more running requests this step
            out.append((req, n))
            budget -= n
            i += 1
        return budget, preempted

    def _admit(self, q, now: float, budget: int, out: list) -> None:
        waiting, running, pool = q.waiting, q.running, q.pool
        ordered = self.key(waiting[0], now) is not None if waiting else False
        while waiting and budget > 0 and self.can_admit(q):
            j = min(range(len(waiting)), key=lambda k: (waiting[k].job >= 0, self.key(waiting[k], now), k)) \
                if ordered else 0
            req = waiting[j]
            swapped = req.swapped_tokens                    # its KV waits in CPU memory: copied back, not recomputed
            if swapped:
                hits, loads, cached = (), (), swapped
            else:
                hits = pool.lookup(req, req.num_tokens - 1)    # at least one token must be computed
                loads = pool.lookup_offloaded(req, len(hits), req.num_tokens - 1)
                cached = (len(hits) + len(loads)) * pool.block_size
            n = req.num_tokens - cached
            if n > budget:
                if not self.chunked and out:
                    break
                if self.chunked:
                    n = budget
            if not pool.allocate(req, cached + n, hits, loads):
                break
            del waiting[j]
            running.append(req)
            req.num_computed = cached
            if swapped:
                q.swap_in(req)
            else:
                req.num_cached_tokens = max(req.num_cached_tokens, cached)
            out.append((req, n))
            budget -= n


def _last_batch(running: list, i: int) -> int:
    """Position of the latest admitted batch-job request in running[i:], or -1."""
    for j in range(len(running) - 1, i - 1, -1):
        if running[j].job >= 0:
            return j
    return -1


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

    def _make_room(self, q) -> None:
        """A request-level batch is never broken up for a newcomer: it waits for the next batch."""


class DynamicBatching(StaticBatching):
    """The dynamic batcher of model servers (Triton's max batch size + max queue delay; Clipper's adaptive
    batching): request-level batches, as `static`, that launch when max_num_seqs requests wait or the oldest
    has waited timeout_ms, whichever comes first. The engine sleeps until then (wake_at) unless an arrival
    fills the batch sooner. Reference: NVIDIA Triton Inference Server, dynamic batcher; Crankshaw et al.,
    "Clipper", NSDI 2017."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, enable_chunked_prefill: bool = False,
                 timeout_ms: float = 50.0):
        super().__init__(max_num_seqs, max_num_batched_tokens)
        self.timeout_s = timeout_ms / 1000.0

    def wake_at(self, q, now: float) -> float | None:
        """When a batch must launch though it is not full: the oldest waiting request's deadline."""
        if q.num_running or not q.waiting:
            return None
        return min(r.arrival for r in q.waiting) + self.timeout_s

    def schedule(self, q, now: float) -> list:
        if q.num_running == 0 and q.waiting and len(q.waiting) < self.max_num_seqs and now < self.wake_at(q, now):
            return []                                # not full and nobody waited long enough: hold
        return super().schedule(q, now)


class Sarathi(ContinuousBatching):
    """Sarathi-Serve's stall-free batching: decodes first, then prompt chunks filling the token budget, so
    no iteration is stretched by a whole long prompt. `continuous` with chunked prefill forced on.
    Reference: Agrawal et al., "Taming Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve",
    OSDI 2024."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, enable_chunked_prefill: bool = True):
        super().__init__(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill=True)


class Orca(ContinuousBatching):
    """Orca's iteration-level scheduling: the batch is re-formed every iteration (finished sequences
    leave, new ones join) but prompts are never split: a prompt runs whole in the iteration that admits
    it, alongside the running decodes (selective batching), so a long prompt stalls every decode for its
    whole prefill. Reference: Yu et al., "Orca: A Distributed Serving System for Transformer-Based
    Generative Models", OSDI 2022."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, enable_chunked_prefill: bool = False):
        super().__init__(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill=False)


class PrefillFirst(ContinuousBatching):
    """vLLM v0's default scheduler: whenever a waiting request can be admitted, the iteration runs prompts
    only (whole, as many as the budget and max_num_seqs allow) and the running decodes pause; otherwise it
    decodes. Low TTFT, at the price of decode stalls (TPOT spikes) that Sarathi-Serve's mixed batches
    avoid. Reference: Kwon et al., SOSP 2023 (vLLM); Agrawal et al., OSDI 2024 (Sarathi-Serve) for the
    contrast."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, enable_chunked_prefill: bool = False):
        super().__init__(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill=False)

    def schedule(self, q, now: float) -> list:
        out: list = []
        if q.num_batch and q.waiting:
            self._make_room(q)
        self._admit(q, now, self.budget, out)
        return out or super().schedule(q, now)


class PriorityClasses(ContinuousBatching):
    """Continuous batching that admits by priority class (lower number first; the request's SLO class
    names it, unlisted classes get 0), FCFS within a class, and preempts the lowest-priority request
    first (the latest admitted among equals). As vLLM's `--scheduling-policy priority`."""

    def __init__(self, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill=True, priorities=None):
        super().__init__(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        self.priorities = dict(priorities or {})

    def key(self, req, now):
        return (self.priorities.get(req.slo_class, 0), req.arrival)


class EarliestDeadlineFirst(ContinuousBatching):
    """Admits the request whose first-token deadline (arrival + its class's TTFT SLO) is earliest; requests
    of classes without a TTFT SLO come after every deadline, FCFS. Preempts the latest deadline first.
    Reference: Liu and Layland, JACM 1973 (EDF); deadline-aware LLM scheduling as in SLOs-Serve and
    Andes (Liu et al., 2024)."""

    def __init__(self, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill=True, ttft_s=None):
        super().__init__(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        self.ttft_s = dict(ttft_s or {})

    @classmethod
    def from_config(cls, engine, params, cfg, rng):
        ttft = {n: c.ttft_ms / 1000.0 for n, c in cfg.slo.classes.items() if c.ttft_ms is not None}
        return cls(engine.max_num_seqs, engine.max_num_batched_tokens, engine.enable_chunked_prefill, ttft_s=ttft)

    def key(self, req, now):
        return (req.arrival + self.ttft_s.get(req.slo_class, float("inf")), req.arrival)


class ShortestJobFirst(ContinuousBatching):
    """Admits the request with the shortest predicted output first (FCFS among equals), preempts the longest.
    predictor `oracle` knows each output length; `noisy` multiplies it by a lognormal error of standard
    deviation noise_sigma (in log space), drawn once per request from the run's generator, as a learned
    length predictor would err. Long requests can starve under sustained load, as with any SJF.
    Reference: Fu et al., "Efficient LLM Scheduling by Learning to Rank", NeurIPS 2024; Qiu et al.,
    "Efficient Interactive LLM Serving with Proxy Model-based Sequence Length Prediction", 2024."""

    def __init__(self, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill=True, predictor="oracle",
                 noise_sigma=0.5, rng=None):
        super().__init__(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        self.noisy = predictor == "noisy"
        self.sigma, self.rng = noise_sigma, rng
        self.predicted: dict[int, float] = {}     # request id -> predicted output tokens (drawn once)

    @classmethod
    def from_config(cls, engine, params, cfg, rng):
        return cls(engine.max_num_seqs, engine.max_num_batched_tokens, engine.enable_chunked_prefill, rng=rng,
                   **params)

    def key(self, req, now):
        p = self.predicted.get(req.id)
        if p is None:
            p = req.output_tokens * (float(self.rng.lognormal(0.0, self.sigma)) if self.noisy else 1.0)
            self.predicted[req.id] = p
        return (p, req.arrival)


class FairShare(ContinuousBatching):
    """Weighted fair sharing between tenants with the Virtual Token Counter (Sheng et al., "Fairness in
    Serving Large Language Models", OSDI 2024): each tenant's counter grows by the tokens it is served
    (prompt and generated alike) divided by its weight, and waiting requests are admitted from the tenant
    with the smallest counter (FCFS within a tenant). A tenant that was idle has its counter lifted to the
    smallest counter among the tenants already backlogged, so idleness banks no credit. Preemption picks
    the running request of the most-served tenant (latest admitted among equals).

    Tokens served in a run of decode steps that skipped the scheduler (the fast path) are counted at the next
    schedule() from the requests' progress, those of requests that finished in the run too; a tenant whose
    requests all finished before that schedule() was idle (as the plain path sees at the step end where the
    last one finished). Tokens are summed as integers and divided by the weight only when
    compared, so the counters, and every decision, are the plain path's to the bit."""

    def __init__(self, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill=True, weights=None):
        super().__init__(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        self.weights = dict(weights or {})
        self.served: dict[str, int] = {}       # tokens served per tenant
        self.lift: dict[str, float] = {}       # credit added when an idle tenant became backlogged
        self._seen: dict[int, tuple] = {}      # running request id -> (request, tokens it had been counted for)
        self._backlogged: set = set()
        self._present: list = []               # the requests waiting or running at the last schedule()

    def counter(self, tenant: str) -> float:
        return self.lift.get(tenant, 0.0) + self.served.get(tenant, 0) / self.weights.get(tenant, 1.0)

    def key(self, req, now):
        return (self.counter(req.tenant), req.arrival)

    def _serve(self, tenant: str, tokens: int) -> None:
        self.served[tenant] = self.served.get(tenant, 0) + tokens

    def schedule(self, q, now: float) -> list:
        for r, seen in self._seen.values():     # progress made without a schedule() call (decode runs), by
            done = r.num_computed - seen         # the requests running then, those that finished in a run too
            if done > 0:
                self._serve(r.tenant, done)
        # a tenant whose requests here at the last schedule() have all finished before now was idle in between
        # (at the end of a decode run, or while the replica slept): not backlogged any more
        stayed = {r.tenant for r in self._present if not (r.outcome == FINISHED and r.finish < now)}
        self._backlogged &= stayed
        active = {r.tenant for r in q.waiting} | {r.tenant for r in q.running}
        floor = [self.counter(t) for t in active & self._backlogged]
        for t in active - self._backlogged:    # newly backlogged: no credit for the idle time
            if floor and self.counter(t) < min(floor):
                self.lift[t] = self.lift.get(t, 0.0) + min(floor) - self.counter(t)
        out = super().schedule(q, now)
        for r, n in out:
            self._serve(r.tenant, n)
        self._seen = {r.id: (r, r.num_computed) for r in q.running}
        for r, n in out:
            self._seen[r.id] = (r, r.num_computed + n)
        self._present = list(q.waiting) + q.running
        self._backlogged = {r.tenant for r in self._present}
        return out
