"""A run of pure-decode steps advanced in closed form (the replica's fast decode path).

Between changes of batch composition every running request decodes one token per step and only the
context lengths grow, so the steps' times come from one vector formula (`model.decode_steps`) and their
effects (new KV blocks on block boundaries, ITL samples, token counts, replica counters, time series)
are array operations. A run is planned when it starts and committed when it ends; the replica waits on
one event meanwhile.

A run ends:
- with the step that gives a request its last token (the tokens of all steps are applied at once, the
  finished requests freed and reported as the plain path's completion does: `Replica._complete_run`),
  after which the replica may start the next run at once;
- before a step whose new blocks do not fit (preemption is the policy's decision);
- a step ending at or after the replica's horizon (the cluster's next arrival when routing or admission
  reads state a run changes, such as KV usage) or sim.max_sim_time_s;
- and, cut short while it runs, the first step that starts at or after an arrival routed to this replica
  (`cut`): as in the plain path, whose next schedule after the arrival is at the end of the step then
  running (or at the arrival instant itself, between steps).
Step end times are summed one by one, as successive timeouts would (np.add.accumulate adds left to right);
the steps' durations come from the closed form, within 1e-12 of the plain path's step_time, and so do the
counters (summed at once).
"""
from __future__ import annotations

import math
from itertools import accumulate

import numpy as np

from servesim.hwmodels.step_time import BatchShape


class DecodeRun:
    __slots__ = ("reqs", "ctx", "ends", "secs", "steps", "grows", "n", "natural")

    @classmethod
    def plan(cls, replica, stop: float) -> DecodeRun | None:
        """The longest run the replica's running requests can make from now, or None for none worth one."""
        pool, now = replica.pool, replica.env.now
        reqs = replica.running
        ctx = []                                  # tokens cached before the first step
        k = 1 << 62                               # steps until someone's last token, that one included
        for r in reqs:
            c, out = r.num_computed, r.num_output
            if not out or c != r.prompt_tokens + out - 1:       # not decoding
                return None
            ctx.append(c)
            if r.output_tokens - out < k:
                k = r.output_tokens - out
        if k < 2:
            return None
        b, bs = len(reqs), pool.block_size
        first = replica.model.step_time(BatchShape(decode_cached=ctx, num_sampled=b))
        if stop != math.inf:
            # steps only grow longer (contexts grow), so at most (stop - now) / first step of them fit
            if now + first.seconds >= stop:
                return None
            k = min(k, int((stop - now) / first.seconds) + 1)
        steps = replica.model.decode_steps(ctx, k, first)
        secs = steps.secs if replica.slow == 1.0 else steps.secs * replica.slow   # a straggler: as the plain step
        ends = np.add.accumulate(np.concatenate(([now], secs)))     # step j runs from ends[j] to ends[j + 1]
        n = int(np.searchsorted(ends[1:], stop, side="left")) if stop != math.inf else k   # steps ending before stop
        # step j gives request i a new block when its token lands on a block boundary: (ctx_i + j) % bs == 0,
        # i.e. in the steps j = g, g + bs, ... with g = -ctx_i mod bs: grows[g] lists those requests, in running order
        grows = [[] for _ in range(bs)]
        for i, c in enumerate(ctx):
            grows[-c % bs].append(i)
        run = cls()
        run.reqs, run.ctx, run.ends, run.secs, run.steps = reqs.copy(), ctx, ends, secs, steps
        run.grows, run.n, run.natural = grows, n, k if n == k else -1
        free = pool.num_free                                         # nothing is freed during a run
        if run._grown(n) > free:
            taken = 0
            for j in range(n):
                taken += len(grows[j % bs])
                if taken > free:                                     # step j's blocks do not fit
                    run.n = n = j
                    break
        return run if n else None

    def _grown(self, m: int) -> int:
        """New blocks taken by the first m steps."""
        grows = self.grows
        cycles, rest = divmod(m, len(grows))
        return cycles * len(self.reqs) + sum(len(g) for g in grows[:rest])

    @property
    def end(self) -> float:
        return float(self.ends[self.n])

    def cut(self, t: float) -> bool:
        """A request arrived at t: keep only the steps that started before it. True if the run got shorter."""
        m = int(np.searchsorted(self.ends[: self.n], t, side="left"))
        if m >= self.n:
            return False
        self.n = m
        return True

    def blocks_taken_by(self, t: float) -> int:
        """New blocks the steps started before t have taken (the plain path allocates them as each step starts;
        a run adds them when it commits): what a crash at t finds in use beyond the pool's count."""
        return self._grown(min(int(np.searchsorted(self.ends[: self.n], t, side="left")), self.n))

    def _register(self, pool, end_t: list, m: int) -> None:
        """Publish the blocks the tokens of the run's first m steps filled, as the plain path does at the end of
        each step (step by step, running order within a step): request i's block fills in step s when ctx_i + s + 1 is a multiple
        of the block size."""
        bs, reqs, ctx = pool.block_size, self.reqs, self.ctx
        fills = self.grows[1:] + self.grows[:1]         # a block fills in the step before the next one starts
        for s in range(m):
            pool.now = end_t[s + 1]
            for i in fills[s % bs]:
                c = ctx[i] + s + 1
                pool.register_full_blocks(reqs[i], c - 1, c)

    @property
    def finishes(self) -> bool:
        """The run ran to its last step, where a request finished: the batch may be steady again at once."""
        return self.n == self.natural

    def commit(self, replica) -> None:
        """Apply the run's n steps to the replica, its pool, its requests and the metrics: what happens as each
        step starts (blocks, samples, counters) for all n, the ends of the first n - 1 in closed form (ITL, token
        counts, prefix blocks), then the requests' tokens and the finishes (Replica._complete_run)."""
        n, ends, pool, metrics = self.n, self.ends, replica.pool, replica.metrics
        if not n:
            return
        b, reqs = len(self.reqs), self.reqs
        grows, bs = self.grows, len(self.grows)
        times = ends[: n + 1].tolist()
        # blocks referenced during each step: those before it, plus the step's new ones (a cycle of bs steps)
        per_step = ([len(g) for g in grows] * (n // bs + 1))[:n]
        kv_used = np.array(list(accumulate(per_step, initial=pool.num_used))[1:])
        pool.append_blocks_at([(reqs[i], times[j]) for j in range(n) for i in grows[j % bs]])
        metrics.sample_steps(replica.index, times[:n], 0, b, kv_used)
        replica.stats.add_steps(self.secs[:n], *self.steps.sums(n), 0, b, kv_used)
        if metrics.trace is not None:
            metrics.trace.steps(replica.index, ends[:n], self.secs[:n], 0, b, kv_used, 0, b, self.steps.arrays(n)[3])
        m = n - 1                                           # step ends in closed form
        if m:
            online = sum(r.job < 0 for r in reqs) if replica.num_batch else b
            if online:                                      # ITL is online traffic's (as the latency table)
                metrics.itl.add_array(ends[1:n] - ends[:m], online, ends[1:n])
            metrics.on_tokens_array(ends[1:n], b, replica.index)
            if pool.caching:
                self._register(pool, times, m)
        replica._complete_run(reqs, n, times[m], times[n])
