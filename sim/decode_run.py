"""A run of pure-decode steps advanced in closed form (the replica's fast decode path).

Between changes of batch composition every running request decodes one token per step and only the
context lengths grow, so the steps' times come from one vector formula (`model.decode_steps`) and their
effects (new KV blocks on block boundaries, ITL samples, token counts, replica counters, time series)
are array operations. A run is planned when it starts and committed when it ends; the replica waits on
one event meanwhile.

A run ends before:
- a request's last token (its finish goes through the plain step, which frees and reports it);
- a step whose new blocks do not fit (preemption is the policy's decision);
- a step ending at or after the replica's horizon (the cluster's next arrival when routing or admission
  reads state a run changes, such as KV usage) or sim.max_sim_time_s;
- and, cut short while it runs, the first step that starts at or after an arrival routed to this replica
  (`cut`): as in the plain path, whose next schedule after the arrival is at the end of the step then
  running (or at the arrival instant itself, between steps).
Step end times are summed one by one, as successive timeouts would, so the clock is the plain path's to
the bit; the counters too are sequential sums (np.add.accumulate adds left to right).
"""
from __future__ import annotations

import math

import numpy as np

from servesim.hwmodels.step_time import BatchShape


class DecodeRun:
    __slots__ = ("reqs", "ends", "secs", "flops", "nbytes", "parts", "grow_j", "grow_i", "used", "n")

    @classmethod
    def plan(cls, replica, stop: float) -> DecodeRun | None:
        """The longest run the replica's running requests can make from now, or None for none worth one."""
        pool, now = replica.pool, replica.env.now
        reqs = replica.running
        for r in reqs:
            if r.num_computed != r.prompt_tokens + r.num_output - 1 or not r.num_output:   # not decoding
                return None
        b, bs = len(reqs), pool.block_size
        k = min(r.output_tokens - r.num_output for r in reqs) - 1     # steps before anyone's last token
        if k < 2:
            return None
        ctx = np.fromiter((r.num_computed for r in reqs), np.int64, b)   # tokens cached before the first step
        if stop != math.inf:
            # steps only grow longer (contexts grow), so at most (stop - now) / first step of them fit
            first = replica.model.step_time(BatchShape(decode_cached=ctx.tolist(), num_sampled=b)).seconds
            if now + first >= stop:
                return None
            k = min(k, int((stop - now) / first) + 1)
        secs, flops, nbytes, parts = replica.model.decode_steps(ctx, k)
        if replica.slow != 1.0:                    # a straggler: as the plain step, dt = seconds x slow
            secs = secs * replica.slow
        ends = np.add.accumulate(np.concatenate(([now], secs)))     # step j runs from ends[j] to ends[j + 1]
        n = int(np.searchsorted(ends[1:], stop, side="left"))         # steps ending before stop
        # step j gives request i a new block when its token lands on a block boundary: (ctx_i + j) % bs == 0
        steps = ((-ctx) % bs)[:, None] + bs * np.arange(-(-n // bs))[None, :]
        inside = steps < n
        grow_j = steps[inside]
        grow_i = np.broadcast_to(np.arange(b)[:, None], steps.shape)[inside]
        order = np.lexsort((grow_i, grow_j))                          # step by step, running order within
        grow_j, grow_i = grow_j[order], grow_i[order]
        used = np.cumsum(np.bincount(grow_j, minlength=n))             # new blocks by the end of each step
        short = np.flatnonzero(used > pool.num_free)                 # nothing is freed during a run
        if len(short):
            n = int(short[0])                                        # that step's blocks do not fit
        if n == 0:
            return None
        run = cls()
        run.reqs, run.ends, run.secs, run.flops, run.nbytes, run.parts = list(reqs), ends, secs, flops, nbytes, parts
        run.grow_j, run.grow_i, run.used, run.n = grow_j, grow_i, used, n
        return run

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
        m = min(int(np.searchsorted(self.ends[: self.n], t, side="left")), self.n)
        return int(self.used[m - 1]) if m else 0

    def _register(self, pool, ends) -> None:
        """Publish the blocks the run's tokens filled, as the plain path does at the end of each step (step by
        step, running order within a step): request i's block fills in step s when ctx_i + s + 1 is a multiple
        of the block size."""
        bs, n = pool.block_size, self.n
        ctx = np.fromiter((r.num_computed for r in self.reqs), np.int64, len(self.reqs))
        steps = ((-ctx - 1) % bs)[:, None] + bs * np.arange(-(-n // bs))[None, :]
        inside = steps < n
        s_idx = steps[inside]
        i_idx = np.broadcast_to(np.arange(len(self.reqs))[:, None], steps.shape)[inside]
        order = np.lexsort((i_idx, s_idx))
        reqs, end_t = self.reqs, ends.tolist()
        for s, i in zip(s_idx[order].tolist(), i_idx[order].tolist()):
            pool.now = end_t[s + 1]
            c = reqs[i].num_computed + s + 1
            pool.register_full_blocks(reqs[i], c - 1, c)

    def commit(self, replica) -> None:
        """Apply the run's n steps to the replica, its pool, its requests and the metrics."""
        n, ends, pool, metrics = self.n, self.ends, replica.pool, replica.metrics
        b = len(self.reqs)
        if n:
            keep = self.grow_j < n
            grow_j, grow_i = self.grow_j[keep], self.grow_i[keep]
            starts = ends.tolist()
            reqs = self.reqs
            for j, i in zip(grow_j.tolist(), grow_i.tolist()):
                pool.now = starts[j]
                pool.append_blocks(reqs[i], 1)
            kv_used = (pool.num_used - len(grow_j)) + self.used[:n]     # blocks referenced during each step
            metrics.sample_steps(replica.index, ends[:n], 0, b, kv_used)
            replica.stats.add_steps(self.secs[:n], self.flops[:n], self.nbytes[:n], self.parts[:, :n], 0, b, kv_used)
            if metrics.trace is not None:
                metrics.trace.steps(replica.index, ends[:n], self.secs[:n], 0, b, kv_used, 0, b, self.parts[:, :n])
            online = sum(r.job < 0 for r in reqs) if replica.num_batch else b
            if online:                                      # ITL is online traffic's (as the latency table)
                metrics.itl.add_array(np.diff(ends[: n + 1]), online, ends[1 : n + 1])
            metrics.on_tokens_array(ends[1 : n + 1], b, replica.index)
        if n and pool.caching:
            self._register(pool, ends)
        t = float(ends[n])
        pool.now = t
        for r in self.reqs:
            r.num_computed += n
            r.num_output += n
            if n:
                r.last_token = t
