"""A run of steps between changes of batch composition, advanced without the policy (the replica's fast
decode path).

Between changes of batch composition every running request decodes one token per step and only the
context lengths grow, so the steps' times come from one vector formula (`model.decode_steps`) and their
effects (new KV blocks on block boundaries, ITL samples, token counts, replica counters, time series)
are array operations. A run is planned when it starts and committed when it ends; the replica waits on
one event meanwhile.

A run may start with a head: the newest running request still in its prompt (admitted by the policy in
the step before) gets its remaining chunks, one a step, alongside the others' decodes, each chunk as long as
the budget those leave (the policy's `steady_chunk`); each head step is priced by step_time as the plain
path prices it. From its first token on it decodes with the others, in the run's closed-form tail.

A run ends:
- with the step that gives a request its last token (the tokens of all steps are applied at once, the
  finished requests freed and reported as the plain path's completion does: `Replica._complete_run`, or
  `Replica._complete` for a head step), after which the replica may start the next run at once;
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


def _by_residue(ctx: list, bs: int) -> list:
    """Request indices by -ctx_i mod bs, in running order: bucket g holds the requests whose token lands on a
    block boundary (a new block) in steps g, g + bs, ... of their decoding."""
    out = [[] for _ in range(bs)]
    for i, c in enumerate(ctx):
        out[-c % bs].append(i)
    return out


def _register(pool, reqs: list, ctx: list, grows: list, end_t: list, m: int, prompt=None) -> None:
    """Publish the blocks the tokens of m decode steps filled, as the plain path does at the end of each step
    (step by step, running order within a step): request i's block fills in step s when ctx_i + s + 1 is a
    multiple of the block size, i.e. in the steps of grows shifted by one. end_t[s + 1]: step s's end.
    prompt: (P, head steps) when P's chunk of each step fills blocks too (P runs last)."""
    fills = grows[1:] + grows[:1]
    bs = len(fills)
    for s in range(m):
        pool.now = end_t[s + 1]
        for i in fills[s % bs]:
            c = ctx[i] + s + 1
            pool.register_full_blocks(reqs[i], c - 1, c)
        if prompt is not None:
            P, head = prompt
            _, _, chunk, c = head[s]
            pool.register_full_blocks(P, c, c + chunk)


class DecodeRun:
    __slots__ = ("reqs", "ctx", "ends", "secs", "steps", "grows", "n", "natural",
                 "D", "P", "J", "ctx0", "grows0", "head", "head_taken")

    @classmethod
    def plan(cls, replica, stop: float) -> DecodeRun | None:
        """The longest run the replica's running requests can make from now, or None for none worth one."""
        pool, now, model = replica.pool, replica.env.now, replica.model
        running = replica.running
        P = running[-1]
        if P.num_output == 0:                     # the newest request is mid-prompt: its chunks head the run
            sched = replica.scheduler
            chunk = sched.steady_chunk(replica) if hasattr(sched, "steady_chunk") else 0
            if chunk <= 0 or not P.num_computed or P.lost or P.load_s or replica.prefill_only or replica.pending_s:
                return None
            D = running[:-1]
        else:
            P, D = None, running
        ctx0 = []                                 # the decoding requests' cached tokens before the first step
        k = 1 << 62                               # steps until someone's last token, that one included
        for r in D:
            c, out = r.num_computed, r.num_output
            if not out or c != r.prompt_tokens + out - 1:       # not decoding
                return None
            ctx0.append(c)
            if r.output_tokens - out < k:
                k = r.output_tokens - out
        bs, nd, slow = pool.block_size, len(D), replica.slow
        head, head_taken, J = [], [], 0
        grows0 = _by_residue(ctx0, bs)
        if P is not None:
            left = P.prompt_tokens - P.num_computed
            J = -(-left // chunk)                 # head steps; the last samples P's first token
            k = min(k, J + P.output_tokens - 1)
            c, have = P.num_computed, len(P.blocks)
            for j in range(min(J, k)):            # priced one by one, as the plain path prices them
                n_j = min(chunk, left - j * chunk)
                st = model.step_time(BatchShape([n_j], [c], [x + j for x in ctx0], nd + (j == J - 1)))
                head.append((st, st.seconds * slow if slow != 1.0 else st.seconds, n_j, c))
                c += n_j
                more = -(-c // bs) - have         # P's new blocks for its chunk, taken after the decodes' ones
                have += more
                head_taken.append(len(grows0[j % bs]) + more)
        elif k < 2:
            return None
        h = len(head)
        # the tail: every request decoding (P, last, from its first token on), in closed form
        reqs = running.copy()
        if h:
            ctx = [x + h for x in ctx0] + [P.prompt_tokens]
            r = h % bs                            # the decodes' residues, h steps on; P's block boundaries, last
            grows = grows0[r:] + grows0[:r]
            g = -P.prompt_tokens % bs
            grows[g] = grows[g] + [nd]
        else:
            ctx, grows = ctx0, grows0
        tail, steps, secs = k - h, None, ()
        start = now + sum(x[1] for x in head)     # (only to bound the tail: ends are summed one by one below)
        if tail:
            first = model.step_time(BatchShape(decode_cached=ctx, num_sampled=len(reqs)))
            if stop != math.inf:
                # decode steps only grow longer (contexts grow), so at most (stop - start) / first of them fit
                tail = 0 if start + first.seconds >= stop else min(tail, int((stop - start) / first.seconds) + 1)
            if tail:
                steps = model.decode_steps(ctx, tail, first)
                secs = steps.secs if slow == 1.0 else steps.secs * slow   # a straggler: as the plain step
        if not h and not tail:
            return None
        k, natural = h + tail, k                  # natural: the step count that ends with a finish
        ends = np.add.accumulate(np.concatenate(([now], [x[1] for x in head], secs)))   # step j: ends[j] to ends[j + 1]
        n = int(np.searchsorted(ends[1:], stop, side="left")) if stop != math.inf else k   # steps ending before stop
        run = cls()
        run.reqs, run.ctx, run.ends, run.secs, run.steps, run.grows = reqs, ctx, ends, secs, steps, grows
        run.D, run.P, run.J, run.ctx0, run.grows0, run.head, run.head_taken = D, P, J, ctx0, grows0, head, head_taken
        run.n, run.natural = n, natural if n == natural else -1
        free = pool.num_free                                         # nothing is freed during a run
        if run._taken(n) > free:
            taken = 0
            for j in range(n):
                taken += head_taken[j] if j < h else len(grows[(j - h) % bs])
                if taken > free:                                     # step j's blocks do not fit
                    run.n, run.natural = j, -1
                    break
        return run if run.n else None

    def _taken(self, m: int) -> int:
        """New blocks taken by the first m steps."""
        h = len(self.head)
        if m <= h:
            return sum(self.head_taken[:m])
        grows = self.grows
        cycles, rest = divmod(m - h, len(grows))
        return sum(self.head_taken) + cycles * len(self.reqs) + sum(len(g) for g in grows[:rest])

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
        return self._taken(min(int(np.searchsorted(self.ends[: self.n], t, side="left")), self.n))

    @property
    def finishes(self) -> bool:
        """The run ran to its last step, where a request finished: the batch may be steady again at once."""
        return self.n == self.natural

    def commit(self, replica) -> None:
        """Apply the run's n steps to the replica, its pool, its requests and the metrics: what happens as each
        step starts (blocks, samples, counters) for all n, the ends of the first n - 1 (head steps one by one,
        tail steps in closed form: ITL, token counts, prefix blocks), then the last step's tokens and finishes."""
        n, ends, pool, metrics = self.n, self.ends, replica.pool, replica.metrics
        if not n:
            return
        index, reqs, grows = replica.index, self.reqs, self.grows
        b, bs, h = len(reqs), len(grows), min(n, len(self.head))
        nt = n - h                                          # tail steps
        times = ends[: n + 1].tolist()
        # as each step starts: new blocks (the decodes' in running order, then P's chunk's), samples, counters
        D, P, grows0 = self.D, self.P, self.grows0
        owners = []
        for j in range(h):
            owners += [D[i] for i in grows0[j % bs]]
            owners += [P] * (self.head_taken[j] - len(grows0[j % bs]))
        owners += [reqs[i] for s in range(nt) for i in grows[s % bs]]
        per_step = self.head_taken[:h] + ([len(g) for g in grows] * (nt // bs + 1))[:nt]
        kv_used = np.array(list(accumulate(per_step, initial=pool.num_used))[1:])
        pool.append_blocks_at(owners, per_step, times)
        metrics.sample_steps(index, times[:n], 0, b, kv_used)
        stats, trace = replica.stats, metrics.trace
        for j in range(h):
            st, dt, chunk, _ = self.head[j]
            used = int(kv_used[j])
            stats.add_step(dt, st, chunk, b - 1, used, 0.0, 1, b)
            if trace is not None:
                trace.step(index, times[j], dt, chunk, b - 1, used, 0, b, st, 0.0, 1)
        if nt:
            secs = self.secs[:nt]
            stats.add_steps(secs, *self.steps.sums(nt), 0, b, kv_used[h:])
            if trace is not None:
                trace.steps(index, ends[h:n], secs, 0, b, kv_used[h:], 0, b, self.steps.arrays(nt)[3])
        if not nt:                                          # the last step is a head step
            self._head_ends(replica, times, n - 1)
            batch = [(r, 1) for r in D]
            batch.append((P, self.head[n - 1][2]))
            if replica.cancelled:
                batch = [x for x in batch if not x[0].outcome]
            replica._complete(batch, times[n])
            return
        if h:
            self._head_ends(replica, times, h)
        m = nt - 1                                          # tail step ends in closed form
        if m:
            tail_ends = ends[h: n]
            online = sum(r.job < 0 for r in reqs) if replica.num_batch else b
            if online:                                      # ITL is online traffic's (as the latency table)
                metrics.itl.add_array(tail_ends[1:] - tail_ends[:m], online, tail_ends[1:])
            metrics.on_tokens_array(tail_ends[1:], b, index)
            if pool.caching:
                _register(pool, reqs, self.ctx, grows, times[h:], m)
        replica._complete_run(reqs, nt, times[n - 1], times[n])

    def _head_ends(self, replica, times: list, m: int) -> None:
        """The ends of the first m head steps: a token for each decoding request, a chunk for P (its first token
        at the end of its last chunk), as Replica._complete gives them."""
        if not m:
            return
        pool, metrics, D, P = replica.pool, replica.metrics, self.D, self.P
        nd, index, J = len(D), replica.index, self.J
        online = sum(r.job < 0 for r in D) if replica.num_batch else nd
        if online:                                          # ITL is online traffic's (as the latency table)
            t = self.ends[1: m + 1]
            metrics.itl.add_array(t - self.ends[:m], online, t)
        for j in range(m):
            metrics.on_tokens(times[j + 1], nd + (j == J - 1), index)
        if pool.caching:
            _register(pool, D, self.ctx0, self.grows0, times, m, (P, self.head))
        t = times[m]
        for r in D:
            r.num_computed += m
            r.num_output += m
            r.last_token = t
        _, _, chunk, c = self.head[m - 1]
        P.num_computed = c + chunk
        if m == J:                                          # its last chunk: its first token
            P.num_output = 1
            P.first_token = P.last_token = t
